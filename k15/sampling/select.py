"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

The configuration is static, so each path compiles only what it uses: greedy is one argmax and plain
temperature sampling a Gumbel-max over the vocabulary; top-k and top-p look at candidates only. Every reduction
over the vocabulary (max, sum, argmax, the candidates) is a reduction XLA splits over a vocab-sharded mesh axis
and combines per shard: the logits of all slots are never gathered whole.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from k15 import sharding
from k15.sampling.config import SamplingConfig


def first_argmax(x_BxV):
  """jnp.argmax over the last axis (the first index of each row's maximum; V - 1 for a row with NaN).

  Two plain reductions (max, then the least index holding it): XLA's CPU argmax is a variadic
  (value, index) reduce that does not vectorize, far slower than these at decode's shapes.
  """
  V = x_BxV.shape[-1]
  is_max_BxV = x_BxV == jnp.max(x_BxV, axis=-1, keepdims=True)
  first_B = jnp.min(jnp.where(is_max_BxV, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
  return jnp.minimum(first_B, V - 1)


class LogitStats(NamedTuple):
  """Per row of logits, what the sampling loop needs besides the logits themselves."""
  argmax_B: jax.Array  # int32 first_argmax: the greedy token
  max_B: jax.Array  # float32 the largest logit
  lse_B: jax.Array  # float32 log sum exp(logits - max): with max, the log-softmax normalizer


def _log_sum_exp(x_BxV, max_B):
  return jnp.log(jnp.sum(jnp.exp(x_BxV - max_B[:, None]), axis=-1))


def logit_stats(logits_BxV) -> LogitStats:
  logits_BxV = logits_BxV.astype(jnp.float32)
  max_B = jnp.max(logits_BxV, axis=-1)
  return LogitStats(first_argmax(logits_BxV), max_B, _log_sum_exp(logits_BxV, max_B))


def logprobs_at(logits_BxV, stats: LogitStats, tokens_B):
  """log softmax(logits)[token] per row: `k15.models.logprobs_of`'s arithmetic, from the stats."""
  picked_B = jnp.take_along_axis(logits_BxV.astype(jnp.float32), tokens_B[:, None], axis=-1)[:, 0]
  return (picked_B - stats.max_B) - stats.lse_B


def _categorical(key, logits_V):
  """jax.random.categorical(key, logits_V): the same Gumbel draws, and first_argmax for its argmax."""
  return first_argmax(jax.random.gumbel(key, logits_V.shape, logits_V.dtype) + logits_V)


def top_candidates(x_BxV, k: int):
  """lax.top_k(x, k) (values descending, then indices) without a sort of the vocabulary: each vocab shard of the
  mesh in context takes its own top k, and the top k of those candidates are the whole row's."""
  B, V = x_BxV.shape
  shards = 1
  for axis in sharding.context_mesh_axes("activation_vocab", V):
    shards *= jax.sharding.get_abstract_mesh().shape[axis]
  if shards == 1:
    return jax.lax.top_k(x_BxV, k)
  per_shard = min(k, V // shards)
  vals, idx = jax.lax.top_k(x_BxV.reshape(B, shards, V // shards), per_shard)  # a top k of each shard's slice
  idx = idx + (jnp.arange(shards) * (V // shards))[None, :, None]
  vals, pick = jax.lax.top_k(vals.reshape(B, -1), k)
  return vals, jnp.take_along_axis(idx.reshape(B, -1), pick, axis=1)


def select_tokens(logits_BxV, keys_B, scfg: SamplingConfig):
  """Next token per row (int32). keys_B: one PRNG key per row (typed key array); unused when greedy.

  top-k keeps the k most likely tokens; top-p then keeps the smallest most-likely set whose mass (renormalized
  over the top k when top_k is on, as transformers' warpers do) reaches top_p. Without top-k, the nucleus is
  looked for among the `scfg.nucleus_candidates` most likely tokens: exact whenever they hold at least top_p of
  the mass (their own share otherwise: the draw then stays among them).
  """
  if scfg.greedy:
    return first_argmax(logits_BxV)
  logits_BxV = logits_BxV.astype(jnp.float32) / scfg.temperature
  V = logits_BxV.shape[-1]
  use_top_k = 0 < scfg.top_k < V
  if not use_top_k and scfg.top_p >= 1.0:
    return jax.vmap(_categorical)(keys_B, logits_BxV)
  vals_BxC, idx_BxC = top_candidates(logits_BxV, scfg.top_k if use_top_k else min(scfg.nucleus_candidates, V))
  if scfg.top_p < 1.0:
    if use_top_k:
      probs_BxC = jax.nn.softmax(vals_BxC, axis=-1)
    else:  # mass of the whole vocabulary
      max_B = jnp.max(logits_BxV, axis=-1)
      probs_BxC = jnp.exp(vals_BxC - (max_B + _log_sum_exp(logits_BxV, max_B))[:, None])
    mass_before_BxC = jnp.cumsum(probs_BxC, axis=-1) - probs_BxC
    # Keep a token while the mass before it is short of top_p: the smallest set reaching top_p.
    vals_BxC = jnp.where(mass_before_BxC < scfg.top_p, vals_BxC, -jnp.inf)
  choice_B = jax.vmap(_categorical)(keys_B, vals_BxC)
  return jnp.take_along_axis(idx_BxC, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
