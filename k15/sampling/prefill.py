"""Prefill: the K/V of whole sequences (prompts, or prompt + partial response), in the decode step's cache layouts.

`k15.models.forward_with_cache` computes the same K/V (tests hold the two equal), but for prefill it does
more than needed: its layer scan runs the last layer's attention and MLP, whose output feeds only the
logits, and it writes its cache by scatter, which the decode layouts then transpose. Here the layers are
unrolled, the last one stops at its K/V, and K/V come out as decode reads them. The norms, rotary
embedding and attention are the model's own.
"""
import jax
import jax.numpy as jnp

from k15.models import ModelConfig
from k15.models.transformer import attend, rotary
from k15.sampling import native
from k15.sampling.step import LayerCaches, norm


def encode(cfg: ModelConfig, params, tokens_PxT, weights=None) -> tuple[LayerCaches, LayerCaches]:
  """Per layer, the keys (PxKxHxT) and values (PxKxTxH) of left-aligned sequences at positions 0..T-1.

  Causal: a row's K/V at its real tokens do not depend on the padding after them (the padding's own K/V
  are garbage; decode overwrites or never attends them). `weights`: the native CPU step's weights
  (`native.decode_weights`): attention then runs in `native.prefill_attention`, and with AMX weights (bfloat16
  pieces or int8 slices) the matmuls on AMX tiles (`native.matmul`); None: XLA throughout.
  """
  P, T = tokens_PxT.shape
  dtype = cfg.jnp_dtype
  amx_weights = weights if weights is not None and native.pieces_of(weights) else None  # matmuls on AMX tiles
  positions_PxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (P, T))
  causal_PxTxT = positions_PxT[:, None, :] <= positions_PxT[:, :, None]
  x_PxTxD = params["embed"]["embedding"][tokens_PxT].astype(dtype)
  keys, values = [], []
  for l in range(cfg.n_layers):
    p = jax.tree.map(lambda a, l=l: a[l].astype(dtype), params["layers"])
    h_PxTxD = norm(cfg, p["attn_norm"]["scale"], x_PxTxD)
    project = _xla_qkv(cfg, p["attn"], h_PxTxD) if amx_weights is None else _amx_qkv(cfg, amx_weights, l, h_PxTxD)
    k_PxTxKxH, v_PxTxKxH = rotary(project("k"), positions_PxT, cfg.rope_theta), project("v")
    keys.append(jnp.transpose(k_PxTxKxH, (0, 2, 3, 1)))
    values.append(jnp.swapaxes(v_PxTxKxH, 1, 2))
    if l == cfg.n_layers - 1:  # the rest of the last layer feeds only the logits
      break
    q_PxTxNxH = rotary(project("q"), positions_PxT, cfg.rope_theta)
    if weights is None:
      out_PxTxNxH = attend(q_PxTxNxH, k_PxTxKxH, v_PxTxKxH, causal_PxTxT)
    else:
      out_PxTxNxH = native.prefill_attention(q_PxTxNxH, k_PxTxKxH, v_PxTxKxH)
    o_packed, o_NHxD = None if amx_weights is None else amx_weights.o, p["attn"]["o_kernel"].reshape(-1, cfg.d_model)
    x_PxTxD = x_PxTxD + _matmul(o_packed, out_PxTxNxH.reshape(P, T, -1), o_NHxD, l)
    x_PxTxD = x_PxTxD + _mlp(cfg, amx_weights, p["mlp"], l, norm(cfg, p["mlp_norm"]["scale"], x_PxTxD))
  return tuple(keys), tuple(values)


def _matmul(packed, x, kernel, l: int):
  """x @ kernel: on AMX tiles with `packed` (the native step's stacked copy of it; layer l), or in XLA (None)."""
  return x @ kernel if packed is None else native.matmul(x, packed, kernel.shape[-1], layer=l)


def _mlp(cfg: ModelConfig, amx_weights, mlp, l: int, h_PxTxD):
  """silu(h Wgate) * (h Wup) Wdown: on AMX tiles with the native step's `amx_weights` (gate and up fused), or in
  XLA (None)."""
  if amx_weights is None:
    gated_PxTxF = jax.nn.silu(h_PxTxD @ mlp["gate"]["kernel"]) * (h_PxTxD @ mlp["up"]["kernel"])
    return gated_PxTxF @ mlp["down"]["kernel"]
  gated_PxTxF = native.matmul(h_PxTxD, amx_weights.gate_up, cfg.d_ff, layer=l, swiglu=True)
  return _matmul(amx_weights.down, gated_PxTxF, mlp["down"]["kernel"], l)


def _xla_qkv(cfg: ModelConfig, attn, h_PxTxD):
  """`project`: name ("q", "k", "v") -> that projection of h (PxTxheadsxH), in XLA."""
  def project(name):
    out = jnp.einsum("btd,dnh->btnh", h_PxTxD, attn[f"{name}_kernel"])
    return out + attn[f"{name}_bias"] if cfg.qkv_bias else out
  return project


def _amx_qkv(cfg: ModelConfig, weights, l: int, h_PxTxD):
  """`project` for layer l from one AMX matmul of the fused q/k/v weight: name -> PxTxheadsxH."""
  N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  E = (N + 2 * K) * H
  qkv_PxTxE = native.matmul(h_PxTxD, weights.qkv, E, layer=l) + weights.qkv_bias_LxE[l]
  spans = {"q": (0, N), "k": (N, N + K), "v": (N + K, N + 2 * K)}
  return lambda name: qkv_PxTxE[..., spans[name][0] * H:spans[name][1] * H].reshape(*h_PxTxD.shape[:2], -1, H)
