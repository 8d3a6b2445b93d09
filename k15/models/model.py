"""Pure functions over param pytrees: the public face of the model.

The policy and the reference are the same functions with two param trees.
"""
import functools
from typing import Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from k15.models.attention import segment_positions
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


def forward(cfg: ModelConfig, params, tokens_BxT, segments_BxT: Optional[jax.Array] = None):
  """Float32 logits_BxTxV of a causal full-sequence pass. segments_BxT: the sample of each token of packed rows
  (each sample attends within itself, from position 0); None: one sequence per row."""
  logits, _ = Transformer(cfg).apply({"params": params}, tokens_BxT, _positions(tokens_BxT, segments_BxT),
                                     segments_BxT=segments_BxT)
  return logits


def _positions(tokens_BxT, segments_BxT):
  return _default_positions(tokens_BxT) if segments_BxT is None else segment_positions(segments_BxT)


def hidden_states(cfg: ModelConfig, params, tokens_BxT, segments_BxT: Optional[jax.Array] = None):
  """The last layer's final-normed hidden states x_BxTxD of a causal full-sequence pass (what the output head reads;
  a value head reads them too)."""
  x_BxTxD, _ = Transformer(cfg).apply({"params": params}, tokens_BxT, _positions(tokens_BxT, segments_BxT),
                                      logits=False, segments_BxT=segments_BxT)
  return x_BxTxD


def kv_pages_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple:
  """Shape of the paged KV cache of every layer, kv_LxPxZxCxH (`k15.models.attention`)."""
  return (cfg.n_layers, num_pages, page_size, 2 * cfg.n_kv_heads, cfg.head_dim)


def unstack_layers(cfg: ModelConfig, params):
  """The params (or a tree shaped like them: shardings, abstract arrays) with the layer stack's slices apart, as
  `layers_0`, `layers_1`, ...: the tree `forward_paged(..., unstacked=True)` reads."""
  def layer(x, i):
    if isinstance(x, jax.sharding.NamedSharding):
      return jax.sharding.NamedSharding(x.mesh, jax.sharding.PartitionSpec(*x.spec[1:]))
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=x.sharding and layer(x.sharding, i))
    return x[i]
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(cfg.n_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda x: layer(x, i), params["layers"])
  return out


def forward_paged(cfg: ModelConfig, params, tokens_RxT, positions_RxT, cache: PagedCache, *, logits: bool = True,
                  impl: Union[str, Callable] = "auto", pages_per_block: int = 16, unstacked: bool = False):
  """A paged pass: each row's tokens (position < 0: padding) are written into the cache at their positions and
  attend over their row's cached positions up to their own. Returns (float32 logits_RxTxV, or None without
  `logits`; the updated cache).

  Rows are decode slots (T = 1) or prefill chunks; the rows of one sequence may share a call (all their keys
  and values are written before any attends). impl, pages_per_block: `k15.models.attention.paged_attention`'s;
  unstacked: the params are `unstack_layers`'s (no loop over the layers).
  """
  model = Transformer(cfg, paged_impl=impl, pages_per_block=pages_per_block, scan_layers=not unstacked)
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


def output_head(cfg: ModelConfig, params):
  """The logits projection, DxV: the embedding's transpose when tied."""
  return params["embed"]["embedding"].T if cfg.tie_embeddings else params["lm_head"]["kernel"]


def head_logprobs(h_BxTxD, head_DxV, targets_BxT, chunk: int):
  """logprobs_of(h @ head, targets) for `chunk` positions at a time (0: all at once), each chunk's logits recomputed
  in the backward pass instead of kept: the peak is one chunk's B x chunk x V logits, not B x T x V."""
  T = h_BxTxD.shape[1]
  logprobs = lambda h, t: logprobs_of(h @ head_DxV.astype(h.dtype), t)
  if not chunk or chunk >= T:
    return logprobs(h_BxTxD, targets_BxT)
  n = -(-T // chunk)
  h = jnp.pad(h_BxTxD, ((0, 0), (0, n * chunk - T), (0, 0)))
  t = jnp.pad(targets_BxT, ((0, 0), (0, n * chunk - T)))
  split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 1, 0)  # chunks first
  out = jax.lax.map(lambda ht: jax.checkpoint(logprobs)(*ht), (split(h), split(t)))  # n x B x chunk
  return jnp.moveaxis(out, 0, 1).reshape(h.shape[0], n * chunk)[:, :T]


def token_logprobs(cfg: ModelConfig, params, tokens_BxT, segments_BxT: Optional[jax.Array] = None):
  """Per-token log-probs of tokens[:, 1:] given their prefixes: shape Bx(T-1), float32 (at a packed row's sample
  boundaries: garbage, outside every sample's mask). The logits come cfg.logprob_chunk positions at a time."""
  inputs, segments = tokens_BxT[:, :-1], None if segments_BxT is None else segments_BxT[:, :-1]
  h_BxTxD, _ = Transformer(cfg).apply({"params": params}, inputs, _positions(inputs, segments), logits=False,
                                      segments_BxT=segments)
  return head_logprobs(h_BxTxD, output_head(cfg, params), tokens_BxT[:, 1:], cfg.logprob_chunk)
