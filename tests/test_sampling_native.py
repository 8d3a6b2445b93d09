"""The native CPU plug-in (k15.sampling.native): its paged pass against the model's, its choice, its build cache and
its errors (its samples are tested beside the model backend's in test_sampling.py)."""
import dataclasses
import os
import pathlib
import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as rpa

from k15 import models, sampling
from k15.models import attention
from k15.sampling import select

native = pytest.importorskip("k15.sampling.native")
from k15.sampling.native import build  # noqa: E402  pylint: disable=g-import-not-at-top

CFG = models.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)

# The plug-in's matmuls and how close to the model's float32 pass each must be: float32 FMAs, 6 products of 3
# bfloat16 pieces and 9 of int8 slices as float32; 3 products of 2 pieces keep 16 bits of each operand.
MATMULS = {"float32": 2e-5, "bf16x6": 2e-5, "int8x9": 2e-5, "bf16x3": 2e-4}


def _params(cfg, seed=0, scale=0.3):
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda a: (scale * rng.normal(size=a.shape)).astype(np.float32), models.abstract_params(cfg))


def _paged_case(cfg, B, T, Z, seed):
  """B rows of T tokens at their own start positions over a shuffled page table, a random cache; some rows padded."""
  rng = np.random.RandomState(seed)
  M, P = 48 // Z, B * 48 // Z + 3
  kv = rng.normal(size=models.kv_pages_shape(cfg, P, Z)).astype(np.float32)
  table = rng.permutation(P)[:B * M].reshape(B, M).astype(np.int32)
  starts = rng.randint(0, M * Z - T, B)
  positions = (starts[:, None] + np.arange(T)).astype(np.int32)
  tokens = rng.randint(0, cfg.vocab_size, (B, T)).astype(np.int32)
  return kv, table, tokens, positions


@pytest.mark.parametrize("matmul", list(MATMULS))
@pytest.mark.parametrize("d_ff,B,head_dim,page_size,n_heads", [(96, 23, 16, 8, 4), (80, 13, 40, 5, 4),
                                                                (72, 3, 32, 16, 4), (64, 5, 16, 8, 20)])
def test_native_step_equals_the_model_step(needs_native_step, request, matmul, d_ff, B, head_dim, page_size, n_heads):
  """B slots (the work shared by the CPU threads) at their own positions over shuffled pages, two of them inactive
  (a position past the pages, -1): logits and the written cache match the model's paged pass; inactive slots write
  nothing. d_ff 80 and vocab 80 end in part-filled weight panels; head_dim 40 is not a multiple of 16 (the
  attention's remainder path); 20 query heads fill one vector of 16 lanes and part of a second (the softmax runs
  a vector of heads at a time); one embedding column is 100 times the others (an activation outlier for the int8
  slices of each row)."""
  tol = MATMULS[matmul]
  if matmul != "float32":
    request.getfixturevalue("needs_amx")
  cfg = models.ModelConfig(vocab_size=80, d_model=64, n_layers=2, n_heads=n_heads, n_kv_heads=2, head_dim=head_dim,
                           d_ff=d_ff, qkv_bias=True, tie_embeddings=True)
  params = _params(cfg)
  params["embed"]["embedding"][:, 5] *= 100
  kv, table, tokens, positions = _paged_case(cfg, B, 1, page_size, seed=1)
  positions[[1, B - 1], 0] = [table.shape[1] * page_size + 3, -1]  # inactive
  tokens_B, positions_B = tokens[:, 0], positions[:, 0]
  weights = native.native_weights(cfg, params, matmul)
  got_logits, stats, got_kv = jax.jit(lambda kv: native.paged_step(cfg, weights, kv, tokens_B, positions_B, table))(kv)
  want_logits, want_cache = models.forward_paged(cfg, params, tokens, np.where(positions < 48, positions, -1),
                                                 models.PagedCache(jnp.asarray(kv), table), impl="xla")
  active = (positions_B >= 0) & (positions_B < 48)
  # The outlier column makes each logit a sum of terms up to ~300 that cancel, and float32 rounds such sums by
  # more than 2e-5 (6e-5 in a logit of 0.06 on an AVX-512 CPU): errors are measured against the largest logit.
  want = np.asarray(want_logits)[active, 0]
  np.testing.assert_allclose(np.asarray(got_logits)[active], want, atol=tol * np.abs(want).max(), rtol=0)
  np.testing.assert_allclose(got_kv, want_cache.kv_LxPxZxCxH, atol=tol)
  _check_stats(np.asarray(got_logits), stats)


@pytest.mark.parametrize("page_size", [4, 16])
def test_native_prefill_equals_the_models(needs_native_step, page_size):
  """Prefill rows (a page of a sequence each, two rows of one sequence in the same call: one reads what the other
  writes) write the same cache as the model's paged pass; no logits."""
  cfg = models.ModelConfig(vocab_size=80, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96,
                           qkv_bias=True)
  params = _params(cfg, seed=2)
  kv, table, tokens, _ = _paged_case(cfg, 4, page_size, page_size, seed=3)
  table[1] = table[0]  # rows 0 and 1: pages 0 and 1 of one sequence
  positions = np.stack([np.arange(page_size), np.arange(page_size, 2 * page_size), np.arange(page_size),
                        np.where(np.arange(page_size) < 3, 2 * page_size + np.arange(page_size), -1)]).astype(np.int32)
  kv[:, table[3, :2]] = 0  # row 3 starts at page 2: its first two pages are an empty prefix
  weights = native.native_weights(cfg, params)
  logits, stats, got = jax.jit(lambda kv: native.paged_step(cfg, weights, kv, tokens.reshape(-1), positions.reshape(-1),
                                                           table, prefill=True))(kv)
  assert logits.shape == (0, cfg.vocab_size) and stats.argmax_B.shape == (0,)
  _, want = models.forward_paged(cfg, params, tokens, positions, models.PagedCache(jnp.asarray(kv), table),
                                 logits=False, impl="xla")
  np.testing.assert_allclose(got, want.kv_LxPxZxCxH, atol=2e-5)


def _check_stats(logits, stats):
  """The native step's LogitStats against numpy on its own logits (float64 log-sum-exp)."""
  np.testing.assert_array_equal(stats.argmax_B, np.argmax(logits, axis=-1))  # the first maximum
  np.testing.assert_array_equal(stats.max_B, logits.max(axis=-1))
  lse = np.log(np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)).sum(axis=-1))
  np.testing.assert_allclose(stats.lse_B, lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("matmul", ["float32", "bf16x6", "int8x9"])
def test_native_stats_of_a_nan_row_follow_first_argmax(needs_native_step, request, matmul):
  """A slot whose token embeds to NaN gets NaN logits, whatever the matmuls (int8 slices of a NaN row are
  garbage: its scale carries the NaN): its greedy token is V - 1 (`select.first_argmax`'s answer) and its max and
  lse are NaN; the other slots are untouched by it."""
  if matmul != "float32":
    request.getfixturevalue("needs_amx")
  cfg = models.ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                           tie_embeddings=False)
  params = _params(cfg, seed=1)
  params["embed"]["embedding"][7] = np.nan
  kv = np.zeros(models.kv_pages_shape(cfg, 5, 8), np.float32)
  table = np.arange(5, dtype=np.int32)[:, None]
  tokens = np.array([1, 7, 2, 3, 4], np.int32)
  positions = np.array([0, 1, 2, 3, 4], np.int32)
  weights = native.native_weights(cfg, params, matmul)
  logits, stats, _ = jax.jit(lambda: native.paged_step(cfg, weights, kv, tokens, positions, table))()
  logits = np.asarray(logits)
  assert np.isnan(logits[1]).all() and not np.isnan(np.delete(logits, 1, axis=0)).any()
  assert stats.argmax_B[1] == cfg.vocab_size - 1 and np.isnan(stats.max_B[1]) and np.isnan(stats.lse_B[1])
  np.testing.assert_array_equal(np.asarray(select.first_argmax(logits))[1], cfg.vocab_size - 1)
  _check_stats(np.delete(logits, 1, axis=0), jax.tree.map(lambda a: np.delete(np.asarray(a), 1), stats))


def test_make_backend_takes_the_plug_in_on_cpu_in_float32(needs_native_step):
  amx = native.amx_available()
  assert native.make_backend(CFG, jax.devices()) == native.NativeBackend("int8x9" if amx else "float32")
  assert native.make_backend(CFG, jax.devices(), matmul="float32").matmul == "float32"
  backend = sampling.load_backend("k15.sampling.native", CFG, jax.devices(), {"matmul": "float32"})
  assert backend == native.NativeBackend("float32") and not backend.splits_over_mesh
  assert sampling.load_backend("model", CFG, jax.devices()) == sampling.ModelBackend()
  assert sampling.load_backend("model", CFG, jax.devices(), {"scan_layers": True}).scan_layers


def test_the_model_backend_names_and_ignores_a_plug_ins_options(caplog):
  with caplog.at_level("WARNING"):
    assert sampling.load_backend("model", CFG, jax.devices(), {"matmul": "float32"}) == sampling.ModelBackend()
  assert "takes backend_options 'scan_layers' only; ignoring ['matmul']" in caplog.text


def test_step_model_takes_the_models_passes_with_the_native_attention(needs_native_step):
  backend = sampling.load_backend("k15.sampling.native", CFG, jax.devices(), {"step": "model"})
  assert backend == sampling.ModelBackend(attention=native.paged_attention) and backend.splits_over_mesh
  with pytest.raises(ValueError, match="step must be one of .* got 'xla'"):
    native.make_backend(CFG, jax.devices(), step="xla")


@pytest.mark.parametrize("T,N,K,H,Z", [(1, 10, 2, 16, 4), (4, 4, 2, 36, 3), (3, 20, 4, 32, 16)])
def test_native_paged_attention_matches_the_kernels_reference(needs_native_step, T, N, K, H, Z):
  """kernels.cc's attention alone (`native.paged_attention`) against jax's reference function of the TPU kernel,
  at every real query of rows over shuffled pages (a padding row, a row that ends inside it), which get zeros.
  Head dims of whole vectors and not; query heads that span more than one vector of lanes."""
  rng = np.random.RandomState(T)
  R, M = 5, 40 // Z
  P = R * M + 2
  kv = rng.normal(size=(P, Z, 2 * K, H)).astype(np.float32)
  q = rng.normal(size=(R, T, N, H)).astype(np.float32)
  table = rng.permutation(P)[:R * M].reshape(R, M).astype(np.int32)
  positions = (rng.randint(0, M * Z - T, R)[:, None] + np.arange(T)).astype(np.int32)
  positions[1], positions[2, T // 2:] = -1, -1
  want = attention.paged_attention_kernel(q, kv, table, positions, kernel=rpa.ref_ragged_paged_attention)
  got = np.asarray(jax.jit(native.paged_attention)(q, kv, table, positions))
  real = positions >= 0
  np.testing.assert_allclose(got[real], np.asarray(want)[real], atol=2e-6, rtol=2e-6)
  np.testing.assert_array_equal(got[~real], 0.0)


def test_amx_matmuls_without_amx_fall_back_to_float32_with_a_warning(needs_native_step, monkeypatch, caplog):
  monkeypatch.setattr(build, "amx_available", lambda: False)
  native.backend._warn_once.cache_clear()  # pylint: disable=protected-access
  assert native.make_backend(CFG, jax.devices(), "auto").matmul == "float32"  # quietly
  with caplog.at_level("WARNING"):
    assert native.make_backend(CFG, jax.devices(), "bf16x3").matmul == "float32"
  assert "matmul='bf16x3' needs a CPU with AMX" in caplog.text


def test_the_model_backend_where_the_plug_in_does_not_apply():
  """Below float32 the plug-in does not apply: load_backend falls back to the model's passes; required=True says
  why; an unknown matmul or module is named."""
  bf16 = dataclasses.replace(CFG, dtype="bfloat16")
  assert sampling.load_backend("k15.sampling.native", bf16, jax.devices()) == sampling.ModelBackend()
  with pytest.raises(ValueError, match="unavailable: it computes in float32 only"):
    native.make_backend(bf16, jax.devices(), required=True)
  with pytest.raises(ValueError, match="matmul must be 'auto' or one of .* got 'fp16'"):
    native.make_backend(CFG, jax.devices(), matmul="fp16")
  with pytest.raises(ValueError, match="'k15.nowhere': not 'model' and not an importable plug-in module"):
    sampling.load_backend("k15.nowhere", CFG, jax.devices())


def test_the_plug_in_needs_replicated_params(needs_native_step):
  """It cannot split over a tensor axis: an engine with a layout that splits the params says so at once."""
  from k15 import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh({"data": 4, "tensor": 2})
  scfg = sampling.SamplingConfig(greedy=True, max_new_tokens=4, max_length=16)
  with pytest.raises(ValueError, match="NativeBackend needs the params replicated over the mesh"):
    sampling.RolloutEngine(CFG, scfg, num_slots=8, mesh=mesh, backend=native.NativeBackend())


def test_native_step_names_weights_that_do_not_match_the_config(needs_native_step):
  """Weights packed for one model, stepped with another's config (here a different d_ff): a clear error, not a
  read past the buffers."""
  weights = native.native_weights(CFG, _params(CFG))
  other = dataclasses.replace(CFG, d_ff=96)
  kv = np.zeros(models.kv_pages_shape(CFG, 2, 8), np.float32)
  tokens, positions, table = np.zeros((2,), np.int32), np.zeros((2,), np.int32), np.zeros((2, 1), np.int32)
  with pytest.raises(Exception, match="weight shapes do not match the cache, the head counts and d_ff"):
    jax.block_until_ready(jax.jit(lambda: native.paged_step(other, weights, kv, tokens, positions, table))())


def test_a_page_outside_the_cache_is_never_touched(needs_native_step):
  """A page table entry past the cache's pages (or negative) writes nothing and reads zeros: no memory outside the
  cache is touched, whatever the host's table says."""
  weights = native.native_weights(CFG, _params(CFG))
  kv = np.ones(models.kv_pages_shape(CFG, 2, 8), np.float32)
  table = np.array([[7, 1], [-3, 0]], np.int32)
  _, _, got = jax.jit(lambda: native.paged_step(CFG, weights, kv, np.zeros((2,), np.int32),
                                                 np.array([2, 3], np.int32), table))()
  np.testing.assert_array_equal(got, kv)


def test_a_failed_build_names_the_command(tmp_path):
  with pytest.raises(build.BuildError, match="compiling kernels.cc failed.*false"):
    build.compile_cached("false", tmp_path)
  assert not list(tmp_path.glob("*.so"))  # no half-written library left behind


def test_a_tampered_cached_library_is_rebuilt_not_loaded(needs_native_step, tmp_path):
  """The cache records each library's SHA-256 at build time: a library whose bytes changed since (here: replaced
  by another file) is built again before it is loaded; a cache directory writable by others is refused."""
  cache = tmp_path / "cache"
  lib = build.compile_cached(build.compiler(), cache)
  original = lib.read_bytes()
  os.chmod(lib, 0o700)
  lib.write_bytes(b"\x7fELF not the kernels")
  again = build.compile_cached(build.compiler(), cache)
  assert again == lib and again.read_bytes() == original
  assert oct(cache.stat().st_mode & 0o777) == "0o700"
  shared = tmp_path / "shared"
  shared.mkdir(mode=0o777)
  os.chmod(shared, 0o777)
  with pytest.raises(build.BuildError, match="writable by other users"):
    build.compile_cached(build.compiler(), shared)


def test_a_build_without_amx_steps_alike_and_names_amx_weights(needs_native_step):
  """kernels.cc built as for a CPU without AMX (K15_NO_AMX): it compiles, its float32 step gives the repo build's
  logits and cache bit for bit, and AMX weights get an error that names the missing AMX."""
  cfg = models.ModelConfig(vocab_size=80, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96)
  params = _params(cfg, seed=2)
  kv, table, tokens, positions = _paged_case(cfg, 5, 1, 8, seed=4)
  build.register("k15_paged_step_no_amx", build.build(defines=("K15_NO_AMX",)))
  step = lambda w, target: jax.jit(lambda kv: native.paged_step(cfg, w, kv, tokens[:, 0], positions[:, 0], table,
                                                                 target=target))(kv)
  weights = native.native_weights(cfg, params)
  for a, b in zip(jax.tree.leaves(step(weights, "k15_paged_step_no_amx")), jax.tree.leaves(step(weights, build.TARGET))):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(Exception, match="AMX weights, but this build or this CPU has no AMX"):
    jax.block_until_ready(step(native.native_weights(cfg, params, "int8x9"), "k15_paged_step_no_amx"))


@pytest.mark.parametrize("vector_bytes", [32, 16])
@pytest.mark.parametrize("d_ff,B,head_dim,page_size,n_heads", [(96, 23, 16, 8, 4), (80, 13, 36, 5, 10)])
def test_builds_for_narrower_vectors_equal_the_model_step(needs_native_step, vector_bytes, d_ff, B, head_dim,
                                                          page_size, n_heads):
  """kernels.cc built as for a CPU whose registers hold 32 bytes (AVX2) or 16 (SSE, NEON), on any CPU: logits and
  cache match the model's paged pass. 23 slots take the two-panel blocks on AVX-512 only; head_dim 36 leaves a
  remainder past vectors of 8 floats; 10 query heads take a vector of 8 lanes and part of another (or two vectors
  of 4 and part of a third)."""
  cfg = models.ModelConfig(vocab_size=80, d_model=64, n_layers=2, n_heads=n_heads, n_kv_heads=2, head_dim=head_dim,
                           d_ff=d_ff, qkv_bias=True, tie_embeddings=True)
  params = _params(cfg, seed=3)
  kv, table, tokens, positions = _paged_case(cfg, B, 1, page_size, seed=5)
  target = f"k15_paged_step_{vector_bytes}_bytes"
  build.register(target, build.build(defines=(f"K15_VECTOR_BYTES={vector_bytes}",)))
  weights = native.native_weights(cfg, params)
  got_logits, stats, got_kv = jax.jit(lambda kv: native.paged_step(cfg, weights, kv, tokens[:, 0], positions[:, 0],
                                                                    table, target=target))(kv)
  want_logits, want_cache = models.forward_paged(cfg, params, tokens, positions, models.PagedCache(jnp.asarray(kv), table),
                                                 impl="xla")
  np.testing.assert_allclose(got_logits, np.asarray(want_logits)[:, 0], atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(got_kv, want_cache.kv_LxPxZxCxH, atol=2e-5)
  _check_stats(np.asarray(got_logits), stats)


def test_the_build_computes_on_the_widest_vectors_the_cpu_has(needs_native_step):
  """The kernels' vectors are as wide as this CPU's registers (its flags in /proc/cpuinfo): 64 bytes with AVX-512, 32
  with AVX, else 16."""
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  if not cpuinfo.exists() or platform.machine() != "x86_64":
    pytest.skip("reads an x86-64 CPU's flags from /proc/cpuinfo")
  flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split()
  assert native.vector_bytes() == (64 if "avx512f" in flags else 32 if "avx" in flags else 16)


def test_a_source_that_does_not_compile_names_its_file(needs_native_step, tmp_path):
  broken = tmp_path / "broken_step.cc"
  broken.write_text("this is not C++\n")
  with pytest.raises(build.BuildError, match="compiling broken_step.cc failed"):
    build.build(broken)


def test_without_a_compiler_the_build_says_so(monkeypatch, tmp_path):
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with pytest.raises(build.BuildError, match="no C.. compiler to build kernels.cc.*no-such-compiler"):
    build.build()


def test_nothing_outside_the_plug_in_names_it():
  """The core does not depend on the plug-in: 'native' appears nowhere in k15/ outside its folder."""
  root = pathlib.Path(__file__).parents[1] / "k15"
  plug_in = root / "sampling" / "native"
  files = [p for p in root.rglob("*") if p.is_file() and plug_in not in p.parents and "__pycache__" not in p.parts]
  hits = [f"{path}:{n}" for path in files for n, line in enumerate(path.read_text().splitlines(), 1) if "native" in line]
  assert not hits
