"""Blockwise (flash-style) causal attention in plain XLA: no T x T matrix, for long sequences off TPU.

Queries and keys go in blocks; each query block runs over the key blocks up to its diagonal with an online softmax
(a running maximum and sum), so the peak is one block of scores. The backward pass recomputes each block's
probabilities from the saved log-sum-exp (a custom VJP, flash-attention 2's two passes: one over query blocks for
dq, one over key blocks for dk and dv) instead of keeping them.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

# Jax's attention kernels' mask value: finite, so a query with every key of a block masked gets no NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _blocks(x, size, axis):
  """x split along `axis` into blocks of `size` (the length is a multiple of it): blocks first."""
  shape = x.shape
  x = x.reshape(shape[:axis] + (shape[axis] // size, size) + shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def blockwise_attention(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, segments_BxT, block: int):
  """softmax(q k^T) v of each query over the keys at or before its index in its row and segment (q pre-scaled),
  T a multiple of `block`: B x K x G x T x H. Key blocks past a query block's diagonal are skipped."""
  return _forward(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, segments_BxT, block)[0]


def _mask(seg_q, seg_k, qi, ki, block):
  """B x 1 x 1 x Bq x Bk: the keys of block ki each query of block qi may see (at or before it, same segment)."""
  q_idx = qi * block + jnp.arange(block)
  k_idx = ki * block + jnp.arange(block)
  causal = k_idx[None, :] <= q_idx[:, None]
  same = seg_q[:, :, None] == seg_k[:, None, :]
  return (causal[None] & same)[:, None, None]


def _forward(q, k, v, seg, block):
  B, K, G, T, H = q.shape
  n = T // block
  qb = _blocks(q, block, 3)  # n B K G Bq H
  kb, vb = _blocks(k, block, 2), _blocks(v, block, 2)  # n B K Bk H
  sb = _blocks(seg, block, 1)  # n B Bk

  def q_block(qi):
    qq, sq = qb[qi], sb[qi]
    def k_block(ki, carry):
      m, l, o = carry
      s = jnp.einsum("bkgqh,bkph->bkgqp", qq, kb[ki], preferred_element_type=jnp.float32)
      s = jnp.where(_mask(sq, sb[ki], qi, ki, block), s, MASK_VALUE)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      a = jnp.exp(m - m_new)
      l = l * a + p.sum(-1)
      o = o * a[..., None] + jnp.einsum("bkgqp,bkph->bkgqh", p.astype(vb.dtype), vb[ki],
                                        preferred_element_type=jnp.float32)
      return m_new, l, o
    init = (jnp.full((B, K, G, block), MASK_VALUE, jnp.float32), jnp.zeros((B, K, G, block), jnp.float32),
            jnp.zeros((B, K, G, block, H), jnp.float32))
    m, l, o = jax.lax.fori_loop(0, qi + 1, k_block, init)  # key blocks up to the diagonal
    return (o / l[..., None]).astype(q.dtype), m + jnp.log(l)

  o, lse = jax.lax.map(q_block, jnp.arange(n))  # n B K G Bq H, n B K G Bq
  o = jnp.moveaxis(o, 0, 3).reshape(B, K, G, T, H)
  lse = jnp.moveaxis(lse, 0, 3).reshape(B, K, G, T)
  return o, (q, k, v, seg, o, lse)


def _backward(block, res, do):
  q, k, v, seg, o, lse = res
  B, K, G, T, H = q.shape
  n = T // block
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1)  # B K G T
  qb, dob = _blocks(q, block, 3), _blocks(do, block, 3)
  lb, db = _blocks(lse, block, 3), _blocks(delta, block, 3)
  kb, vb = _blocks(k, block, 2), _blocks(v, block, 2)
  sb = _blocks(seg, block, 1)

  def probs(qi, ki):
    s = jnp.einsum("bkgqh,bkph->bkgqp", qb[qi], kb[ki], preferred_element_type=jnp.float32)
    s = jnp.where(_mask(sb[qi], sb[ki], qi, ki, block), s, MASK_VALUE)
    return jnp.exp(s - lb[qi][..., None])  # B K G Bq Bk

  def dq_block(qi):
    def k_block(ki, dq):
      p = probs(qi, ki)
      dp = jnp.einsum("bkgqh,bkph->bkgqp", dob[qi], vb[ki], preferred_element_type=jnp.float32)
      ds = p * (dp - db[qi][..., None])
      return dq + jnp.einsum("bkgqp,bkph->bkgqh", ds, kb[ki], preferred_element_type=jnp.float32)
    return jax.lax.fori_loop(0, qi + 1, k_block, jnp.zeros((B, K, G, block, H), jnp.float32))

  def dkv_block(ki):
    def q_block(qi, carry):
      dk, dv = carry
      p = probs(qi, ki)
      dv = dv + jnp.einsum("bkgqp,bkgqh->bkph", p, dob[qi].astype(jnp.float32))
      dp = jnp.einsum("bkgqh,bkph->bkgqp", dob[qi], vb[ki], preferred_element_type=jnp.float32)
      ds = p * (dp - db[qi][..., None])
      dk = dk + jnp.einsum("bkgqp,bkgqh->bkph", ds, qb[qi].astype(jnp.float32))
      return dk, dv
    zeros = jnp.zeros((B, K, block, H), jnp.float32)
    return jax.lax.fori_loop(ki, n, q_block, (zeros, zeros))  # query blocks from the diagonal on

  dq = jnp.moveaxis(jax.lax.map(dq_block, jnp.arange(n)), 0, 3).reshape(B, K, G, T, H)
  dk, dv = jax.lax.map(dkv_block, jnp.arange(n))
  dk = jnp.moveaxis(dk, 0, 2).reshape(B, K, T, H)
  dv = jnp.moveaxis(dv, 0, 2).reshape(B, K, T, H)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


blockwise_attention.defvjp(_forward, _backward)
