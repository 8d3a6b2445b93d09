"""Pure functions over param pytrees: the public face of the model.

The policy and the reference are the same functions with two param trees.
"""
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from k15.models.config import ModelConfig
from k15.models.transformer import KVCache, Transformer


def _default_positions(tokens_BxT):
  return jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1], dtype=jnp.int32), tokens_BxT.shape)


def _boxed_init(cfg: ModelConfig, rng):
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Transformer(cfg).init(rng, tokens, _default_positions(tokens))["params"]


@functools.partial(jax.jit, static_argnums=0)  # eager flax scan init would recompile on every call
def init_params(cfg: ModelConfig, rng: jax.Array):
  """Random params as a plain pytree of arrays (logical axes are in `param_logical_axes`)."""
  return nn.meta.unbox(_boxed_init(cfg, rng))


def param_logical_axes(cfg: ModelConfig):
  """A pytree like the params whose leaves are PartitionSpecs of logical axis names."""
  abstract = jax.eval_shape(lambda: _boxed_init(cfg, jax.random.PRNGKey(0)))
  return nn.get_partition_spec(abstract)


def abstract_params(cfg: ModelConfig):
  """ShapeDtypeStructs of the params, without allocating them."""
  return nn.meta.unbox(jax.eval_shape(lambda: _boxed_init(cfg, jax.random.PRNGKey(0))))


def forward(cfg: ModelConfig, params, tokens_BxT, positions_BxT: Optional[jax.Array] = None):
  """Float32 logits_BxTxV of a causal full-sequence pass."""
  if positions_BxT is None:
    positions_BxT = _default_positions(tokens_BxT)
  logits, _ = Transformer(cfg).apply({"params": params}, tokens_BxT, positions_BxT)
  return logits


def forward_with_cache(cfg: ModelConfig, params, tokens_BxT, positions_BxT, cache: KVCache):
  """Logits of tokens written into `cache` at their absolute positions, and the updated cache.

  Each token attends to every cached position <= its own, so slots of a batch may sit at different
  lengths; positions past the cache length are dropped (never written).
  """
  return Transformer(cfg).apply({"params": params}, tokens_BxT, positions_BxT, cache)


def logprobs_of(logits_BxTxV, targets_BxT):
  """log softmax(logits)[target], float32.

  jax.nn.log_softmax's arithmetic (shift by the max, subtract the log-sum-exp), taken at the target
  only: no full-size log-softmax array is written.
  """
  logits = logits_BxTxV.astype(jnp.float32)
  shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  log_sum_exp = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
  return jnp.take_along_axis(shifted, targets_BxT[..., None], axis=-1)[..., 0] - log_sum_exp


def token_logprobs(cfg: ModelConfig, params, tokens_BxT, positions_BxT: Optional[jax.Array] = None):
  """Per-token log-probs of tokens[:, 1:] given their prefixes: shape Bx(T-1), float32."""
  logits = forward(cfg, params, tokens_BxT[:, :-1],
                   None if positions_BxT is None else positions_BxT[:, :-1])
  return logprobs_of(logits, tokens_BxT[:, 1:])
