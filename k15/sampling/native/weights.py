"""The model's weights in the layouts kernels.cc reads: fused, stacked over layers, and packed for its matmuls.

The matmul weights go in 32-column panels (`pack`) for float32 FMAs; on a CPU with AMX tiles, as bfloat16 pieces
(`pack_amx`: 3 pieces and 6 products keep float32's accuracy element by element, 2 pieces and 3 products keep 16
bits of each operand) or int8 slices under a power-of-two scale per column (`pack_int8`: 9 products summed
exactly in int32, float32's accuracy relative to each column's largest weight).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from k15.models import ModelConfig

PANEL = 32  # columns per panel of a packed weight (kernels.cc's matmul reads 32-column slabs)

class NativeWeights(NamedTuple):
  """What kernels.cc reads: norms as they are, matmul weights packed (`pack`) and stacked over layers."""
  embed_VxD: jax.Array
  attn_norm_LxD: jax.Array
  qkv: jax.Array  # packed Dx(N+2K)H per layer
  qkv_bias_LxE: jax.Array  # zeros for a model without qkv bias
  o: jax.Array  # packed NHxD
  mlp_norm_LxD: jax.Array
  gate_up: jax.Array  # gate and up packed each (DxF), the up panels after the gate panels
  down: jax.Array  # packed FxD
  final_norm_D: jax.Array
  head: jax.Array  # packed DxV


def pack(w_KxN):
  """...xKxN -> ...xPxKx32: the N columns in P = ceil(N/32) contiguous Kx32 panels, the last zero-padded, so a
  matmul streams each panel once from start to end."""
  *lead, K, N = w_KxN.shape
  P = -(-N // PANEL)
  w = jnp.pad(w_KxN, [(0, 0)] * len(lead) + [(0, 0), (0, P * PANEL - N)])
  return jnp.moveaxis(w.reshape(*lead, K, P, PANEL), -2, -3)


def split_bf16(x, pieces: int):
  """float32 x as `pieces` bfloat16 arrays whose sum is x to 8 * pieces significant bits (each piece rounds
  what the ones before it left, to nearest even): with 3, every bit of a float32 significand."""
  out = []
  for _ in range(pieces):
    out.append(x.astype(jnp.bfloat16))
    x = x - out[-1].astype(jnp.float32)
  return out


def pack_amx(w_KxN, pieces: int):
  """...xKxN float32 -> ...xPxK/32x`pieces`x2x16x32 bfloat16, kernels.cc's AMX layout: per 32-column panel
  and per 32 rows of K (zero-padded to a multiple of 32), each bfloat16 piece (`split_bf16`) as two tiles of 16
  columns, a tile's row r holding rows 2r and 2r + 1 of K interleaved column by column (AMX's pair layout)."""
  *lead, K, N = w_KxN.shape
  P, Kb = -(-N // PANEL), -(-K // 32)
  w = jnp.pad(w_KxN.astype(jnp.float32), [(0, 0)] * len(lead) + [(0, Kb * 32 - K), (0, P * PANEL - N)])
  w = jnp.stack(split_bf16(w, pieces), axis=-3)  # ...x pieces x Kp x Np
  w = w.reshape(*lead, pieces, Kb, 16, 2, P, 2, 16)  # k = 32 kb + 2 r + parity, n = 32 p + 16 tile + column
  n = len(lead)
  order = (*range(n), n + 4, n + 1, n, n + 5, n + 2, n + 6, n + 3)  # P, Kb, pieces, tile, r, column, parity
  return jnp.transpose(w, order).reshape(*lead, P, Kb, pieces, 2, 16, 32)


INT8_SLICES = 3
INT8_BASE = 254  # one int8 slice to the next (kernels.cc's kBase)
INT8_HEADER = 4 * PANEL  # bytes of a packed int8 panel's column scales


def _int8_scale(x, axis: int):
  """The scale of x's int8 slices, one per slice along `axis` (kept as size 1): the power of two that brings the
  largest |x| to at most 127 (NaN where that is inf or NaN). kernels.cc's `split_int8` scales a row alike."""
  largest = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
  _, e = jnp.frexp(largest)
  scale = jnp.where(largest > 0, jnp.ldexp(jnp.float32(1), e - 7), jnp.float32(1))
  scale = jnp.where(largest / scale > 127, 2 * scale, scale)
  return jnp.where(jnp.isfinite(largest), scale, jnp.nan)  # inf or NaN: NaN results, as in float32


def _int8_slices(v):
  """The 3 int8 slices of v = x / its scale (at most 127 in magnitude): x = scale (x0 + x1 / 254 + x2 / 254^2) to
  about 2^-23 of the largest |x| sharing the scale. Each slice is the nearest integer to what the ones before
  left, times 254, so all lie in [-127, 127]."""
  slices = []
  for _ in range(INT8_SLICES):
    r = jnp.round(v)
    slices.append(r.astype(jnp.int8))
    v = (v - r) * INT8_BASE
  return slices


def pack_int8(w_KxN):
  """...xKxN float32 -> ...xPx(128 + 2 x K/64 x 3 x 16 x 64) int8, kernels.cc's int8 AMX layout: per 32-column
  panel the columns' scales (float32 bytes), then per tile of 16 columns and per 64 rows of K (zero-padded to a
  multiple of 64) each int8 slice (`_int8_slices`, a scale per column) as a tile whose row r holds rows 4r..4r+3 of
  K column by column (AMX's quad layout)."""
  *lead, K, N = w_KxN.shape
  P, Kb = -(-N // PANEL), -(-K // 64)
  w = jnp.pad(w_KxN.astype(jnp.float32), [(0, 0)] * len(lead) + [(0, Kb * 64 - K), (0, P * PANEL - N)])
  scale = _int8_scale(w, axis=-2)  # ... x 1 x Np
  n = len(lead)
  # Arranged in float32 (XLA moves 4-byte elements far faster than bytes), then sliced in place:
  # k = 64 kb + 4 r + quad, n = 32 p + 16 tile + column -> P, tile, Kb, r, column, quad.
  v = (w / scale).reshape(*lead, Kb, 16, 4, P, 2, 16)
  v = jnp.transpose(v, (*range(n), n + 3, n + 4, n, n + 1, n + 5, n + 2))
  q = jnp.stack(_int8_slices(v), axis=n + 3).reshape(*lead, P, 2 * Kb * INT8_SLICES * 16 * 64)
  header = jax.lax.bitcast_convert_type(scale.reshape(*lead, P, PANEL), jnp.int8).reshape(*lead, P, INT8_HEADER)
  return jnp.concatenate([header, q], axis=-1)


def pack_pairs(w_Kx2N, packer=pack):
  """The two halves of ...xKx2N (gate and up) packed each, their panels interleaved (gate 0, up 0, gate 1, ...):
  panel j of the gate and of the up projection cover the same columns, so one thread computes both (and
  silu(gate) * up) from one run of memory."""
  N = w_Kx2N.shape[-1] // 2
  axis = w_Kx2N.ndim - 2  # the panels'
  both = jnp.stack([packer(w_Kx2N[..., :N]), packer(w_Kx2N[..., N:])], axis=axis + 1)
  return both.reshape(*both.shape[:axis], -1, *both.shape[axis + 2:])


def pieces_of(weights: NativeWeights) -> int:
  """The pieces of each operand of the packed weights' matmuls (`native_weights`): bfloat16 pieces or int8
  slices; 0 for float32."""
  if weights.qkv.dtype == jnp.int8:
    return INT8_SLICES
  return 0 if weights.qkv.dtype == jnp.float32 else weights.qkv.shape[-4]


# The matmuls' names (a backend option) -> the pieces of each operand (0: float32 FMAs).
MATMUL_PIECES = {"float32": 0, "bf16x3": 2, "bf16x6": 3, "int8x9": INT8_SLICES}


def packer_of(matmul: str):
  """The function that packs a ...xKxN weight for the matmuls `matmul` (a `MATMUL_PIECES` key)."""
  if matmul not in MATMUL_PIECES:
    raise ValueError(f"unknown native matmul {matmul!r}; expected one of {sorted(MATMUL_PIECES)}")
  if matmul == "float32":
    return pack
  if matmul == "int8x9":
    return pack_int8
  return lambda w: pack_amx(w, MATMUL_PIECES[matmul])


def _fused_layer(cfg: ModelConfig, layer):
  """One layer's matmul weights as kernels.cc reads them, [in, out]: q/k/v as one Dx(NH+2KH), o as NHxD, gate and
  up as one Dx2F, down as FxD; and its qkv bias."""
  attn, mlp = layer["attn"], layer["mlp"]
  D = cfg.d_model
  qkv = jnp.concatenate([attn[f"{n}_kernel"].reshape(D, -1) for n in "qkv"], axis=1)
  bias = (jnp.concatenate([attn[f"{n}_bias"].reshape(-1) for n in "qkv"]) if cfg.qkv_bias
          else jnp.zeros((qkv.shape[1],), qkv.dtype))
  return dict(qkv=qkv, bias=bias, o=attn["o_kernel"].reshape(-1, D),
              gate_up=jnp.concatenate([mlp["gate"]["kernel"], mlp["up"]["kernel"]], axis=1), down=mlp["down"]["kernel"])


def native_weights(cfg: ModelConfig, params, matmul: str = "float32") -> NativeWeights:
  """The model's weights in kernels.cc's layout for the matmuls `matmul`; built once per sampling run."""
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  layers = jax.vmap(lambda layer: _fused_layer(cfg, layer))(jax.tree.map(f32, params["layers"]))
  head = params["embed"]["embedding"].T if cfg.tie_embeddings else params["lm_head"]["kernel"]
  pack_fn = packer_of(matmul)
  return NativeWeights(f32(params["embed"]["embedding"]), f32(params["layers"]["attn_norm"]["scale"]),
                       pack_fn(layers["qkv"]), layers["bias"], pack_fn(layers["o"]),
                       f32(params["layers"]["mlp_norm"]["scale"]), pack_pairs(layers["gate_up"], pack_fn),
                       pack_fn(layers["down"]), f32(params["final_norm"]["scale"]), pack_fn(f32(head)))

