"""A decoder-only transformer (Llama / Qwen2 families) in flax.linen, used through pure functions.

Every param carries logical axis names; `k15.sharding` maps them to mesh axes. Layers are stacked with
`nn.scan` (leading 'layers' axis), so compile time does not grow with depth and the KV cache is one
array per k and v: `LxBxSxKxH`.

The same code serves training (full causal sequence) and sampling (a KV cache written at each token's
absolute position, so every slot of a batch can sit at its own length).
"""
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from k15.models.config import ModelConfig


class KVCache(NamedTuple):
  """Keys and values for every layer, indexed by absolute position: k_LxBxSxKxH, v_LxBxSxKxH."""
  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, length: int) -> "KVCache":
    shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
    return cls(jnp.zeros(shape, cfg.jnp_dtype), jnp.zeros(shape, cfg.jnp_dtype))


KV_CACHE_LOGICAL_AXES = ("layers", "cache_batch", "cache_seq", "kv_heads", "head_dim")


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


def rotary(x_BxTxNxH, positions_BxT, theta: float):
  """Rotary embedding in the HF 'rotate_half' layout (first half / second half of head_dim)."""
  H = x_BxTxNxH.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
  angles_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq
  cos, sin = jnp.cos(angles_BxTxH2)[:, :, None, :], jnp.sin(angles_BxTxH2)[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


def attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS):
  """Grouped-query attention; softmax in float32."""
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxSxKxH.shape[2]
  q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
  scores = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32)
  scores = scores * (H ** -0.5)
  scores = jnp.where(mask_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxH.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BxSxKxH)
  return out.reshape(B, T, N, H)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, cache_kv):
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

    q = rotary(proj("q", N, "heads"), positions_BxT, cfg.rope_theta)
    k = rotary(proj("k", K, "kv_heads"), positions_BxT, cfg.rope_theta)
    v = proj("v", K, "kv_heads")

    if cache_kv is None:  # full causal sequence
      k_all, v_all = k, v
      key_positions = positions_BxT
    else:  # write at each token's absolute position, attend over the whole cache
      cache_k, cache_v = cache_kv
      b_idx = jnp.arange(x_BxTxD.shape[0])[:, None]
      k_all = cache_k.at[b_idx, positions_BxT].set(k.astype(cache_k.dtype), mode="drop")
      v_all = cache_v.at[b_idx, positions_BxT].set(v.astype(cache_v.dtype), mode="drop")
      key_positions = jnp.broadcast_to(jnp.arange(k_all.shape[1]), (x_BxTxD.shape[0], k_all.shape[1]))
      cache_kv = (k_all, v_all)
    mask_BxTxS = key_positions[:, None, :] <= positions_BxT[:, :, None]
    out = attend(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask_BxTxS)
    o_kernel = param("o_kernel", (N, H, D), ("heads", "head_dim", "embed"), _dense_init(N * H))
    out = jnp.einsum("btnh,nhd->btd", out, o_kernel.astype(cfg.jnp_dtype))
    return out, cache_kv


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

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, cache_kv):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.jnp_param_dtype, cfg.jnp_dtype, name=name)
    h, cache_kv = Attention(cfg, name="attn")(norm("attn_norm")(x_BxTxD), positions_BxT, cache_kv)
    x_BxTxD = x_BxTxD + h
    x_BxTxD = x_BxTxD + MLP(cfg, name="mlp")(norm("mlp_norm")(x_BxTxD))
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("activation_batch", "activation_length", "activation_embed"))
    return x_BxTxD, cache_kv


class Transformer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, cache: Optional[KVCache] = None):
    cfg = self.cfg
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                     embedding_init=nn.with_logical_partitioning(_dense_init(cfg.d_model), ("vocab", "embed")),
                     name="embed")
    x_BxTxD = embed(tokens_BxT)  # std d_model**-0.5 init: tied logits start near unit scale
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("activation_batch", "activation_length", "activation_embed"))

    block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
    layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast, 0), length=cfg.n_layers,
                     metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
    cache_kv = None if cache is None else (cache.k, cache.v)
    x_BxTxD, cache_kv = layers(x_BxTxD, positions_BxT, cache_kv)

    x_BxTxD = RMSNorm(cfg.rms_norm_eps, cfg.jnp_param_dtype, cfg.jnp_dtype, name="final_norm")(x_BxTxD)
    if cfg.tie_embeddings:
      logits = embed.attend(x_BxTxD)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                        kernel_init=nn.with_logical_partitioning(_dense_init(cfg.d_model), ("embed", "vocab")),
                        name="lm_head")(x_BxTxD)
    logits_BxTxV = logits.astype(jnp.float32)
    return logits_BxTxV, (None if cache is None else KVCache(*cache_kv))
