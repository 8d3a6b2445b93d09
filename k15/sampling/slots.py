"""Device side of the sampling loop: a fixed set of decode slots, prefill into chosen slots, chunked decode.

Shapes are static (num_slots B, max length S); every slot sits at its own length. The caches hold a
bucketed capacity A <= S that follows the longest live sequence (attention reads all A positions each
step), resized only when the bucket changes. A slot's state is the token it feeds next (the last of its
sequence) and that token's position; prefill writes the k/v of the tokens before it, so decode alone
samples. Stale cache entries past a slot's position are never attended (the mask is position-based), so
a refilled slot needs no clearing.
"""
import functools
import os
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from k15.models import ModelConfig
from k15.sampling import native, prefill
from k15.sampling.config import SamplingConfig
from k15.sampling.repeat import newest_ngram_count
from k15.sampling.select import logit_stats, logprobs_at, select_tokens
from k15.sampling.step import LayerCaches, decode_step
from k15.sampling.step import decode_weights as decode_weights_xla

# Why a slot stopped; 0 while it runs.
RUNNING, EOS, REPEAT, LIMIT = 0, 1, 2, 3


class SlotState(NamedTuple):
  cache_k: LayerCaches  # per layer BxKxHxA; capacity A <= S follows the longest live sequence
  cache_v: LayerCaches  # per layer BxKxAxH
  hist_BxS: jax.Array  # int32 tokens at their absolute positions (for repeat detection)
  tokens_B: jax.Array  # int32 token fed at the next step
  positions_B: jax.Array  # int32 its position
  starts_B: jax.Array  # int32 position where the response begins
  remaining_B: jax.Array  # int32 tokens the slot may still generate in this segment
  active_B: jax.Array  # bool
  keys_B: jax.Array  # uint32 PRNG key data, one key per trajectory


def capacity(state: SlotState) -> int:
  return state.cache_v[0].shape[2]


class ChunkOutput(NamedTuple):
  tokens_BxC: jax.Array  # int32 sampled tokens; -1 where the slot was not active
  logprobs_BxC: jax.Array  # float32 log softmax(raw logits) at the sampled token
  reasons_B: jax.Array  # int32 RUNNING / EOS / REPEAT / LIMIT after the chunk
  steps: jax.Array  # int32 decode steps run, one per decode loop (a loop stops early once no slot is active)


def _constrain(tree, sharding: Optional[NamedSharding]):
  if sharding is None:
    return tree
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def init_state(cfg: ModelConfig, num_slots: int, length: int, capacity: int,
               sharding: Optional[NamedSharding] = None):
  """An all-idle SlotState: caches of `capacity` positions, token history of `length`; `sharding` (slot
  dim over the data axes) is applied to every array."""
  zeros = lambda shape, dtype: jnp.zeros(shape, dtype)
  K, H = cfg.n_kv_heads, cfg.head_dim
  layers = lambda shape: tuple(zeros(shape, cfg.jnp_dtype) for _ in range(cfg.n_layers))
  key_data = jax.random.key_data(jax.random.split(jax.random.key(0), num_slots))
  state = SlotState(layers((num_slots, K, H, capacity)), layers((num_slots, K, capacity, H)),
                    zeros((num_slots, length), jnp.int32), zeros((num_slots,), jnp.int32),
                    zeros((num_slots,), jnp.int32), zeros((num_slots,), jnp.int32),
                    zeros((num_slots,), jnp.int32), zeros((num_slots,), bool), key_data)
  return state if sharding is None else jax.device_put(state, sharding)


@functools.partial(jax.jit, static_argnums=(0, 1))
def encode_prefixes(cfg: ModelConfig, rows: Optional[NamedSharding], params, tokens_PxT, native_weights=None):
  """K/V (per layer: keys PxKxHxT, values PxKxTxH) of left-aligned sequences; `load_slots` loads them.

  Past a sequence's end (padding) they are garbage, never attended: decode writes each position from the
  sequence's last token on (which it feeds) before attending to it. Separate from `load_slots` so this heavy
  compile depends only on (P, T), not on the cache capacity. `rows`: a sharding that splits the P sequences
  over devices (each encodes its share), or None. `native_weights`: the native step's weights, for prefill's
  native CPU kernels (`prefill.encode`), or None.
  """
  if rows is not None:
    tokens_PxT = _constrain(tokens_PxT, rows)
  return prefill.encode(cfg, params, tokens_PxT, native_weights)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
def load_slots(sharding, state: SlotState, k_layers, v_layers, tokens_PxT, lengths_P, starts_P, remaining_P, slots_P,
               seeds_Px2, rng):
  """Loads P encoded sequences into slots_P (index >= B: padding row, ignored); other slots keep their cache.

  seeds_Px2 (prompt id, sample index) pick each trajectory's PRNG key, so its samples do not depend on
  the slot or chunk it runs in.
  """
  T = min(tokens_PxT.shape[1], capacity(state))  # past the capacity there is only padding
  write_k = lambda full, new: full.at[slots_P, :, :, :T].set(new[..., :T].astype(full.dtype), mode="drop")
  write_v = lambda full, new: full.at[slots_P, :, :T].set(new[:, :, :T].astype(full.dtype), mode="drop")
  last_P = jnp.take_along_axis(tokens_PxT, (lengths_P - 1)[:, None], axis=1)[:, 0]
  keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.fold_in(rng, s[0]), s[1]))(seeds_Px2)
  put = lambda a, v: a.at[slots_P].set(v, mode="drop")
  state = SlotState(
      tuple(map(write_k, state.cache_k, k_layers)), tuple(map(write_v, state.cache_v, v_layers)),
      state.hist_BxS.at[slots_P, :tokens_PxT.shape[1]].set(tokens_PxT, mode="drop"),
      put(state.tokens_B, last_P), put(state.positions_B, lengths_P - 1), put(state.starts_B, starts_P),
      put(state.remaining_B, remaining_P), put(state.active_B, remaining_P > 0),
      put(state.keys_B, jax.random.key_data(keys)))
  return _constrain(state, sharding)


@functools.partial(jax.jit, static_argnums=(0, 1))  # no donation: the caches change shape
def resize(new_capacity: int, sharding, state: SlotState):
  """The caches cut or zero-padded to `new_capacity` positions: decode attends over the whole capacity, so it
  follows the longest live sequence. Entries past a slot's position are never attended, so cutting is safe
  as long as every live position stays below the capacity."""
  def fit(c, axis):
    n = c.shape[axis]
    if new_capacity <= n:
      return jax.lax.slice_in_dim(c, 0, new_capacity, axis=axis)
    return jnp.pad(c, [(0, new_capacity - n) if d == axis else (0, 0) for d in range(c.ndim)])
  state = state._replace(cache_k=tuple(fit(c, 3) for c in state.cache_k),
                         cache_v=tuple(fit(c, 2) for c in state.cache_v))
  return _constrain(state, sharding)


def _stop_hit(tokens_B, stop_ids: Tuple[int, ...]):
  hit = jnp.zeros(tokens_B.shape, bool)
  for i in stop_ids:
    hit |= tokens_B == i
  return hit


@functools.partial(jax.jit, static_argnums=(0, 1))
def decode_weights(kernel: str, cfg: ModelConfig, params):
  """The weights the decode step of `kernel` ("xla" or a native kernel of `native.choose`) reads, in its layout;
  built once per rollout run (a copy of every weight), then passed to each `decode_chunk`."""
  if kernel == "xla":
    return decode_weights_xla(cfg, params)
  return native.decode_weights(cfg, params, native.matmul_of(kernel))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4), donate_argnums=(7,))
def decode_chunk(cfg: ModelConfig, scfg: SamplingConfig, sharding, local_loops: bool, kernel: str, params, weights,
                 state: SlotState, stop_when_free):
  """Up to chunk_size decode steps in one while_loop, attending over the caches' whole capacity A.

  `kernel` ("xla" or a native kernel of `native.choose`) picks the decode step; `weights` are its
  `decode_weights`.

  The loop also ends once `stop_when_free` (int32) slots are idle, so waiting work gets their slots
  without idling until the chunk's end. A must exceed every active slot's position + chunk_size (the
  engine resizes the caches to that, bucketed).

  With `local_loops` (params replicated over the mesh), each shard of slots runs the loop on its own
  device (shard_map), and the shards agree on whether to go on (a sum of idle slots across devices) only
  every few steps (SYNC_STEPS_*): in between they decode independently and concurrently (on a CPU with one
  device per core, the cores work in parallel). Otherwise one loop runs over all slots (SPMD), whatever
  the params' sharding; its condition is reduced across devices every step.
  """
  if sharding is None or not local_loops:
    state, out = _decode_loop(cfg, scfg, step_fn(kernel, cfg, 0), params, weights, state, stop_when_free)
    return _constrain(state, sharding), out
  slots = PartitionSpec(*sharding.spec)
  # The devices of this process step side by side: each native step gets its share of the cores.
  threads = max(1, (os.cpu_count() or 1) // len(sharding.mesh.local_devices))
  local_loop = functools.partial(_decode_loop, cfg, scfg, step_fn(kernel, cfg, threads), slot_axes=sharding.spec[0])
  same = PartitionSpec()
  loop = jax.shard_map(local_loop, mesh=sharding.mesh, in_specs=(same, same, slots, same),
                       out_specs=(slots, slots), check_vma=False)  # the loop carries mix per-shard and replicated values
  return loop(params, weights, state, stop_when_free)


def step_fn(kernel: str, cfg: ModelConfig, threads: int):
  """The decode step of `kernel`: (params, weights, cache_k, cache_v, tokens_B, positions_B) -> (logits_BxV,
  LogitStats, cache_k, cache_v); `threads` bounds the native step's threads (0: no bound)."""
  if kernel != "xla":
    return lambda params, weights, *rest: native.decode_step(cfg, weights, *rest, threads=threads)

  def xla_step(params, weights, cache_k, cache_v, tokens_B, positions_B):
    logits_BxV, cache_k, cache_v = decode_step(cfg, params, cache_k, cache_v, tokens_B, positions_B, weights)
    return logits_BxV, logit_stats(logits_BxV), cache_k, cache_v
  return xla_step


# With one loop per slot shard: steps between the shards' agreements on stopping. A cross-device sum per
# step would make the devices wait on each other at every step. While work waits for free slots, they
# agree every 4 steps (a finished slot idles at most 3 steps longer than with a per-step check: refill
# keeps its pace); otherwise only the chunk's end or every slot finishing can stop the loop: every 16.
SYNC_STEPS_WORK_WAITING = 4
SYNC_STEPS_NONE_WAITING = 16


def _decode_loop(cfg: ModelConfig, scfg: SamplingConfig, step_fn, params, weights, state: SlotState, stop_when_free,
                 slot_axes=None):
  """decode_chunk's loop over the slots of `state`; inside shard_map when `slot_axes` (mesh axis names)
  is given, the local shard's loop."""
  B, S = state.hist_BxS.shape
  A, C = capacity(state), scfg.chunk_size
  cache_k, cache_v = state.cache_k, state.cache_v
  hist_BxA = state.hist_BxS[:, :A]
  b_idx = jnp.arange(B)
  keys_B = jax.random.wrap_key_data(state.keys_B)
  all_slots = B if slot_axes is None else B * jax.lax.axis_size(slot_axes)

  def cond(carry):
    i, active_B = carry[0], carry[7]
    idle = jnp.sum(~active_B, dtype=jnp.int32)
    if slot_axes is not None:  # over every shard
      idle = jax.lax.psum(idle, slot_axes)
    return (i < C) & (idle < all_slots) & (idle < stop_when_free)

  def body(carry):
    i, cache_k, cache_v, hist_BxA, tokens_B, positions_B, remaining_B, active_B, reasons_B, out_tok, out_logp = carry
    write_B = jnp.where(active_B, positions_B, A)  # inactive slots write nothing
    logits_BxV, stats, cache_k, cache_v = step_fn(params, weights, cache_k, cache_v, tokens_B, write_B)
    new_pos_B = positions_B + 1
    if scfg.greedy:
      new_B = stats.argmax_B
    else:
      new_B = select_tokens(logits_BxV, jax.vmap(jax.random.fold_in)(keys_B, new_pos_B), scfg)
    logp_B = logprobs_at(logits_BxV, stats, new_B)  # the unmodified policy: log pi_i
    hist_BxA = hist_BxA.at[b_idx, jnp.where(active_B, new_pos_B, A)].set(new_B, mode="drop")
    remaining_B = remaining_B - 1
    reason_B = jnp.where(remaining_B <= 0, LIMIT, RUNNING)
    if scfg.repeat_ngram:
      count_B = newest_ngram_count(hist_BxA, state.starts_B, new_pos_B + 1, scfg.repeat_ngram)
      reason_B = jnp.where(count_B >= scfg.repeat_count, REPEAT, reason_B)
    reason_B = jnp.where(_stop_hit(new_B, scfg.stop_ids), EOS, reason_B)
    reasons_B = jnp.where(active_B, reason_B, reasons_B)
    out_tok = out_tok.at[:, i].set(jnp.where(active_B, new_B, -1))
    out_logp = out_logp.at[:, i].set(jnp.where(active_B, logp_B, 0.0))
    tokens_B = jnp.where(active_B, new_B, tokens_B)
    positions_B = jnp.where(active_B, new_pos_B, positions_B)
    active_B = active_B & (reason_B == RUNNING)
    return (i + 1, cache_k, cache_v, hist_BxA, tokens_B, positions_B, jnp.where(active_B, remaining_B, 0),
            active_B, reasons_B, out_tok, out_logp)

  if slot_axes is not None:
    step = body
    work_waiting = stop_when_free <= all_slots
    sync_steps = jnp.where(work_waiting, SYNC_STEPS_WORK_WAITING, SYNC_STEPS_NONE_WAITING)

    def body(carry):  # sync_steps steps (fewer at the chunk's end) between agreements
      stop = jnp.minimum(carry[0] + sync_steps, C)
      return jax.lax.while_loop(lambda c: c[0] < stop, step, carry)

  carry = (jnp.int32(0), cache_k, cache_v, hist_BxA, state.tokens_B, state.positions_B, state.remaining_B,
           state.active_B, jnp.zeros((B,), jnp.int32), jnp.full((B, C), -1, jnp.int32), jnp.zeros((B, C), jnp.float32))
  (steps, cache_k, cache_v, hist_BxA, tokens_B, positions_B, remaining_B, active_B, reasons_B, out_tok,
   out_logp) = jax.lax.while_loop(cond, body, carry)

  hist_BxS = jax.lax.dynamic_update_slice(state.hist_BxS, hist_BxA, (0, 0)) if A < S else hist_BxA
  state = SlotState(cache_k, cache_v, hist_BxS, tokens_B, positions_B, state.starts_B, remaining_B, active_B,
                    state.keys_B)
  return state, ChunkOutput(out_tok, out_logp, reasons_B, steps[None])
