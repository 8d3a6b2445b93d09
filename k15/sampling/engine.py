"""The rollout engine: fixed decode slots, chunked decode, slot refill, partial rollouts.

One `run` is the rollout phase of one RL iteration. Work is taken in priority order: partial
trajectories from the replay buffer first, then the new requests (each prompt k times). Between chunks,
the host refills finished slots (a prefill into those slots only, while the others keep their cache).
A trajectory that reaches the iteration's token budget goes back to the buffer, to be resumed in a later
iteration by prefilling prompt + response-so-far with that iteration's params.
"""
import dataclasses
import time
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from k15 import sharding as sharding_lib
from k15.models import ModelConfig
from k15.sampling import native
from k15.sampling import slots as slots_lib
from k15.sampling.config import SamplingConfig
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
  prefill_tokens: int = 0  # prompt / prefix tokens re-encoded
  chunks: int = 0
  prefills: int = 0
  resumed: int = 0  # partial trajectories taken from the replay buffer
  to_buffer: int = 0  # partial trajectories put into it
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


@dataclasses.dataclass
class _Live:
  """Host view of the trajectory in a slot."""
  traj: Trajectory
  new_tokens: List[int]
  new_logprobs: List[float]
  length: int  # prompt + response tokens, including this segment's so far


def _bucket(n: int, lo: int, hi: int) -> int:
  """Smallest power of two >= max(n, lo), capped at hi (bounds the number of compiled shapes)."""
  return min(hi, max(lo, 1 << max(0, int(n) - 1).bit_length()))


def slot_axes_of(mesh: Mesh, slot_axes: Optional[Sequence[str]] = None) -> Tuple[Tuple[str, ...], int]:
  """The mesh axes the slot dim is sharded over (default 'data' and 'fsdp', else all), and their size."""
  if slot_axes is None:
    slot_axes = tuple(a for a in mesh.axis_names if a in ("data", "fsdp")) or tuple(mesh.axis_names)
  return tuple(slot_axes), int(np.prod([mesh.shape[a] for a in slot_axes]))


def _typed_key(rng):
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng
  return jax.random.wrap_key_data(rng)


class RolloutEngine:
  """Samples from params in num_slots decode slots; the jitted functions are shared across engines.

  With a mesh, the slot dim of the cache and of every slot array is sharded over `slot_axes` (default:
  the mesh's 'data' and 'fsdp' axes, or all of its axes when it has neither); params are used with
  whatever sharding they have (the training shardings: no copy). When the params are replicated over the
  mesh, each slot shard decodes in a loop of its own, without a per-step agreement across devices. The
  decode step is SamplingConfig.decode_kernel's: on CPU the native step uses every core from one device;
  XLA's step needs a mesh of one device per core (XLA_FLAGS=--xla_force_host_platform_device_count=<cores>)
  to decode on all cores at once.
  """

  def __init__(self, cfg: ModelConfig, sampling_cfg: SamplingConfig, num_slots: int, mesh: Optional[Mesh] = None,
               slot_axes: Optional[Sequence[str]] = None, refill_min_free: Optional[int] = None,
               static_batching: bool = False):
    self.cfg, self.scfg, self.num_slots = cfg, sampling_cfg, num_slots
    # While work waits, a chunk ends early once this many slots are idle: refill often enough to keep
    # slots busy, rarely enough that prefill dispatches stay a small cost.
    self.refill_min_free = refill_min_free or max(1, num_slots // 8)
    self.static_batching = static_batching  # refill only once every slot is free (a baseline)
    self.sharding = None
    if mesh is not None:
      slot_axes, shards = slot_axes_of(mesh, slot_axes)
      if num_slots % shards:
        raise ValueError(f"num_slots={num_slots} must be a multiple of the {shards} devices of slot axes "
                         f"{tuple(slot_axes)}")
      self.sharding = NamedSharding(mesh, PartitionSpec(tuple(slot_axes)))
    self._shards = 1 if mesh is None else shards
    self._state = None

  def _decode_kernel(self, local_loops: bool) -> str:
    """"xla" or a native kernel (SamplingConfig.decode_kernel and native_matmul; `native.choose`). The native
    step is a custom call XLA cannot split over a mesh: with one, it needs the params replicated (each device then
    decodes its slots itself)."""
    devices = jax.devices() if self.sharding is None else list(self.sharding.mesh.devices.flat)
    if self.sharding is not None and self._shards > 1 and not local_loops:
      if self.scfg.decode_kernel == "native":
        raise ValueError("SamplingConfig.decode_kernel='native' needs params replicated over the mesh; these are "
                         "sharded (use decode_kernel='xla' or 'auto')")
      return "xla"
    return native.choose(self.scfg.decode_kernel, self.cfg, devices, self.scfg.native_matmul)

  def _limits(self, traj: Trajectory, token_budget: Optional[int]) -> int:
    cap = self.scfg.max_new_tokens if traj.max_new_tokens is None else traj.max_new_tokens
    n_resp = len(traj.response_tokens)
    limit = min(cap - n_resp, self.scfg.max_length - len(traj.prompt_tokens) - n_resp)
    return limit if token_budget is None else min(limit, token_budget)

  def run(self, params, requests: Sequence[Request], replay_buffer: Optional[ReplayBuffer], iteration: int,
          token_budget: Optional[int], rng) -> Tuple[List[Trajectory], RolloutStats]:
    """Rolls out every buffered partial and every request; returns the finished trajectories and stats.

    Trajectories that reach token_budget (new tokens in this run) go to replay_buffer, or, when it is
    None, are returned finished with reason "budget".
    """
    start_time = time.perf_counter()
    cfg, scfg, B, S = self.cfg, self.scfg, self.num_slots, self.scfg.max_length
    rng = _typed_key(rng)
    stats = RolloutStats(num_slots=B)
    finished: List[Trajectory] = []

    def finish(traj: Trajectory, reason: str):
      traj.finish_reason = reason
      stats.finished[reason] = stats.finished.get(reason, 0) + 1
      finished.append(traj)

    queue: List[Trajectory] = []
    if replay_buffer is not None:
      queue.extend(replay_buffer.pop_all())
      stats.resumed = len(queue)
    for req in requests:
      if len(req.prompt_tokens) == 0:
        raise ValueError(f"request {req.prompt_id}: empty prompt")
      for k in range(req.num_samples):
        queue.append(Trajectory(req.prompt_id, k, req.prompt_tokens, [], [], [], max_new_tokens=req.max_new_tokens))
    queue.reverse()  # pop() from the end keeps the priority order

    live: List[Optional[_Live]] = [None] * B
    # Params replicated over the mesh: each slot shard decodes in a loop of its own (see decode_chunk).
    local_loops = self._shards > 1 and all(getattr(leaf, "sharding", None) is None or leaf.sharding.is_fully_replicated
                                           for leaf in jax.tree.leaves(params))
    kernel = self._decode_kernel(local_loops)
    weights = slots_lib.decode_weights(kernel, cfg, params)
    # The native step's weights also serve prefill's native kernels, on one device (custom calls do not split
    # over a mesh).
    prefill_weights = weights if kernel != "xla" and self.sharding is None else None

    def fit_capacity(longest: int):
      """Cache capacity for sequences up to `longest` tokens growing by a chunk, bucketed: XLA's step attends
      over the whole capacity (the native step reads each slot up to its position, but a dense cache is
      faster for it too), and a resize (a copy) happens only when the bucket changes."""
      need = min(S, -(-(longest + scfg.chunk_size) // scfg.attn_bucket) * scfg.attn_bucket)
      if self._state is None:
        self._state = slots_lib.init_state(cfg, B, S, need, self.sharding)
      elif slots_lib.capacity(self._state) != need:
        self._state = slots_lib.resize(need, self.sharding, self._state)

    def refill():
      free = [i for i in range(B) if live[i] is None]
      if self.static_batching and len(free) < B:
        return
      batch = []
      while queue and len(batch) < len(free):
        traj = queue.pop()
        if self._limits(traj, token_budget) <= 0:  # nothing left to generate: a length cap was reached
          finish(traj, "max_length")
        else:
          batch.append(traj)
      if not batch:
        return
      rows = []  # (trajectory, its length, its slot)
      for traj, slot in zip(batch, free):
        n = len(traj.prompt_tokens) + len(traj.response_tokens)
        rows.append((traj, n, slot))
        live[slot] = _Live(traj, [], [], n)
      fit_capacity(max(item.length for item in live if item is not None))
      # One prefill per length bucket: a resumed long trajectory does not pad every short row to its length.
      groups: Dict[int, list] = {}
      for row in rows:
        groups.setdefault(_bucket(row[1], 16, S), []).append(row)
      for T, group in sorted(groups.items()):
        prefill(group, T)

    def prefill(rows, T: int):
      """Encodes `rows` (trajectory, length, slot), each at most T tokens long, into their slots."""
      P = _bucket(len(rows), 1, B)
      tokens = np.zeros((P, T), np.int32)
      lengths_P = np.ones((P,), np.int32)
      starts, remaining = np.zeros((P,), np.int32), np.zeros((P,), np.int32)
      slots_P, seeds = np.full((P,), B, np.int32), np.zeros((P, 2), np.uint32)
      for row, (traj, n, slot) in enumerate(rows):
        tokens[row, :n] = traj.tokens
        lengths_P[row], starts[row], remaining[row] = n, len(traj.prompt_tokens), self._limits(traj, token_budget)
        slots_P[row], seeds[row] = slot, (traj.prompt_id % 2**32, traj.sample_index % 2**32)
      # With local decode loops (replicated params) the devices also split the prefill's rows.
      rows_sharding = self.sharding if local_loops and P % self._shards == 0 else None
      k_layers, v_layers = slots_lib.encode_prefixes(cfg, rows_sharding, params, tokens, prefill_weights)
      self._state = slots_lib.load_slots(self.sharding, self._state, k_layers, v_layers, tokens, lengths_P, starts,
                                         remaining, slots_P, seeds, rng)
      stats.prefills += 1
      stats.prefill_tokens += sum(n for _, n, _ in rows)

    def close(slot: int, device_reason: int):
      item = live[slot]
      live[slot] = None
      t = item.traj
      t.response_tokens = np.concatenate([t.response_tokens, np.asarray(item.new_tokens, np.int32)])
      t.logprobs = np.concatenate([t.logprobs, np.asarray(item.new_logprobs, np.float32)])
      t.token_iterations = np.concatenate([t.token_iterations, np.full(len(item.new_tokens), iteration, np.int32)])
      if device_reason in _REASONS:
        finish(t, _REASONS[device_reason])
      elif self._limits(t, None) <= 0:
        finish(t, "max_length")
      elif replay_buffer is None:
        finish(t, "budget")
      else:
        replay_buffer.add(t)
        stats.to_buffer += 1

    while True:
      refill()
      busy = [i for i in range(B) if live[i] is not None]
      if not busy:
        break
      fit_capacity(max(live[i].length for i in busy))
      waiting = len(queue) if not self.static_batching else 0
      stop_when_free = np.int32(min(self.refill_min_free, waiting) if waiting else B + 1)
      self._state, out = slots_lib.decode_chunk(cfg, scfg, self.sharding, local_loops, kernel, params, weights,
                                                self._state, stop_when_free)
      tokens_BxC, logp_BxC, reasons_B, steps = sharding_lib.to_host(out)  # gathered across processes
      stats.chunks += 1
      stats.decode_steps += int(np.max(steps))  # the loops of the slot shards run side by side
      for i in busy:
        item = live[i]
        n = int(np.sum(tokens_BxC[i] >= 0))
        item.new_tokens.extend(tokens_BxC[i, :n].tolist())
        item.new_logprobs.extend(logp_BxC[i, :n].tolist())
        item.length += n
        stats.useful_tokens += n
        if reasons_B[i] != slots_lib.RUNNING:
          close(i, int(reasons_B[i]))
    stats.wall_time_s = time.perf_counter() - start_time
    return finished, stats
