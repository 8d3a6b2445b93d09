"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

The configuration is static, so each path compiles only what it uses: greedy is one argmax and plain
temperature sampling needs no sort; only top-p sorts the (top-k) candidates.
"""
import jax
import jax.numpy as jnp

from k15.sampling.config import SamplingConfig


def select_tokens(logits_BxV, keys_B, scfg: SamplingConfig):
  """Next token per row (int32). keys_B: one PRNG key per row (typed key array); unused when greedy."""
  if scfg.greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV.astype(jnp.float32) / scfg.temperature
  V = logits_BxV.shape[-1]
  use_top_k = 0 < scfg.top_k < V
  if not use_top_k and scfg.top_p >= 1.0:
    return jax.vmap(jax.random.categorical)(keys_B, logits_BxV).astype(jnp.int32)
  # Candidates in descending order: the top k, or the whole vocabulary when only top-p is on.
  vals_BxC, idx_BxC = jax.lax.top_k(logits_BxV, scfg.top_k if use_top_k else V)
  if scfg.top_p < 1.0:
    probs_BxC = jax.nn.softmax(vals_BxC, axis=-1)
    mass_before_BxC = jnp.cumsum(probs_BxC, axis=-1) - probs_BxC
    # Keep a token while the mass before it is short of top_p: the smallest set reaching top_p.
    vals_BxC = jnp.where(mass_before_BxC < scfg.top_p, vals_BxC, -jnp.inf)
  choice_B = jax.vmap(jax.random.categorical)(keys_B, vals_BxC)
  return jnp.take_along_axis(idx_BxC, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
