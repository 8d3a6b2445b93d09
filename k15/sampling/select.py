"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

The configuration is static, so each path compiles only what it uses: greedy is one argmax and plain
temperature sampling needs no sort; only top-p sorts the (top-k) candidates.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

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


def logit_stats(logits_BxV) -> LogitStats:
  """The stats in XLA; the native decode step returns the same from its own pass over the logits."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  max_B = jnp.max(logits_BxV, axis=-1)
  lse_B = jnp.log(jnp.sum(jnp.exp(logits_BxV - max_B[:, None]), axis=-1))
  return LogitStats(first_argmax(logits_BxV), max_B, lse_B)


def logprobs_at(logits_BxV, stats: LogitStats, tokens_B):
  """log softmax(logits)[token] per row: `k15.models.logprobs_of`'s arithmetic, from the stats."""
  picked_B = jnp.take_along_axis(logits_BxV.astype(jnp.float32), tokens_B[:, None], axis=-1)[:, 0]
  return (picked_B - stats.max_B) - stats.lse_B


def _categorical(key, logits_V):
  """jax.random.categorical(key, logits_V): the same Gumbel draws, and first_argmax for its argmax."""
  return first_argmax(jax.random.gumbel(key, logits_V.shape, logits_V.dtype) + logits_V)


def select_tokens(logits_BxV, keys_B, scfg: SamplingConfig):
  """Next token per row (int32). keys_B: one PRNG key per row (typed key array); unused when greedy."""
  if scfg.greedy:
    return first_argmax(logits_BxV)
  logits_BxV = logits_BxV.astype(jnp.float32) / scfg.temperature
  V = logits_BxV.shape[-1]
  use_top_k = 0 < scfg.top_k < V
  if not use_top_k and scfg.top_p >= 1.0:
    return jax.vmap(_categorical)(keys_B, logits_BxV)
  # Candidates in descending order: the top k, or the whole vocabulary when only top-p is on.
  vals_BxC, idx_BxC = jax.lax.top_k(logits_BxV, scfg.top_k if use_top_k else V)
  if scfg.top_p < 1.0:
    probs_BxC = jax.nn.softmax(vals_BxC, axis=-1)
    mass_before_BxC = jnp.cumsum(probs_BxC, axis=-1) - probs_BxC
    # Keep a token while the mass before it is short of top_p: the smallest set reaching top_p.
    vals_BxC = jnp.where(mass_before_BxC < scfg.top_p, vals_BxC, -jnp.inf)
  choice_B = jax.vmap(_categorical)(keys_B, vals_BxC)
  return jnp.take_along_axis(idx_BxC, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
