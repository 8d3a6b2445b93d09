"""Attention over a full sequence (training) and over a paged KV cache (sampling: prefill and decode).

The paged cache holds, per layer, kv_pages_PxZxCxH: P pages of Z positions, C = 2K combined heads (kv head k's
keys at 2k, its values at 2k + 1), head_dim H: the layout of jax's Pallas TPU kernel `ragged_paged_attention`.
All layers sit in one array, kv_LxPxZxCxH. A row of queries (a decode slot, or a prefill chunk of a sequence)
reads its sequence's pages through its row of a page table: position p lives in page page_table[r, p // Z] at
offset p % Z. Each query attends to its row's positions up to its own.

On TPU the kernel runs; elsewhere `paged_attention_xla` computes the same over work items (row, filled page),
blocks of them at a time with an online softmax, so its cost follows the rows' filled pages, not the capacity.
"""
import functools
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from k15 import sharding
from k15.models.blockwise import MASK_VALUE, blockwise_attention


# Logical axes of the paged cache kv_LxPxZxCxH; rows (slots, prefill chunks) are 'cache_batch'.
KV_PAGES_LOGICAL_AXES = ("layers", "cache_pages", None, "kv_heads", "head_dim")


def _scores(q, k, equation: str):
  """Scaled dot products q.k / sqrt(H) in float32."""
  return jnp.einsum(equation, q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)


def dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS):
  """Grouped-query attention of every query over the keys its mask allows; softmax in float32."""
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxSxKxH.shape[2]
  q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
  scores = _scores(q_BxTxKxGxH, k_BxSxKxH, "btkgh,bskh->bkgts")
  scores = jnp.where(mask_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxH.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BxSxKxH)
  return out.reshape(B, T, N, H)


def segment_positions(segments_BxT):
  """Each token's position within its segment (a run of equal ids): positions restart in a packed row."""
  T = segments_BxT.shape[1]
  index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segments_BxT.shape)
  first = jnp.concatenate([jnp.ones_like(segments_BxT[:, :1], bool), segments_BxT[:, 1:] != segments_BxT[:, :-1]], 1)
  return index - jax.lax.cummax(jnp.where(first, index, 0), axis=1)


ATTENTION_IMPLS = ("auto", "dense", "blockwise", "splash")


def causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments_BxT=None, impl: str = "auto", block: int = 512):
  """Each query's attention over the keys at or before its index in its row and in its segment (segments_BxT: a
  packed row's sample ids; None: one sequence per row).

  impl: "dense" (a T x T score matrix), "blockwise" (`blockwise_attention`: blocks of `block`, no T x T matrix),
  "splash" (jax's Pallas splash attention, TPU), or "auto" (splash on TPU, else dense up to `block` tokens and
  blockwise beyond).
  """
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxTxKxH.shape[2]
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
  if impl == "auto":
    impl = "splash" if jax.default_backend() == "tpu" else "dense" if T <= block else "blockwise"
  segments_BxT = jnp.zeros((B, T), jnp.int32) if segments_BxT is None else segments_BxT.astype(jnp.int32)
  if impl == "dense":
    index = jnp.arange(T)
    mask = (index[None, :] <= index[:, None])[None] & (segments_BxT[:, :, None] == segments_BxT[:, None, :])
    return dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask)
  Tp = -(-T // block) * block  # padding: a segment of its own, sliced off
  pad = lambda x, value=0: jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
  q = jnp.transpose(pad(q_BxTxNxH).reshape(B, Tp, K, N // K, H), (0, 2, 3, 1, 4)) * (H ** -0.5)
  k, v = (jnp.transpose(pad(x), (0, 2, 1, 3)) for x in (k_BxTxKxH, v_BxTxKxH))
  segments = pad(segments_BxT, jnp.iinfo(jnp.int32).min)
  if impl == "splash":
    out = splash_attention(q, k, v, segments, block)
  else:
    out = blockwise_attention(q, k.astype(q.dtype), v.astype(q.dtype), segments, block)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, Tp, N, H)[:, :T].astype(q_BxTxNxH.dtype)


def splash_attention(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, segments_BxT, block: int, interpret: bool = False):
  """`blockwise_attention`'s contract through jax's Pallas splash attention (TPU; `interpret` runs it on CPU, for
  tests): each kv head's G query heads as multi-query attention, a causal mask and segment ids."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash  # TPU kernels
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  B, K, G, T, H = q_BxKxGxTxH.shape
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  kernel = splash.make_splash_mqa_single_device(masks.MultiHeadMask([masks.CausalMask((T, T))] * G),
                                                block_sizes=sizes, interpret=interpret)
  one = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s))  # G x T x H; T x H; T x H; T
  local = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)))  # over rows, then kv heads
  rows = sharding.context_mesh_axes("activation_batch", B) or None
  heads = sharding.context_mesh_axes("kv_heads", K) or None
  if rows is None and heads is None:
    return local(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, segments_BxT)
  spec = PartitionSpec(rows, heads)  # a kernel XLA cannot split: each device runs its rows and heads
  return jax.shard_map(local, in_specs=(spec, spec, spec, PartitionSpec(rows)), out_specs=spec, check_vma=False)(
      q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, segments_BxT)


def combine_heads(k_RxTxKxH, v_RxTxKxH):
  """Keys and values -> RxTxCxH, interleaved (k0, v0, k1, v1, ...) as the paged cache holds them."""
  R, T, K, H = k_RxTxKxH.shape
  return jnp.stack([k_RxTxKxH, v_RxTxKxH], axis=3).reshape(R, T, 2 * K, H)


def write_pages(kv_LxPxZxCxH, layer, k_RxTxKxH, v_RxTxKxH, page_table_RxM, positions_RxT):
  """The cache with each row's keys and values written at their positions in layer `layer`; a negative
  position (padding) writes nothing."""
  kv_LxPxZxCxH, page_table_RxM, positions_RxT = map(jnp.asarray, (kv_LxPxZxCxH, page_table_RxM, positions_RxT))
  Z = kv_LxPxZxCxH.shape[2]
  P = kv_LxPxZxCxH.shape[1]
  valid = positions_RxT >= 0
  pos = jnp.where(valid, positions_RxT, 0)
  pages_RxT = jnp.take_along_axis(page_table_RxM, pos // Z, axis=1)
  pages_RxT = jnp.where(valid, pages_RxT, P)  # out of range: dropped
  new = combine_heads(k_RxTxKxH, v_RxTxKxH).astype(kv_LxPxZxCxH.dtype)
  return kv_LxPxZxCxH.at[layer, pages_RxT, pos % Z].set(new, mode="drop")


# Pages a work item of `paged_attention_xla` reads: with 2, XLA's CPU decode step ran faster than with 1
# (`benchmarks/xla_attention_ab.py`, docs/sampler.md); a row's last item may read one page past its length.
PAGES_PER_ITEM = 2


def paged_attention_xla(q_RxTxNxH, kv_XxZxCxH, page_table_RxM, positions_RxT, pages_per_block: int):
  """Each query's attention over its row's positions <= its own (position < 0: padding, a garbage output).

  kv_XxZxCxH: the pages the table indexes. Work items are a row and `PAGES_PER_ITEM` consecutive pages of it, over
  each row's filled pages (up to its last position), taken `pages_per_block` pages at a time; each block's scores
  go into per-row running maxima, sums and outputs (online softmax), so the work and the pages read follow the
  rows' lengths.
  """
  q_RxTxNxH, kv_XxZxCxH, page_table_RxM, positions_RxT = map(jnp.asarray, (q_RxTxNxH, kv_XxZxCxH, page_table_RxM,
                                                                          positions_RxT))
  R, T, N, H = q_RxTxNxH.shape
  Z, C = kv_XxZxCxH.shape[1], kv_XxZxCxH.shape[2]
  K = C // 2
  J = PAGES_PER_ITEM
  G, W, Y = N // K, max(1, pages_per_block // J), J * Z  # items per block, positions per item
  lengths_R = jnp.max(positions_RxT, axis=1) + 1
  items_R = (lengths_R + Y - 1) // Y
  ends_R = jnp.cumsum(items_R)  # row r's items are [ends_R[r] - items_R[r], ends_R[r])
  total = ends_R[-1]
  q_RxKxGxTxH = jnp.transpose(q_RxTxNxH.reshape(R, T, K, G, H), (0, 2, 3, 1, 4))
  kv_XxS = kv_XxZxCxH.reshape(kv_XxZxCxH.shape[0], Z * C * H)

  def block(carry):
    start, m_RxKxGxT, l_RxKxGxT, o_RxKxGxTxH = carry
    items_W = start + jnp.arange(W)
    valid_W = items_W < total
    row_W = jnp.minimum(jnp.searchsorted(ends_R, items_W, side="right", method="compare_all"), R - 1)
    item_index_W = items_W - (ends_R[row_W] - items_R[row_W])
    page_index_WxJ = jnp.clip(item_index_W[:, None] * J + jnp.arange(J), 0, page_table_RxM.shape[1] - 1)
    page_WxJ = jnp.take_along_axis(page_table_RxM[row_W], page_index_WxJ, axis=1)
    # Whole pages as rows of a 2D array: XLA's CPU gather copies rows faster than 4D slices.
    kv_WxYxCxH = kv_XxS[jnp.where(valid_W[:, None], page_WxJ, 0)].reshape(W, Y, C, H)
    # Keys, then values, of a kv head contiguous per item: one copy, which XLA's CPU dots read faster than two.
    kv_2xWxKxYxH = jnp.transpose(kv_WxYxCxH.reshape(W, Y, K, 2, H), (3, 0, 2, 1, 4))
    k_WxKxYxH, v_WxKxYxH = kv_2xWxKxYxH[0], kv_2xWxKxYxH[1]
    s = _scores(q_RxKxGxTxH[row_W], k_WxKxYxH.astype(q_RxTxNxH.dtype), "wkgth,wkyh->wkgty")
    key_pos_WxY = item_index_W[:, None] * Y + jnp.arange(Y)
    mask_WxTxY = (key_pos_WxY[:, None, :] <= positions_RxT[row_W][:, :, None]) & valid_W[:, None, None]
    s = jnp.where(mask_WxTxY[:, None, None], s, MASK_VALUE)
    m_W = jnp.max(s, axis=-1)
    p = jnp.exp(s - m_W[..., None])
    o_W = jnp.einsum("wkgty,wkyh->wkgth", p.astype(v_WxKxYxH.dtype), v_WxKxYxH.astype(q_RxTxNxH.dtype),
                     preferred_element_type=jnp.float32)
    segment_W = jnp.where(valid_W, row_W, R)  # out of range: dropped by the segment reductions
    m_new = jnp.maximum(m_RxKxGxT, jax.ops.segment_max(m_W, segment_W, num_segments=R))
    scale_old, scale_W = jnp.exp(m_RxKxGxT - m_new), jnp.exp(m_W - m_new[row_W])
    l_new = l_RxKxGxT * scale_old + jax.ops.segment_sum(jnp.sum(p, axis=-1) * scale_W, segment_W, num_segments=R)
    o_new = o_RxKxGxTxH * scale_old[..., None] + jax.ops.segment_sum(o_W * scale_W[..., None], segment_W,
                                                                      num_segments=R)
    return start + W, m_new, l_new, o_new

  init = (jnp.int32(0), jnp.full((R, K, G, T), MASK_VALUE, jnp.float32), jnp.zeros((R, K, G, T), jnp.float32),
          jnp.zeros((R, K, G, T, H), jnp.float32))
  _, _, l, o = jax.lax.while_loop(lambda c: c[0] < total, block, init)
  out = o / jnp.maximum(l, 1e-30)[..., None]
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(R, T, N, H).astype(q_RxTxNxH.dtype)


def paged_attention_kernel(q_RxTxNxH, kv_XxZxCxH, page_table_RxM, positions_RxT, kernel=None):
  """The same through jax's ragged paged attention (TPU), or `kernel` with its signature (e.g. the kernel's
  reference function, for tests).

  The kernel places a row's T queries at the T positions ending at its kv length; rows here are contiguous
  positions p0.. p0 + T - 1 (trailing padding past a sequence's end attends past it, a garbage output).
  """
  R, T, N, H = q_RxTxNxH.shape
  if kernel is None:
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as rpa  # TPU only
    kernel = functools.partial(rpa.ragged_paged_attention, num_kv_pages_per_block=None, num_queries_per_block=None)
  kv_lens_R = jnp.maximum(positions_RxT[:, 0], 0).astype(jnp.int32) + T
  cu_q_lens = (jnp.arange(R + 1) * T).astype(jnp.int32)
  out = kernel(q_RxTxNxH.reshape(R * T, N, H), kv_XxZxCxH, kv_lens_R, page_table_RxM.astype(jnp.int32), cu_q_lens,
               jnp.array([R], jnp.int32), sm_scale=H ** -0.5)
  return out.reshape(R, T, N, H)


def _local(q_RxTxNxH, k_RxTxKxH, v_RxTxKxH, kv_LxPxZxCxH, layer, page_table_RxM, positions_RxT, impl: str,
           pages_per_block: int):
  """paged_attention on one device's rows and pages (page table entries index this device's pages)."""
  kv_LxPxZxCxH = write_pages(kv_LxPxZxCxH, layer, k_RxTxKxH, v_RxTxKxH, page_table_RxM, positions_RxT)
  L, P = kv_LxPxZxCxH.shape[:2]
  kv_XxZxCxH = kv_LxPxZxCxH.reshape(L * P, *kv_LxPxZxCxH.shape[2:])  # every layer's pages: no copy of one
  table_RxM = page_table_RxM + layer * P
  if impl == "kernel":
    out = paged_attention_kernel(q_RxTxNxH, kv_XxZxCxH, table_RxM, positions_RxT)
  else:
    attend = paged_attention_xla if impl == "xla" else impl
    out = attend(q_RxTxNxH, kv_XxZxCxH, table_RxM, positions_RxT, pages_per_block)
  return out, kv_LxPxZxCxH


def paged_attention(q_RxTxNxH, k_RxTxKxH, v_RxTxKxH, kv_LxPxZxCxH, layer, page_table_RxM, positions_RxT,
                    impl: Union[str, Callable] = "auto", pages_per_block: int = 16):
  """Writes the rows' keys and values into the paged cache at their positions, then attends each query over
  its row's positions <= its own. Returns (out_RxTxNxH, the updated kv_LxPxZxCxH).

  impl: "kernel" (jax's Pallas TPU kernel), "xla" (`paged_attention_xla`), "auto" (the kernel on TPU), or a
  function with `paged_attention_xla`'s arguments and contract (a plug-in's kernel, e.g. a CPU one).
  Under a mesh (jax.set_mesh) with logical axis rules (flax's), the rows and pages are split over the mesh axes
  of 'cache_batch' and the heads over those of 'kv_heads' (shard_map): each device attends its rows over its own
  pages, so page table entries index the pages of the row's device.
  """
  if impl == "auto":
    impl = "kernel" if jax.default_backend() == "tpu" else "xla"
  if not callable(impl) and impl not in ("kernel", "xla"):
    raise ValueError(f"paged attention impl must be 'auto', 'kernel', 'xla' or a function, got {impl!r}")
  local = functools.partial(_local, impl=impl, pages_per_block=pages_per_block)
  R, K, P = q_RxTxNxH.shape[0], k_RxTxKxH.shape[2], kv_LxPxZxCxH.shape[1]
  rows = sharding.context_mesh_axes("cache_batch", R)
  if rows != sharding.context_mesh_axes("cache_batch", P):
    raise ValueError(f"paged attention: {R} rows and {P} pages must split alike over the mesh axes of "
                     f"'cache_batch' ({rows} vs {sharding.context_mesh_axes('cache_batch', P)})")
  heads = sharding.context_mesh_axes("kv_heads", K)
  if not rows and not heads:  # nothing split (or already split by an enclosing shard_map)
    return local(q_RxTxNxH, k_RxTxKxH, v_RxTxKxH, kv_LxPxZxCxH, layer, page_table_RxM, positions_RxT)
  rows, heads = rows or None, heads or None
  qkv_spec = PartitionSpec(rows, None, heads, None)
  kv_spec = PartitionSpec(None, rows, None, heads, None)
  table_spec = PartitionSpec(rows, None)
  return jax.shard_map(local, in_specs=(qkv_spec, qkv_spec, qkv_spec, kv_spec, PartitionSpec(), table_spec,
                                                   table_spec),
                       out_specs=(qkv_spec, kv_spec), check_vma=False)(
                           q_RxTxNxH, k_RxTxKxH, v_RxTxKxH, kv_LxPxZxCxH, layer, page_table_RxM, positions_RxT)
