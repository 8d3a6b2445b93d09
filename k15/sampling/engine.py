"""The rollout engine: fixed decode slots over a paged KV cache, chunked decode, slot refill, partial rollouts.

One `run` is the rollout phase of one RL iteration. Work is taken in priority order: partial trajectories
from the replay buffer first, then the new requests (each prompt k times). Between chunks, the host refills
free slots: one prefill call encodes every sequence that enters a slot (new prompts and resumed partials
alike), page by page, while the other slots keep their cache. A trajectory that reaches the iteration's token
budget goes back to the buffer, to be resumed in a later iteration by prefilling prompt + response-so-far with
that iteration's params.

The engine is the host side: it schedules slots, pages (`paging.PageTable`) and the buffer over the device
calls of `slots` and a backend (`backend.ModelBackend` unless a plug-in is given).
"""
import dataclasses
import functools
import time
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from k15 import models
from k15 import sharding as sharding_lib
from k15.models import ModelConfig
from k15.sampling import slots as slots_lib
from k15.sampling.backend import ModelBackend
from k15.sampling.config import SamplingConfig
from k15.sampling.paging import PageTable
from k15.sampling.replay import ReplayBuffer, Trajectory

_REASONS = {slots_lib.EOS: "eos", slots_lib.REPEAT: "repeat"}


@dataclasses.dataclass(frozen=True)
class Request:
  """A prompt to sample num_samples times (sample indices 0..num_samples-1)."""
  prompt_id: int
  prompt_tokens: Sequence[int]
  num_samples: int = 1
  max_new_tokens: Optional[int] = None  # response cap for this prompt; default: the sampling config's


@dataclasses.dataclass
class RolloutStats:
  """Counters of one `run`."""
  num_slots: int
  decode_steps: int = 0  # while-loop iterations (each decodes one token in every slot)
  useful_tokens: int = 0  # tokens generated for live trajectories
  prefill_tokens: int = 0  # prompt / prefix tokens encoded
  prefill_call_tokens: int = 0  # token positions of the prefill calls' shapes: prefill_tokens and their padding
  chunks: int = 0
  prefills: int = 0  # prefill calls
  resumed: int = 0  # partial trajectories taken from the replay buffer
  to_buffer: int = 0  # partial trajectories put into it
  preempted: int = 0  # trajectories taken out of their slot for lack of pages, resumed later in the run
  finished: Dict[str, int] = dataclasses.field(default_factory=dict)  # finish reason -> count
  wall_time_s: float = 0.0

  @property
  def slot_utilization(self) -> float:
    """Useful token steps / (slots * decode steps)."""
    return self.useful_tokens / max(1, self.num_slots * self.decode_steps)

  def as_dict(self) -> dict:
    out = {k: v for k, v in dataclasses.asdict(self).items() if k != "finished"}
    out.update({f"finished_{k}": v for k, v in self.finished.items()})
    out["slot_utilization"] = self.slot_utilization
    return out


def size_class(n: int, top: int) -> int:
  """The shape of a device call for n rows: the smallest of top / 16, top / 4 and top that holds them. Three sizes
  only, so a run meets them all early and compiles nothing new later; padding costs at most 4x a small call."""
  for size in (max(1, top // 16), max(1, top // 4), top):
    if n <= size:
      return size
  raise ValueError(f"{n} rows exceed the largest call of {top}")


def _typed_key(rng):
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng
  return jax.random.wrap_key_data(rng)


def slot_axes_of(mesh: Mesh, rules=sharding_lib.SAMPLING_RULES) -> Tuple[Tuple[str, ...], int]:
  """The mesh axes the slots are split over (those of the rules' 'cache_batch', of size > 1), and their size."""
  axes = tuple(a for a in sharding_lib._rule_map(rules).get("cache_batch", ()) if mesh.shape.get(a, 1) > 1)  # pylint: disable=protected-access
  return axes, int(np.prod([mesh.shape[a] for a in axes]))


def sampling_layout(cfg: ModelConfig, scfg: SamplingConfig, num_slots: int, mesh=None,
                    rules=None) -> Tuple[slots_lib.Layout, int, int]:
  """(Layout, slot shards, pages in the cache) of an engine of num_slots slots on `mesh` (a Mesh or an AbstractMesh;
  None: one device) under the sampling `rules` (default `sharding.SAMPLING_RULES`). The pages are
  SamplingConfig.num_pages (0: every slot at max_length), rounded up to split evenly over the slot shards."""
  num_pages = scfg.num_pages or num_slots * scfg.pages_per_slot
  if mesh is None:
    return slots_lib.Layout(None, None, ()), 1, num_pages
  rules = tuple(tuple(r) for r in (rules or sharding_lib.SAMPLING_RULES))
  slot_axes, shards = slot_axes_of(mesh, rules)
  if num_slots % shards:
    raise ValueError(f"num_slots={num_slots} must be a multiple of the {shards} devices of the slot axes {slot_axes}")
  num_pages = -(-num_pages // shards) * shards
  kv_shape = models.kv_pages_shape(cfg, num_pages, scfg.page_size)
  kv_spec = sharding_lib.logical_to_spec(models.KV_PAGES_LOGICAL_AXES, kv_shape, mesh, rules)
  layout = slots_lib.Layout(NamedSharding(mesh, PartitionSpec(slot_axes or None)), NamedSharding(mesh, kv_spec), rules)
  return layout, shards, num_pages


class RolloutEngine:
  """Samples from params in num_slots decode slots; the jitted device calls are shared across engines.

  With a mesh, the params are put in the sampling layout (`rules`, default `sharding.SAMPLING_RULES`: tensor
  parallel over 'tensor', replicated over 'data' and 'fsdp') once per `run`, and the slots, their prefill rows and
  the cache's pages are split over the rules' 'cache_batch' axes. When the sampling layout replicates the params
  (no tensor axis), or the backend cannot split over a mesh, each slot shard decodes in a loop of its own,
  without a per-step agreement across devices.
  """

  def __init__(self, cfg: ModelConfig, sampling_cfg: SamplingConfig, num_slots: int, mesh: Optional[Mesh] = None,
               rules=None, backend=None, refill_min_free: Optional[int] = None, static_batching: bool = False):
    if num_slots <= 0:
      raise ValueError(f"num_slots must be positive, got {num_slots}")
    self.cfg, self.scfg, self.num_slots = cfg, sampling_cfg, num_slots
    self.backend = backend or ModelBackend()
    self.mesh = mesh
    # While work waits, a chunk ends early once this many slots are idle: refill often enough to keep
    # slots busy, rarely enough that prefill dispatches stay a small cost.
    self.refill_min_free = refill_min_free or max(1, num_slots // 8)
    self.static_batching = static_batching  # refill only once every slot is free (a baseline)
    self.layout, self.shards, self.num_pages = sampling_layout(cfg, sampling_cfg, num_slots, mesh, rules)
    self.param_shardings, self.local_loops = None, False
    if mesh is not None:
      self.param_shardings = sharding_lib.param_shardings(cfg, mesh, self.layout.rules)
      replicated = all(s.is_fully_replicated for s in jax.tree.leaves(self.param_shardings))
      if not (self.backend.splits_over_mesh or replicated):
        raise ValueError(f"the sampling backend {type(self.backend).__name__} needs the params replicated over the "
                         "mesh; the sampling rules split them (use a mesh without a tensor axis)")
      self.local_loops = self.shards > 1 and (replicated or not self.backend.splits_over_mesh)
    self.pages = PageTable(num_slots, self.num_pages, sampling_cfg.page_size, sampling_cfg.pages_per_slot,
                           self.shards)
    self._state = None

  def _call(self, fn, *args):
    """A device call under the engine's mesh."""
    if self.mesh is None:
      return fn(*args)
    with jax.set_mesh(self.mesh):
      return fn(*args)

  def prepare(self, params):
    """The backend's weights from params, in the sampling layout: one move of the params per run. A backend that
    splits over the mesh gets them from the training layout directly (its prepare and the move in one program);
    another gets them replicated first."""
    if self.param_shardings is None:
      return self._call(_prepare(self.backend, self.cfg, None, ()), params)
    if self.backend.splits_over_mesh:
      return self._call(_prepare(self.backend, self.cfg, self.mesh, self.layout.rules), params)
    return self._call(_prepare(self.backend, self.cfg, None, ()), jax.device_put(params, self.param_shardings))

  def release(self):
    """Frees the device state (KV cache and slots) between rollout phases; the next `run` allocates it again."""
    self._state = None

  def run(self, params, requests: Sequence[Request], replay_buffer: Optional[ReplayBuffer], iteration: int,
          token_budget: Optional[int], rng) -> Tuple[List[Trajectory], RolloutStats]:
    """Rolls out every buffered partial and every request; returns the finished trajectories and stats.

    Trajectories that reach token_budget (new tokens in this run) go to replay_buffer, or, when it is
    None, are returned finished with reason "budget".
    """
    start = time.perf_counter()
    if self._state is None:
      self._state = self._call(slots_lib.init_state, self.cfg, self.scfg, self.num_slots, self.num_pages,
                               self.layout)
    schedule = _Schedule(self, self.prepare(params), requests, replay_buffer, iteration, token_budget,
                         _typed_key(rng))
    finished = schedule.run()
    schedule.stats.wall_time_s = time.perf_counter() - start
    return finished, schedule.stats


@functools.lru_cache(maxsize=None)
def _prepare(backend, cfg: ModelConfig, mesh, rules):
  """backend.prepare(cfg, params), jitted once per (backend, model, layout); with a mesh its result is laid out as
  the params are under `rules` (`backend.weights_like`)."""
  shardings = None if mesh is None else backend.weights_like(cfg, sharding_lib.param_shardings(cfg, mesh, rules))
  return jax.jit(functools.partial(backend.prepare, cfg), out_shardings=shardings)


@dataclasses.dataclass
class _Live:
  """Host view of the trajectory in a slot."""
  traj: Trajectory
  new_tokens: List[int]
  new_logprobs: List[float]
  length: int  # prompt + response tokens, including this segment's so far
  remaining: int  # tokens it may still generate in this segment


class _Schedule:
  """One run's host state and its loop: refill free slots, decode a chunk, close finished slots."""

  def __init__(self, engine: RolloutEngine, weights, requests, replay_buffer, iteration, token_budget, rng):
    self.engine, self.weights, self.buffer = engine, weights, replay_buffer
    self.iteration, self.budget, self.rng = iteration, token_budget, rng
    self.stats = RolloutStats(num_slots=engine.num_slots)
    self.finished: List[Trajectory] = []
    self.queue: List[Trajectory] = []  # popped from the end
    if replay_buffer is not None:
      self.queue.extend(replay_buffer.pop_all())
      self.stats.resumed = len(self.queue)
    for req in requests:
      if len(req.prompt_tokens) == 0:
        raise ValueError(f"request {req.prompt_id}: empty prompt")
      for k in range(req.num_samples):
        self.queue.append(Trajectory(req.prompt_id, k, req.prompt_tokens, [], [], [],
                                     max_new_tokens=req.max_new_tokens))
    self.queue.reverse()
    self.live: List[Optional[_Live]] = [None] * engine.num_slots
    self.generated: Dict[int, int] = {}  # tokens generated in this run, by id of a preempted trajectory

  def run(self) -> List[Trajectory]:
    while True:
      self.refill()
      if not any(self.live):
        if self.queue:  # every page is free when every slot is: the first in line always fits
          raise RuntimeError(f"{len(self.queue)} trajectories left waiting for pages with every slot free")
        return self.finished
      self.decode()

  def limit(self, traj: Trajectory, budget: Optional[int]) -> int:
    """Tokens the trajectory may still generate: its caps, and what is left of `budget` in this run."""
    scfg = self.engine.scfg
    cap = scfg.max_new_tokens if traj.max_new_tokens is None else traj.max_new_tokens
    n_resp = len(traj.response_tokens)
    limit = min(cap - n_resp, scfg.max_length - len(traj.prompt_tokens) - n_resp)
    return limit if budget is None else min(limit, budget - self.generated.get(id(traj), 0))

  def finish(self, traj: Trajectory, reason: str):
    traj.finish_reason = reason
    self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
    self.finished.append(traj)

  def pages_needed(self, item: _Live) -> int:
    """Positions the slot writes up to the end of the next chunk: the fed token's and those it may generate."""
    return item.length - 1 + min(self.engine.scfg.chunk_size, item.remaining)

  def refill(self):
    """Moves queued trajectories into free slots and encodes them. Each goes to the shard with the fewest prefill
    rows so far in this refill (then the most free pages) that has its pages: a prefill call gives every shard as
    many rows as its fullest one, so balanced shards pad the least."""
    engine, pages = self.engine, self.engine.pages
    free = [i for i in range(engine.num_slots) if self.live[i] is None]
    if engine.static_batching and len(free) < engine.num_slots:
      return
    rows = [0] * engine.shards  # prefill rows per shard in this refill
    entering = []
    while free:
      while self.queue and self.limit(self.queue[-1], self.budget) <= 0:  # a length cap was reached
        self.finish(self.queue.pop(), "max_length")
      if not self.queue:
        break
      traj = self.queue[-1]
      n = len(traj.prompt_tokens) + len(traj.response_tokens)
      item = _Live(traj, [], [], n, self.limit(traj, self.budget))
      free.sort(key=lambda slot: (rows[pages.shard_of(slot)], -pages.free_pages(pages.shard_of(slot))))
      slot = next((s for s in free if pages.grow(s, self.pages_needed(item))), None)
      if slot is None:
        break  # no shard has its pages now: it waits, first in line
      self.queue.pop()
      free.remove(slot)
      self.live[slot] = item
      entering.append(slot)
      rows[pages.shard_of(slot)] += pages.pages_for(n - 1)
    if entering:
      self.encode(entering)

  def encode(self, entering: List[int]):
    """Prefills the sequences entering `entering` slots (all but each one's last token, a page of a sequence per
    row, every row in one call when they fit), then points the slots at them."""
    engine = self.engine
    Z, S = engine.scfg.page_size, engine.scfg.max_length
    rows = [[] for _ in range(engine.shards)]  # per shard: (slot, first position)
    for slot in entering:
      n = self.live[slot].length
      rows[engine.pages.shard_of(slot)].extend((slot, j) for j in range(0, n - 1, Z))
    per_shard = max(len(r) for r in rows)
    max_rows = 4 * engine.num_slots // engine.shards  # rows of one call per shard (bounds its memory)
    for start in range(0, per_shard, max_rows):
      R = size_class(min(max_rows, per_shard - start), max_rows)
      tokens = np.zeros((engine.shards, R, Z), np.int32)
      positions = np.full((engine.shards, R, Z), -1, np.int32)
      tables = np.zeros((engine.shards, R, engine.pages.table_BxM.shape[1]), np.int32)
      for shard, shard_rows in enumerate(rows):
        for r, (slot, j) in enumerate(shard_rows[start:start + R]):
          seq = self.live[slot].traj.tokens
          m = min(Z, self.live[slot].length - 1 - j)
          tokens[shard, r, :m], positions[shard, r, :m] = seq[j:j + m], np.arange(j, j + m)
          tables[shard, r] = engine.pages.table_BxM[slot]
          self.stats.prefill_tokens += m
      self.stats.prefill_call_tokens += tokens.size
      flat = lambda a: a.reshape(engine.shards * R, *a.shape[2:])
      state = engine._state  # pylint: disable=protected-access
      kv = engine._call(slots_lib.prefill, engine.backend, engine.cfg, engine.scfg, engine.layout,  # pylint: disable=protected-access
                        engine.local_loops, self.weights, state.kv, flat(tokens), flat(positions), flat(tables))
      engine._state = state._replace(kv=kv)  # pylint: disable=protected-access
      self.stats.prefills += 1
    P = size_class(len(entering), engine.num_slots)
    hist = np.zeros((P, S), np.int32)
    lengths, starts, remaining = np.ones((P,), np.int32), np.zeros((P,), np.int32), np.zeros((P,), np.int32)
    slots_P, seeds = np.full((P,), engine.num_slots, np.int32), np.zeros((P, 2), np.uint32)
    for p, slot in enumerate(entering):
      item = self.live[slot]
      t = item.traj
      hist[p, :item.length] = t.tokens
      lengths[p], starts[p], remaining[p] = item.length, len(t.prompt_tokens), item.remaining
      slots_P[p], seeds[p] = slot, (t.prompt_id % 2**32, t.sample_index % 2**32)
    engine._state = engine._call(slots_lib.load_slots, engine.layout, engine._state, hist, slots_P, lengths, starts,  # pylint: disable=protected-access
                                 remaining, seeds, self.rng)

  def close(self, slot: int, device_reason: int):
    """Ends the slot's segment: its trajectory finishes, goes to the buffer, or (preempted) back to the queue."""
    item = self.live[slot]
    self.live[slot] = None
    self.engine.pages.release(slot)
    t = item.traj
    t.response_tokens = np.concatenate([t.response_tokens, np.asarray(item.new_tokens, np.int32)])
    t.logprobs = np.concatenate([t.logprobs, np.asarray(item.new_logprobs, np.float32)])
    t.token_iterations = np.concatenate([t.token_iterations, np.full(len(item.new_tokens), self.iteration, np.int32)])
    if device_reason in _REASONS:
      self.finish(t, _REASONS[device_reason])
    elif self.limit(t, None) <= 0:
      self.finish(t, "max_length")
    elif device_reason == slots_lib.RUNNING:  # preempted: first in line again
      self.generated[id(t)] = self.generated.get(id(t), 0) + len(item.new_tokens)
      self.queue.append(t)
      self.stats.preempted += 1
    elif self.buffer is None:
      self.finish(t, "budget")
    else:
      self.buffer.add(t)
      self.stats.to_buffer += 1

  def grow_pages(self):
    """Gives every live slot the pages of the coming chunk; a slot whose shard runs out is preempted."""
    engine = self.engine
    stop = np.zeros((engine.num_slots,), bool)
    for slot, item in enumerate(self.live):
      if item is not None and not engine.pages.grow(slot, self.pages_needed(item)):
        self.close(slot, slots_lib.RUNNING)
        stop[slot] = True
    if stop.any():
      engine._state = engine._call(slots_lib.stop_slots, engine.layout, engine._state, stop)  # pylint: disable=protected-access

  def decode(self):
    engine = self.engine
    self.grow_pages()
    busy = [i for i in range(engine.num_slots) if self.live[i] is not None]
    if not busy:
      return
    # Waiting work ends the chunk once it can take a few more slots than are free now (those wait for pages).
    waiting = len(self.queue) if not engine.static_batching else 0
    idle = engine.num_slots - len(busy)
    stop_when_free = np.int32(idle + min(engine.refill_min_free, waiting) if waiting else engine.num_slots + 1)
    engine._state, out = engine._call(  # pylint: disable=protected-access
        slots_lib.decode_chunk, engine.backend, engine.cfg, engine.scfg, engine.layout, engine.local_loops,
        self.weights, engine._state, engine.pages.table_BxM, stop_when_free)  # pylint: disable=protected-access
    tokens_BxC, logp_BxC, reasons_B, steps = sharding_lib.to_host(out)  # gathered across processes
    self.stats.chunks += 1
    self.stats.decode_steps += int(np.max(steps))  # the loops of the slot shards run side by side
    for i in busy:
      item = self.live[i]
      n = int(np.sum(tokens_BxC[i] >= 0))
      item.new_tokens.extend(tokens_BxC[i, :n].tolist())
      item.new_logprobs.extend(logp_BxC[i, :n].tolist())
      item.length += n
      item.remaining -= n
      self.stats.useful_tokens += n
      if reasons_B[i] != slots_lib.RUNNING:
        self.close(i, int(reasons_B[i]))
