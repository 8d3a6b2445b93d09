"""Paged attention against the Pallas kernel's reference function, the model's paged pass against its full pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as rpa

from k15 import models
from k15.models import attention


def _random_case(seed, R=5, T=4, N=4, K=2, H=8, Z=4, P=40, M=6):
  """Rows at their own start positions (one all padding, one with trailing padding) over shuffled pages."""
  rng = np.random.RandomState(seed)
  kv = rng.normal(size=(P, Z, 2 * K, H)).astype(np.float32)
  q = rng.normal(size=(R, T, N, H)).astype(np.float32)
  table = rng.permutation(P)[:R * M].reshape(R, M).astype(np.int32)
  starts = rng.randint(0, M * Z - T, R)
  positions = (starts[:, None] + np.arange(T)).astype(np.int32)
  positions[1] = -1  # a padding row
  positions[2, T // 2:] = -1  # a sequence that ends inside its row
  return q, kv, table, positions


@pytest.mark.parametrize("seed,T,block", [(0, 4, 1), (1, 4, 3), (2, 1, 2), (3, 8, 64)])
def test_xla_paged_attention_matches_the_kernels_reference(seed, T, block):
  """paged_attention_xla (work items of filled pages, online softmax) against jax's own reference function of
  the TPU kernel, run through paged_attention_kernel's conversion of rows to the kernel's ragged form; at every
  real query (padding queries are garbage by contract)."""
  q, kv, table, positions = _random_case(seed, T=T)
  want = attention.paged_attention_kernel(q, kv, table, positions, kernel=rpa.ref_ragged_paged_attention)
  got = attention.paged_attention_xla(q, kv, table, positions, block)
  real = positions >= 0
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-6, rtol=2e-6)


def test_xla_paged_attention_matches_dense_attention_over_gathered_positions():
  """The same against dense_product attention over each row's positions gathered from its pages (an independent
  gather: the page table read by numpy)."""
  q, kv, table, positions = _random_case(7, T=3)
  R, T, N, H = q.shape
  Z, K = kv.shape[1], kv.shape[2] // 2
  S = table.shape[1] * Z
  pages = kv[table]  # R x M x Z x 2K x H
  keys = pages[:, :, :, 0::2].reshape(R, S, K, H)
  values = pages[:, :, :, 1::2].reshape(R, S, K, H)
  mask = np.arange(S)[None, None, :] <= positions[:, :, None]
  want = attention.dot_product_attention(q, keys, values, mask)
  got = attention.paged_attention_xla(q, kv, table, positions, 2)
  real = positions >= 0
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-6, rtol=2e-6)


def test_write_pages_puts_each_position_in_its_page_and_drops_padding():
  L, P, Z, K, H = 2, 6, 4, 2, 3
  kv = np.zeros((L, P, Z, 2 * K, H), np.float32)
  k = np.arange(1, 2 * 3 * K * H + 1, dtype=np.float32).reshape(2, 3, K, H)
  v = -k
  table = np.array([[5, 2], [0, 3]], np.int32)
  positions = np.array([[3, 4, 5], [6, -1, -1]], np.int32)
  got = np.asarray(attention.write_pages(kv, 1, k, v, table, positions))
  want = np.zeros_like(kv)
  for r in range(2):
    for t in range(3):
      p = positions[r, t]
      if p >= 0:
        want[1, table[r, p // Z], p % Z, 0::2] = k[r, t]
        want[1, table[r, p // Z], p % Z, 1::2] = v[r, t]
  np.testing.assert_array_equal(got, want)
  assert np.count_nonzero(got[0]) == 0


def test_paged_attention_lowers_the_pallas_kernel_for_tpu(monkeypatch):
  """impl="kernel" (what "auto" takes on TPU) lowers for a TPU (jax.export from this CPU, with an abstract TPU
  device in context; the kernel's tuned block sizes read the device, so a v5's defaults stand in): the attention
  is a Mosaic custom call, not XLA ops."""
  from jax import export  # pylint: disable=g-import-not-at-top
  from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.ragged_paged_attention import tuned_block_sizes  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(tuned_block_sizes, "get_tpu_version", lambda: 5)
  monkeypatch.setattr(tuned_block_sizes, "get_device_name", lambda num_devices=None: "TPU v5")
  R, T, N, K, H, Z, P, M = 8, 1, 8, 2, 128, 16, 64, 4
  args = [jax.ShapeDtypeStruct(s, d) for s, d in [((R, T, N, H), jnp.bfloat16), ((R, T, K, H), jnp.bfloat16),
                                                    ((R, T, K, H), jnp.bfloat16), ((2, P, Z, 2 * K, H), jnp.bfloat16),
                                                    ((R, M), jnp.int32), ((R, T), jnp.int32)]]
  fn = jax.jit(lambda q, k, v, kv, table, positions: attention.paged_attention(q, k, v, kv, 1, table, positions,
                                                                              impl="kernel"))
  tpu = mesh_lib.AbstractDevice(device_kind="TPU v5", num_cores=1, platform="tpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=tpu)):
    text = export.export(fn, platforms=["tpu"])(*args).mlir_module()
  assert "tpu_custom_call" in text and "ragged_paged_attention" in text


def test_auto_takes_xla_off_tpu_and_unknown_impls_are_named():
  q, kv, table, positions = _random_case(4, T=1)
  k = v = np.zeros(q.shape[:2] + (kv.shape[2] // 2, q.shape[3]), np.float32)
  out, _ = attention.paged_attention(q, k, v, kv[None], 0, table, positions, impl="auto")
  want, _ = attention.paged_attention(q, k, v, kv[None], 0, table, positions, impl="xla")
  np.testing.assert_array_equal(out, want)
  with pytest.raises(ValueError, match="impl must be 'auto', 'kernel', 'xla' or a function, got 'flash'"):
    attention.paged_attention(q, k, v, kv[None], 0, table, positions, impl="flash")


CFG = models.ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                         qkv_bias=True)


@pytest.mark.parametrize("page_size,unstacked", [(4, False), (8, True)])
def test_prefill_in_pages_then_decode_equals_the_full_pass(page_size, unstacked):
  """Sequences prefilled a page per row (several rows of one sequence in one call), then decoded a token per row:
  each step's logits equal the full causal pass's at that position; pages of different sequences interleave in
  the cache."""
  params = models.init_params(CFG, jax.random.key(0))
  rng = np.random.RandomState(0)
  seqs = [rng.randint(0, 64, n) for n in (13, 5, 20)]
  prefix = [6, 2, 11]  # positions prefilled; the rest decoded
  M, P = 32 // page_size, 40
  table = rng.permutation(P)[:3 * M].reshape(3, M).astype(np.int32)
  rows_tok, rows_pos, rows_tab = [], [], []
  for s, (seq, n) in enumerate(zip(seqs, prefix)):
    for j in range(0, n, page_size):
      m = min(page_size, n - j)
      rows_tok.append(np.pad(seq[j:j + m], (0, page_size - m)))
      rows_pos.append(np.concatenate([np.arange(j, j + m), -np.ones(page_size - m, int)]).astype(np.int32))
      rows_tab.append(table[s])
  kv = jnp.zeros(models.kv_pages_shape(CFG, P, page_size))
  paged = jax.jit(models.forward_paged, static_argnums=0, static_argnames=("logits", "unstacked"))
  weights = models.unstack_layers(CFG, params) if unstacked else params
  _, cache = paged(CFG, weights, np.stack(rows_tok), np.stack(rows_pos), models.PagedCache(kv, np.stack(rows_tab)),
                   logits=False, unstacked=unstacked)
  full = [np.asarray(models.forward(CFG, params, seq[None]))[0] for seq in seqs]
  for step in range(max(len(s) - n for s, n in zip(seqs, prefix))):
    pos = np.array([min(n + step, len(s) - 1) for s, n in zip(seqs, prefix)], np.int32)
    live = np.array([n + step < len(s) for s, n in zip(seqs, prefix)])
    tokens = np.array([s[p] for s, p in zip(seqs, pos)], np.int32)
    logits, cache = paged(CFG, weights, tokens[:, None], np.where(live, pos, -1)[:, None],
                          models.PagedCache(cache.kv_LxPxZxCxH, table), unstacked=unstacked)
    for r in np.flatnonzero(live):
      np.testing.assert_allclose(np.asarray(logits)[r, 0], full[r][pos[r]], atol=2e-5, rtol=2e-5)
