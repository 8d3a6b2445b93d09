"""Device side of the sampling loop: a fixed set of decode slots over a paged KV cache, prefill, chunked decode.

Shapes are static for a run (num_slots B, pages P of Z positions, page table width M, max length S), so the
decode loop compiles once. Every slot sits at its own length. A slot's state is the token it feeds next (the
last of its sequence) and that token's position; prefill writes the keys and values of the tokens before it,
so decode alone samples. The host owns the page table (`paging.PageTable`) and passes it with each call.

Each jitted function takes the logical axis rules of the sampling layout (static) and runs under them; the
caller runs it under the mesh (jax.set_mesh).
"""
import functools
from typing import NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from k15 import models
from k15.sampling.config import SamplingConfig
from k15.sampling.repeat import newest_ngram_count
from k15.sampling.select import logprobs_at, select_tokens

# Why a slot stopped; 0 while it runs.
RUNNING, EOS, REPEAT, LIMIT = 0, 1, 2, 3


class SlotState(NamedTuple):
  kv: jax.Array  # the paged KV cache kv_LxPxZxCxH (`k15.models.attention`)
  hist_BxS: jax.Array  # int32 tokens at their absolute positions (for repeat detection)
  tokens_B: jax.Array  # int32 token fed at the next step
  positions_B: jax.Array  # int32 its position
  starts_B: jax.Array  # int32 position where the response begins
  remaining_B: jax.Array  # int32 tokens the slot may still generate in this segment
  active_B: jax.Array  # bool
  keys_B: jax.Array  # uint32 PRNG key data, one key per trajectory


class ChunkOutput(NamedTuple):
  tokens_BxC: jax.Array  # int32 sampled tokens; -1 where the slot was not active
  logprobs_BxC: jax.Array  # float32 log softmax(raw logits) at the sampled token
  reasons_B: jax.Array  # int32 RUNNING / EOS / REPEAT / LIMIT after the chunk
  steps: jax.Array  # int32 decode steps run, one per decode loop (a loop stops early once no slot is active)


class Layout(NamedTuple):
  """Where the sampler's arrays live: the slot dim over the slot axes, the cache by its logical axes."""
  slots: Optional[NamedSharding]  # every per-slot array (None: one device)
  kv: Optional[NamedSharding]
  rules: Tuple  # logical axis rules the passes run under


def _constrain(tree, sharding: Optional[NamedSharding]):
  if sharding is None:
    return tree
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def init_state(cfg: models.ModelConfig, scfg: SamplingConfig, num_slots: int, num_pages: int, layout: Layout):
  """An all-idle SlotState with an empty cache of `num_pages` pages, in the layout's shardings."""
  return state_maker(cfg, scfg, num_slots, num_pages, layout)()


@functools.lru_cache(maxsize=None)
def state_maker(cfg: models.ModelConfig, scfg: SamplingConfig, num_slots: int, num_pages: int, layout: Layout):
  """init_state's program, compiled once per layout: each device fills its own share of the state. (Made outside a
  program under the mesh, the whole cache would first be filled on every device: on a pod, many times its HBM.)"""
  def make():
    zeros = lambda shape, dtype=jnp.int32: jnp.zeros(shape, dtype)
    kv = jnp.zeros(models.kv_pages_shape(cfg, num_pages, scfg.page_size), cfg.jnp_dtype)
    key_data = jax.random.key_data(jax.random.split(jax.random.key(0), num_slots))
    return SlotState(kv, zeros((num_slots, scfg.max_length)), zeros((num_slots,)), zeros((num_slots,)),
                     zeros((num_slots,)), zeros((num_slots,)), zeros((num_slots,), bool), key_data)

  shardings = None if layout.slots is None else SlotState(layout.kv, *([layout.slots] * 7))
  return jax.jit(make, out_shardings=shardings)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4), donate_argnums=(6,))
def prefill(backend, cfg: models.ModelConfig, scfg: SamplingConfig, layout: Layout, local: bool, weights, kv,
            tokens_RxT, positions_RxT, table_RxM):
  """Writes the keys and values of the rows' tokens (a negative position: padding) into the cache: `backend`'s
  prefill. The rows are split over the slot shards alike (row r's pages are on its shard). With `local` (the
  weights replicated over the mesh, as for `decode_chunk`'s local loops), each device encodes its own rows into its
  own pages (shard_map); otherwise one SPMD program does, split as the layout's rules say."""
  if layout.slots is None or not local:
    with nn.logical_axis_rules(layout.rules):
      tokens_RxT, positions_RxT, table_RxM = _constrain((tokens_RxT, positions_RxT, table_RxM), layout.slots)
      kv = backend.prefill(cfg, scfg, weights, kv, tokens_RxT, positions_RxT, table_RxM)
      return _constrain(kv, layout.kv)
  rows, pages = PartitionSpec(*layout.slots.spec), PartitionSpec(None, *layout.slots.spec)
  encode = jax.shard_map(functools.partial(backend.prefill, cfg, scfg), mesh=layout.slots.mesh,
                         in_specs=(PartitionSpec(), pages, rows, rows, rows), out_specs=pages, check_vma=False)
  with nn.logical_axis_rules(()):  # each device runs the model on its own rows: nothing to split
    return encode(weights, kv, tokens_RxT, positions_RxT, table_RxM)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
def load_slots(layout: Layout, state: SlotState, hist_PxS, slots_P, lengths_P, starts_P, remaining_P, seeds_Px2, rng):
  """Points slots_P (an index >= B: a padding row, ignored) at sequences whose first lengths_P - 1 positions are in
  the cache: each feeds its last token next (hist_PxS holds each sequence's tokens). Other slots are untouched.

  seeds_Px2 (prompt id, sample index) pick each trajectory's PRNG key, so its samples do not depend on the slot or
  chunk it runs in.
  """
  last_P = jnp.take_along_axis(hist_PxS, (lengths_P - 1)[:, None], axis=1)[:, 0]
  keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.fold_in(rng, s[0]), s[1]))(seeds_Px2)
  put = lambda a, v: a.at[slots_P].set(v, mode="drop")
  state = SlotState(state.kv, put(state.hist_BxS, hist_PxS), put(state.tokens_B, last_P),
                    put(state.positions_B, lengths_P - 1), put(state.starts_B, starts_P),
                    put(state.remaining_B, remaining_P), put(state.active_B, remaining_P > 0),
                    put(state.keys_B, jax.random.key_data(keys)))
  return state._replace(**{k: _constrain(getattr(state, k), layout.slots) for k in SlotState._fields[1:]})


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
def stop_slots(layout: Layout, state: SlotState, stop_B):
  """The slots where stop_B (bool) is set stop decoding (the host took their trajectories out)."""
  return state._replace(active_B=_constrain(state.active_B & ~stop_B, layout.slots))


def _stop_hit(tokens_B, stop_ids: Tuple[int, ...]):
  hit = jnp.zeros(tokens_B.shape, bool)
  for i in stop_ids:
    hit |= tokens_B == i
  return hit


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4), donate_argnums=(6,))
def decode_chunk(backend, cfg: models.ModelConfig, scfg: SamplingConfig, layout: Layout, local_loops: bool, weights,
                 state: SlotState, table_BxM, stop_when_free):
  """Up to chunk_size decode steps in one while_loop. The host has given every active slot the pages of its
  positions up to the chunk's end.

  The loop also ends once `stop_when_free` (int32) slots are idle, so waiting work gets their slots
  without idling until the chunk's end.

  With `local_loops` (the weights replicated over the mesh), each shard of slots runs the loop on its own
  device (shard_map), and the shards agree on whether to go on (a sum of idle slots across devices) only
  every few steps (SYNC_STEPS_*): in between they decode independently and concurrently. Otherwise one loop
  runs over all slots (SPMD, tensor-parallel as the layout's rules say); its condition is reduced across
  devices every step.
  """
  if layout.slots is None or not local_loops:
    with nn.logical_axis_rules(layout.rules):
      state, out = _decode_loop(backend, cfg, scfg, weights, state, table_BxM, stop_when_free)
    return state._replace(kv=_constrain(state.kv, layout.kv),
                          **{k: _constrain(getattr(state, k), layout.slots) for k in SlotState._fields[1:]}), out
  slots = PartitionSpec(*layout.slots.spec)
  same = PartitionSpec()
  state_specs = SlotState(PartitionSpec(None, *layout.slots.spec), *([slots] * 7))
  local_loop = functools.partial(_decode_loop, backend, cfg, scfg, slot_axes=layout.slots.spec[0])
  loop = jax.shard_map(local_loop, mesh=layout.slots.mesh, in_specs=(same, state_specs, slots, same),
                       out_specs=(state_specs, slots), check_vma=False)  # the loop mixes per-shard and replicated values
  with nn.logical_axis_rules(()):  # each device runs the model on its own slots: nothing to split
    return loop(weights, state, table_BxM, stop_when_free)


# With one loop per slot shard: steps between the shards' agreements on stopping. A cross-device sum per
# step would make the devices wait on each other at every step. While work waits for free slots, they
# agree every 4 steps (a finished slot idles at most 3 steps longer than with a per-step check: refill
# keeps its pace); otherwise only the chunk's end or every slot finishing can stop the loop: every 16.
SYNC_STEPS_WORK_WAITING = 4
SYNC_STEPS_NONE_WAITING = 16


def _decode_loop(backend, cfg: models.ModelConfig, scfg: SamplingConfig, weights, state: SlotState, table_BxM,
                 stop_when_free, slot_axes=None):
  """decode_chunk's loop over the slots of `state`; inside shard_map when `slot_axes` (mesh axis names)
  is given, the local shard's loop."""
  B, S = state.hist_BxS.shape
  C = scfg.chunk_size
  keys_B = jax.random.wrap_key_data(state.keys_B)
  all_slots = B if slot_axes is None else B * jax.lax.axis_size(slot_axes)

  def cond(carry):
    i, active_B = carry[0], carry[6]
    idle = jnp.sum(~active_B, dtype=jnp.int32)
    if slot_axes is not None:  # over every shard
      idle = jax.lax.psum(idle, slot_axes)
    return (i < C) & (idle < all_slots) & (idle < stop_when_free)

  def body(carry):
    i, kv, hist_BxS, tokens_B, positions_B, remaining_B, active_B, reasons_B, out_tok, out_logp = carry
    write_B = jnp.where(active_B, positions_B, -1)  # inactive slots write nothing
    logits_BxV, stats, kv = backend.step(cfg, scfg, weights, kv, tokens_B, write_B, table_BxM)
    new_pos_B = positions_B + 1
    if scfg.greedy:
      new_B = stats.argmax_B
    else:
      new_B = select_tokens(logits_BxV, jax.vmap(jax.random.fold_in)(keys_B, new_pos_B), scfg)
    logp_B = logprobs_at(logits_BxV, stats, new_B)  # the unmodified policy: log pi_i
    # A select, not a scatter: each device writes its own slots' rows (a scatter's indices would be gathered).
    hist_BxS = jnp.where((jnp.arange(S) == new_pos_B[:, None]) & active_B[:, None], new_B[:, None], hist_BxS)
    remaining_B = remaining_B - 1
    reason_B = jnp.where(remaining_B <= 0, LIMIT, RUNNING)
    if scfg.repeat_ngram:
      count_B = newest_ngram_count(hist_BxS, state.starts_B, new_pos_B + 1, scfg.repeat_ngram)
      reason_B = jnp.where(count_B >= scfg.repeat_count, REPEAT, reason_B)
    reason_B = jnp.where(_stop_hit(new_B, scfg.stop_ids), EOS, reason_B)
    reasons_B = jnp.where(active_B, reason_B, reasons_B)
    out_tok = out_tok.at[:, i].set(jnp.where(active_B, new_B, -1))
    out_logp = out_logp.at[:, i].set(jnp.where(active_B, logp_B, 0.0))
    tokens_B = jnp.where(active_B, new_B, tokens_B)
    positions_B = jnp.where(active_B, new_pos_B, positions_B)
    active_B = active_B & (reason_B == RUNNING)
    return (i + 1, kv, hist_BxS, tokens_B, positions_B, jnp.where(active_B, remaining_B, 0), active_B, reasons_B,
            out_tok, out_logp)

  if slot_axes is not None:
    step = body
    work_waiting = stop_when_free <= all_slots
    sync_steps = jnp.where(work_waiting, SYNC_STEPS_WORK_WAITING, SYNC_STEPS_NONE_WAITING)

    def body(carry):  # sync_steps steps (fewer at the chunk's end) between agreements
      stop = jnp.minimum(carry[0] + sync_steps, C)
      return jax.lax.while_loop(lambda c: c[0] < stop, step, carry)

  carry = (jnp.int32(0), state.kv, state.hist_BxS, state.tokens_B, state.positions_B, state.remaining_B,
           state.active_B, jnp.zeros((B,), jnp.int32), jnp.full((B, C), -1, jnp.int32), jnp.zeros((B, C), jnp.float32))
  (steps, kv, hist_BxS, tokens_B, positions_B, remaining_B, active_B, reasons_B, out_tok,
   out_logp) = jax.lax.while_loop(cond, body, carry)
  state = SlotState(kv, hist_BxS, tokens_B, positions_B, state.starts_B, remaining_B, active_B, state.keys_B)
  return state, ChunkOutput(out_tok, out_logp, reasons_B, steps[None])
