"""The host's page table: which pages of the paged KV cache each decode slot holds.

The cache's pages are split evenly over the slot shards (the devices of the mesh's slot axes), and a slot's
pages come from its own shard, so each device attends its slots over its own pages; the table holds page
indices local to the shard. Pages are taken as a slot's sequence grows and all given back when its trajectory
leaves the slot (finished, or to the replay buffer).
"""
from typing import List

import numpy as np


class PageTable:
  """Page allocation for `num_slots` slots in `shards` equal groups (slot s is in shard s // (num_slots / shards))."""

  def __init__(self, num_slots: int, num_pages: int, page_size: int, pages_per_slot: int, shards: int = 1):
    if num_slots % shards or num_pages % shards:
      raise ValueError(f"{num_slots} slots and {num_pages} pages must split evenly over {shards} slot shards")
    if num_pages // shards < pages_per_slot:
      raise ValueError(f"num_pages={num_pages} gives each of the {shards} slot shards {num_pages // shards} pages, "
                       f"fewer than one slot may need ({pages_per_slot}): raise SamplingConfig.num_pages")
    self.page_size, self.shards = page_size, shards
    self.slots_per_shard = num_slots // shards
    self.table_BxM = np.zeros((num_slots, pages_per_slot), np.int32)  # unheld entries: page 0 (any valid index)
    self.held_B = np.zeros((num_slots,), np.int64)
    self._free: List[List[int]] = [list(range(num_pages // shards - 1, -1, -1)) for _ in range(shards)]

  def shard_of(self, slot: int) -> int:
    return slot // self.slots_per_shard

  def free_pages(self, shard: int) -> int:
    return len(self._free[shard])

  def pages_for(self, length: int) -> int:
    return -(-length // self.page_size)

  def missing(self, slot: int, length: int) -> int:
    """Pages the slot still needs to hold `length` positions."""
    return max(0, min(self.pages_for(length), self.table_BxM.shape[1]) - int(self.held_B[slot]))

  def grow(self, slot: int, length: int) -> bool:
    """Gives the slot pages for its first `length` positions; False (and nothing taken) if its shard lacks them."""
    need = self.missing(slot, length)
    free = self._free[self.shard_of(slot)]
    if need > len(free):
      return False
    held = int(self.held_B[slot])
    for j in range(held, held + need):
      self.table_BxM[slot, j] = free.pop()
    self.held_B[slot] = held + need
    return True

  def release(self, slot: int):
    """Gives back every page the slot holds."""
    held = int(self.held_B[slot])
    self._free[self.shard_of(slot)].extend(self.table_BxM[slot, :held][::-1].tolist())
    self.table_BxM[slot] = 0
    self.held_B[slot] = 0
