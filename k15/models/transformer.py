"""A decoder-only transformer (Llama / Qwen2 families) in flax.linen, used through pure functions.

Every param carries logical axis names; `k15.sharding` maps them to mesh axes. Layers are stacked with
`nn.scan` (leading 'layers' axis), so compile time does not grow with depth.

Two modes of the same layers: a full causal pass over whole sequences (training, reference log-probs), and a paged
pass (sampling) whose rows (decode slots, or prefill chunks of sequences) write their keys and values into a paged
KV cache and attend over their sequences' cached positions (`k15.models.attention.paged_attention`).
"""
from typing import Callable, NamedTuple, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from k15.models import rope
from k15.models.attention import causal_attention, paged_attention
from k15.models.config import ModelConfig


class PagedCache(NamedTuple):
  """What a paged pass reads and writes: the cache of every layer and the pages of each row's sequence."""
  kv_LxPxZxCxH: jax.Array  # the paged KV cache (`k15.models.attention`)
  page_table_RxM: jax.Array  # int32 row r's position p is at page [r, p // Z]


def _dense_init(fan_in: int):
  return nn.initializers.normal(stddev=fan_in ** -0.5)


class RMSNorm(nn.Module):
  eps: float
  param_dtype: jnp.dtype
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)  # HF order: cast, then scale


def rotary(x_BxTxNxH, positions_BxT, cfg: ModelConfig):
  """Rotary embedding in the HF 'rotate_half' layout (first half / second half of head_dim), with the config's
  rope scaling (`k15.models.rope`)."""
  cos, sin = rope.rotary_cos_sin(cfg, positions_BxT)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


class Attention(nn.Module):
  cfg: ModelConfig
  paged_impl: Union[str, Callable] = "auto"  # `paged_attention`'s impl
  pages_per_block: int = 16  # `paged_attention_xla`'s work block

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segments_BxT, layer, paged: Optional[PagedCache]):
    cfg = self.cfg
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def param(name, shape, axes, init):
      return self.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.jnp_param_dtype)

    def proj(name, heads, axes):
      kernel = param(f"{name}_kernel", (D, heads, H), ("embed", axes, "head_dim"), _dense_init(D))
      out = jnp.einsum("btd,dnh->btnh", x_BxTxD, kernel.astype(cfg.jnp_dtype))
      if cfg.qkv_bias:
        out = out + param(f"{name}_bias", (heads, H), (axes, "head_dim"), nn.initializers.zeros).astype(cfg.jnp_dtype)
      return out

    q = rotary(proj("q", N, "heads"), positions_BxT, cfg)
    k = rotary(proj("k", K, "kv_heads"), positions_BxT, cfg)
    v = proj("v", K, "kv_heads")

    if paged is None:  # full causal sequences (packed rows: within each segment)
      out = causal_attention(q, k, v, segments_BxT, cfg.attention, cfg.attention_block)
    else:
      out, kv = paged_attention(q, k, v, paged.kv_LxPxZxCxH, layer, paged.page_table_RxM, positions_BxT,
                                self.paged_impl, self.pages_per_block)
      paged = paged._replace(kv_LxPxZxCxH=kv)
    o_kernel = param("o_kernel", (N, H, D), ("heads", "head_dim", "embed"), _dense_init(N * H))
    out = jnp.einsum("btnh,nhd->btd", out, o_kernel.astype(cfg.jnp_dtype))
    return out, paged


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.cfg

    def dense(name, features, axes, fan_in, x):
      return nn.Dense(features, use_bias=False, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                      kernel_init=nn.with_logical_partitioning(_dense_init(fan_in), axes), name=name)(x)

    gate = dense("gate", cfg.d_ff, ("embed", "mlp"), cfg.d_model, x_BxTxD)
    up = dense("up", cfg.d_ff, ("embed", "mlp"), cfg.d_model, x_BxTxD)
    h_BxTxF = nn.with_logical_constraint(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
    return dense("down", cfg.d_model, ("mlp", "embed"), cfg.d_ff, h_BxTxF)


class Block(nn.Module):
  cfg: ModelConfig
  paged_impl: Union[str, Callable] = "auto"
  pages_per_block: int = 16

  @nn.compact
  def __call__(self, carry, layer, positions_BxT, segments_BxT):
    """carry: (x_BxTxD, the PagedCache or None); layer: this layer's index (the paged cache's layer)."""
    cfg = self.cfg
    x_BxTxD, paged = carry
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.jnp_param_dtype, cfg.jnp_dtype, name=name)
    h, paged = Attention(cfg, self.paged_impl, self.pages_per_block, name="attn")(
        norm("attn_norm")(x_BxTxD), positions_BxT, segments_BxT, layer, paged)
    x_BxTxD = x_BxTxD + h
    x_BxTxD = x_BxTxD + MLP(cfg, name="mlp")(norm("mlp_norm")(x_BxTxD))
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("activation_batch", "activation_length", "activation_embed"))
    return (x_BxTxD, paged), None


class Transformer(nn.Module):
  """Full causal pass (paged=None; segments_BxT: the samples of packed rows, None: one per row) or paged pass.
  `logits=False` returns the final hidden states instead of the logits (a full pass: for tiled log-probs) or none
  (a paged pass: prefill needs only the cache). `scan_layers=False`: the layers' params apart, as `layers_0`,
  `layers_1`, ... (`unstack_layers`), each layer read in place where a loop over the stack copies its slice of
  every weight."""
  cfg: ModelConfig
  paged_impl: Union[str, Callable] = "auto"
  pages_per_block: int = 16
  scan_layers: bool = True

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, paged: Optional[PagedCache] = None, logits: bool = True,
               segments_BxT=None):
    cfg = self.cfg
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                     embedding_init=nn.with_logical_partitioning(_dense_init(cfg.d_model), ("vocab", "embed")),
                     name="embed")
    x_BxTxD = embed(tokens_BxT)  # std d_model**-0.5 init: tied logits start near unit scale
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("activation_batch", "activation_length", "activation_embed"))

    block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
    if self.scan_layers:
      layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(0, nn.broadcast, nn.broadcast), length=cfg.n_layers,
                       metadata_params={nn.PARTITION_NAME: "layers"})(cfg, self.paged_impl, self.pages_per_block,
                                                                       name="layers")
      (x_BxTxD, paged), _ = layers((x_BxTxD, paged), jnp.arange(cfg.n_layers), positions_BxT, segments_BxT)
    else:
      for layer in range(cfg.n_layers):
        (x_BxTxD, paged), _ = block(cfg, self.paged_impl, self.pages_per_block, name=f"layers_{layer}")(
            (x_BxTxD, paged), layer, positions_BxT, segments_BxT)
    if not logits and paged is not None:
      return None, paged

    x_BxTxD = RMSNorm(cfg.rms_norm_eps, cfg.jnp_param_dtype, cfg.jnp_dtype, name="final_norm")(x_BxTxD)
    if not logits:
      return x_BxTxD, None
    if cfg.tie_embeddings:
      logits_BxTxV = embed.attend(x_BxTxD)
    else:
      logits_BxTxV = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                              kernel_init=nn.with_logical_partitioning(_dense_init(cfg.d_model), ("embed", "vocab")),
                              name="lm_head")(x_BxTxD)
    logits_BxTxV = nn.with_logical_constraint(logits_BxTxV.astype(jnp.float32),
                                              ("activation_batch", "activation_length", "activation_vocab"))
    return logits_BxTxV, paged
