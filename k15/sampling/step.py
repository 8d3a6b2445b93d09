"""One decode step (one token per slot) of the k15 transformer, over a decode-friendly KV cache.

`k15.models.forward_with_cache` is the reference (tests check this step against it, logit for logit);
it serves prefill as is. For decode it is slow on CPU: its layer scan copies every layer's cache slice
in and out each step and its attention transposes the cache. Here each layer's cache is its own buffer,
written in place at one position per slot, in the layouts the two attention matmuls read without a
transpose: keys BxKxHxS (q.k contracts H against a row-major HxS block), values BxKxSxH. The norms, MLP
and rotary embedding are the model's own modules.
"""
from typing import Tuple

import jax
import jax.numpy as jnp

from k15.models import ModelConfig
from k15.models.transformer import MLP, RMSNorm, rotary

# Per layer: a BxKxHxS key buffer, or a BxKxSxH value buffer.
LayerCaches = Tuple[jax.Array, ...]


def _norm(cfg: ModelConfig, scale, x):
  return RMSNorm(cfg.rms_norm_eps, cfg.jnp_param_dtype, cfg.jnp_dtype).apply({"params": {"scale": scale}}, x)


def _proj(cfg: ModelConfig, attn, name, x_BxD):
  out_BxNxH = jnp.einsum("bd,dnh->bnh", x_BxD, attn[f"{name}_kernel"].astype(cfg.jnp_dtype))
  if cfg.qkv_bias:
    out_BxNxH = out_BxNxH + attn[f"{name}_bias"].astype(cfg.jnp_dtype)
  return out_BxNxH


def _attend(cfg: ModelConfig, q_BxNxH, k_BxKxHxS, v_BxKxSxH, positions_B):
  """Grouped-query attention of one query per slot over cached positions <= its own (float32 softmax)."""
  B, N, H = q_BxNxH.shape
  K, S = k_BxKxHxS.shape[1], k_BxKxHxS.shape[3]
  q_BxKxGxH = q_BxNxH.reshape(B, K, N // K, H)
  scores = jnp.einsum("bkgh,bkhs->bkgs", q_BxKxGxH, k_BxKxHxS, preferred_element_type=jnp.float32)
  scores = scores * (H ** -0.5)
  mask_BxS = jnp.arange(S)[None, :] <= positions_B[:, None]
  scores = jnp.where(mask_BxS[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxKxSxH.dtype)
  return jnp.einsum("bkgs,bksh->bkgh", probs, v_BxKxSxH).reshape(B, N, H)


def split_layers(params):
  """Per-layer param trees. Split once outside a decode loop: slicing inside it copies every weight each step."""
  n_layers = jax.tree.leaves(params["layers"])[0].shape[0]
  return [jax.tree.map(lambda a, l=l: a[l], params["layers"]) for l in range(n_layers)]


def decode_step(cfg: ModelConfig, params, cache_k: LayerCaches, cache_v: LayerCaches, tokens_B, positions_B,
                layers=None):
  """Logits (float32 BxV) of each slot's token at its position, and the caches with its k/v written.

  A position >= the cache length is not written (inactive slots use that); its logits are garbage.
  `layers`: `split_layers(params)`, hoisted out of the caller's loop.
  """
  dtype = cfg.jnp_dtype
  layers = split_layers(params) if layers is None else layers
  b_idx = jnp.arange(tokens_B.shape[0])
  pos_Bx1 = positions_B[:, None]
  x_BxD = params["embed"]["embedding"][tokens_B].astype(dtype)
  cache_k, cache_v = list(cache_k), list(cache_v)
  for l, p in enumerate(layers):  # unrolled: each layer's cache stays a separate buffer, updated in place
    h_BxD = _norm(cfg, p["attn_norm"]["scale"], x_BxD)
    q = rotary(_proj(cfg, p["attn"], "q", h_BxD)[:, None], pos_Bx1, cfg.rope_theta)[:, 0]
    k = rotary(_proj(cfg, p["attn"], "k", h_BxD)[:, None], pos_Bx1, cfg.rope_theta)[:, 0]
    v = _proj(cfg, p["attn"], "v", h_BxD)
    cache_k[l] = cache_k[l].at[b_idx, :, :, positions_B].set(k.astype(cache_k[l].dtype), mode="drop")
    cache_v[l] = cache_v[l].at[b_idx, :, positions_B].set(v.astype(cache_v[l].dtype), mode="drop")
    out_BxNxH = _attend(cfg, q, cache_k[l].astype(dtype), cache_v[l].astype(dtype), positions_B)
    x_BxD = x_BxD + jnp.einsum("bnh,nhd->bd", out_BxNxH, p["attn"]["o_kernel"].astype(dtype))
    h_Bx1xD = _norm(cfg, p["mlp_norm"]["scale"], x_BxD)[:, None]
    x_BxD = x_BxD + MLP(cfg).apply({"params": p["mlp"]}, h_Bx1xD)[:, 0]
  x_BxD = _norm(cfg, params["final_norm"]["scale"], x_BxD)
  if cfg.tie_embeddings:
    logits_BxV = x_BxD @ params["embed"]["embedding"].astype(dtype).T
  else:
    logits_BxV = x_BxD @ params["lm_head"]["kernel"].astype(dtype)
  return logits_BxV.astype(jnp.float32), tuple(cache_k), tuple(cache_v)


def keys_from_model(k_LxBxSxKxH) -> LayerCaches:
  """The model's stacked key cache -> per-layer BxKxHxS buffers."""
  return tuple(jnp.transpose(k, (0, 2, 3, 1)) for k in k_LxBxSxKxH)


def values_from_model(v_LxBxSxKxH) -> LayerCaches:
  """The model's stacked value cache -> per-layer BxKxSxH buffers."""
  return tuple(jnp.swapaxes(v, 1, 2) for v in v_LxBxSxKxH)
