"""Pure functions over param pytrees: the public face of the model.

The policy and the reference are the same functions with two param trees.
"""
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from k15.models.config import ModelConfig
from k15.models.transformer import PagedCache, Transformer


def _default_positions(tokens_BxT):
  return jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1], dtype=jnp.int32), tokens_BxT.shape)


def _boxed_init(cfg: ModelConfig, rng):
  tokens = jnp.zeros((1, 1), jnp.int32)
  with nn.logical_axis_rules(()):  # a 1x1 batch: no activation layout to ask for, whatever the caller's rules
    return Transformer(cfg).init(rng, tokens, _default_positions(tokens))["params"]


@functools.partial(jax.jit, static_argnums=0)  # eager flax scan init would recompile on every call
def init_params(cfg: ModelConfig, rng: jax.Array):
  """Random params as a plain pytree of arrays (logical axes are in `param_logical_axes`)."""
  return nn.meta.unbox(_boxed_init(cfg, rng))


@functools.lru_cache(maxsize=None)  # a trace of the model's init: engines and plans ask for it often
def param_logical_axes(cfg: ModelConfig):
  """A pytree like the params whose leaves are PartitionSpecs of logical axis names."""
  abstract = jax.eval_shape(lambda: _boxed_init(cfg, jax.random.PRNGKey(0)))
  return nn.get_partition_spec(abstract)


@functools.lru_cache(maxsize=None)
def abstract_params(cfg: ModelConfig):
  """ShapeDtypeStructs of the params, without allocating them."""
  with nn.logical_axis_rules(()):  # shapes only: no layout to apply
    return jax.eval_shape(lambda: nn.meta.unbox(_boxed_init(cfg, jax.random.PRNGKey(0))))


def forward(cfg: ModelConfig, params, tokens_BxT, positions_BxT: Optional[jax.Array] = None):
  """Float32 logits_BxTxV of a causal full-sequence pass."""
  if positions_BxT is None:
    positions_BxT = _default_positions(tokens_BxT)
  logits, _ = Transformer(cfg).apply({"params": params}, tokens_BxT, positions_BxT)
  return logits


def kv_pages_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple:
  """Shape of the paged KV cache of every layer, kv_LxPxZxCxH (`k15.models.attention`)."""
  return (cfg.n_layers, num_pages, page_size, 2 * cfg.n_kv_heads, cfg.head_dim)


def forward_paged(cfg: ModelConfig, params, tokens_RxT, positions_RxT, cache: PagedCache, *, logits: bool = True,
                  impl: str = "auto", pages_per_block: int = 16, unroll: int = 1):
  """A paged pass: each row's tokens (position < 0: padding) are written into the cache at their positions and
  attend over their row's cached positions up to their own. Returns (float32 logits_RxTxV, or None without
  `logits`; the updated cache).

  Rows are decode slots (T = 1) or prefill chunks; the rows of one sequence may share a call (all their keys
  and values are written before any attends). impl, pages_per_block: `k15.models.attention.paged_attention`'s;
  unroll: layers per iteration of the layer loop.
  """
  model = Transformer(cfg, paged_impl=impl, pages_per_block=pages_per_block, unroll=unroll)
  return model.apply({"params": params}, tokens_RxT, positions_RxT, cache, logits)


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
