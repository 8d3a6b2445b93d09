"""One decode step (one token per slot) of the k15 transformer, over a decode-friendly KV cache.

`k15.models.forward_with_cache` is the reference (tests check this step against it, logit for logit);
it serves prefill as is. For decode it is slow on CPU: its layer scan copies every layer's cache slice
in and out each step and its attention transposes the cache. Here each layer's cache is its own buffer,
written in place at one position per slot, in the layouts the two attention matmuls read without a
transpose: keys BxKxHxS (q.k contracts H against a row-major HxS block), values BxKxSxH. The norms and
rotary embedding are the model's own; the projections use fused copies of its weights (`decode_weights`).
"""
from typing import Tuple

import jax
import jax.numpy as jnp

from k15.models import ModelConfig
from k15.models.transformer import RMSNorm, rotary

# Per layer: a BxKxHxS key buffer, or a BxKxSxH value buffer.
LayerCaches = Tuple[jax.Array, ...]


def norm(cfg: ModelConfig, scale, x):
  """The model's RMSNorm with `scale`."""
  return RMSNorm(cfg.rms_norm_eps, cfg.jnp_param_dtype, cfg.jnp_dtype).apply({"params": {"scale": scale}}, x)


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


def decode_weights(cfg: ModelConfig, params):
  """The weights a decode step reads, fused and laid out [in, out]: per layer q/k/v as one Dx(NH+2KH)
  kernel (and bias), o as NHxD, gate/up as one Dx2F kernel, down as FxD; the output head as DxV.

  The fused matmuls cut a step's matmul dispatches (24 -> 17 at 4 layers). [in, out] is the model's own
  layout (on the current CPU, XLA's one-row-per-slot matmuls also ran faster in it than in [out, in]).
  Build once outside a decode loop: slicing and concatenating inside it would copy every weight each step.
  """
  D, N, H = cfg.d_model, cfg.n_heads, cfg.head_dim
  dtype = cfg.jnp_dtype
  layers = []
  for l in range(cfg.n_layers):
    p = jax.tree.map(lambda a, l=l: a[l].astype(dtype), params["layers"])
    attn, mlp = p["attn"], p["mlp"]
    layer = {
        "attn_norm": p["attn_norm"]["scale"], "mlp_norm": p["mlp_norm"]["scale"],
        "qkv_DxE": jnp.concatenate([attn[f"{n}_kernel"].reshape(D, -1) for n in "qkv"], axis=1),
        "o_NHxD": attn["o_kernel"].reshape(N * H, D),
        "gate_up_Dx2F": jnp.concatenate([mlp["gate"]["kernel"], mlp["up"]["kernel"]], axis=1),
        "down_FxD": mlp["down"]["kernel"],
    }
    if cfg.qkv_bias:
      layer["qkv_bias_E"] = jnp.concatenate([attn[f"{n}_bias"].reshape(-1) for n in "qkv"])
    layers.append(layer)
  head = params["embed"]["embedding"].T if cfg.tie_embeddings else params["lm_head"]["kernel"]
  return {"layers": layers, "head_DxV": head.astype(dtype)}


def linear(x_BxI, w_IxO):
  return x_BxI @ w_IxO


def decode_step(cfg: ModelConfig, params, cache_k: LayerCaches, cache_v: LayerCaches, tokens_B, positions_B,
                weights=None):
  """Logits (float32 BxV) of each slot's token at its position, and the caches with its k/v written.

  A position >= the cache length is not written (inactive slots use that); its logits are garbage.
  `weights`: `decode_weights(cfg, params)`, hoisted out of the caller's loop.
  """
  dtype = cfg.jnp_dtype
  N, K, H, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
  weights = decode_weights(cfg, params) if weights is None else weights
  b_idx = jnp.arange(tokens_B.shape[0])
  pos_Bx1 = positions_B[:, None]
  x_BxD = params["embed"]["embedding"][tokens_B].astype(dtype)
  B = x_BxD.shape[0]
  cache_k, cache_v = list(cache_k), list(cache_v)
  for l, p in enumerate(weights["layers"]):  # unrolled: each layer's cache stays a separate buffer, updated in place
    h_BxD = norm(cfg, p["attn_norm"], x_BxD)
    qkv_BxE = linear(h_BxD, p["qkv_DxE"])
    if cfg.qkv_bias:
      qkv_BxE = qkv_BxE + p["qkv_bias_E"]
    q_BxNxH = qkv_BxE[:, :N * H].reshape(B, N, H)
    k_BxKxH = qkv_BxE[:, N * H:(N + K) * H].reshape(B, K, H)
    v_BxKxH = qkv_BxE[:, (N + K) * H:].reshape(B, K, H)
    q = rotary(q_BxNxH[:, None], pos_Bx1, cfg.rope_theta)[:, 0]
    k = rotary(k_BxKxH[:, None], pos_Bx1, cfg.rope_theta)[:, 0]
    cache_k[l] = cache_k[l].at[b_idx, :, :, positions_B].set(k.astype(cache_k[l].dtype), mode="drop")
    cache_v[l] = cache_v[l].at[b_idx, :, positions_B].set(v_BxKxH.astype(cache_v[l].dtype), mode="drop")
    out_BxNxH = _attend(cfg, q, cache_k[l].astype(dtype), cache_v[l].astype(dtype), positions_B)
    x_BxD = x_BxD + linear(out_BxNxH.reshape(B, N * H), p["o_NHxD"])
    h_BxD = norm(cfg, p["mlp_norm"], x_BxD)
    gate_up_Bx2F = linear(h_BxD, p["gate_up_Dx2F"])
    x_BxD = x_BxD + linear(jax.nn.silu(gate_up_Bx2F[:, :F]) * gate_up_Bx2F[:, F:], p["down_FxD"])
  x_BxD = norm(cfg, params["final_norm"]["scale"], x_BxD)
  logits_BxV = linear(x_BxD, weights["head_DxV"])
  return logits_BxV.astype(jnp.float32), tuple(cache_k), tuple(cache_v)


def keys_from_model(k_LxBxSxKxH) -> LayerCaches:
  """The model's stacked key cache -> per-layer BxKxHxS buffers."""
  return tuple(jnp.transpose(k, (0, 2, 3, 1)) for k in k_LxBxSxKxH)


def values_from_model(v_LxBxSxKxH) -> LayerCaches:
  """The model's stacked value cache -> per-layer BxKxSxH buffers."""
  return tuple(jnp.swapaxes(v, 1, 2) for v in v_LxBxSxKxH)
