"""The native CPU decode step's choice and its errors (its numbers are tested beside XLA's in test_sampling.py)."""
import dataclasses
import os
import time

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from k15 import models, sampling
from k15.sampling import native, select

CFG = models.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)


def test_auto_takes_the_native_step_on_cpu_in_float32(needs_native_step):
  amx = native.amx_available()
  assert native.choose("auto", CFG, jax.devices()) == ("native_int8x9" if amx else "native")
  assert native.choose("native", CFG, jax.devices(), "float32") == "native"
  assert native.choose("native", CFG, jax.devices(), "bf16x3") == ("native_bf16x3" if amx else "native")
  assert native.choose("xla", CFG, jax.devices(), "bf16x6") == "xla"
  assert native.choose("native", CFG, jax.devices(), "int8x9") == ("native_int8x9" if amx else "native")
  assert [native.matmul_of(k) for k in ("native", "native_bf16x3", "native_int8x9")] == ["float32", "bf16x3",
                                                                                          "int8x9"]


def test_amx_matmuls_without_amx_fall_back_to_float32_with_a_warning(needs_native_step, monkeypatch, caplog):
  monkeypatch.setattr(native, "amx_available", lambda: False)
  native._warn_once.cache_clear()  # pylint: disable=protected-access
  assert native.choose("auto", CFG, jax.devices(), "auto") == "native"  # quietly
  with caplog.at_level("WARNING"):
    assert native.choose("auto", CFG, jax.devices(), "bf16x3") == "native"
  assert "native_matmul='bf16x3' needs a CPU with AMX" in caplog.text


def test_unknown_native_matmul_is_rejected():
  with pytest.raises(ValueError, match="native_matmul"):
    sampling.SamplingConfig(native_matmul="fp16")


def test_auto_falls_back_to_xla_below_float32_and_native_says_why():
  bf16 = dataclasses.replace(CFG, dtype="bfloat16")
  assert native.choose("auto", bf16, jax.devices()) == "xla"
  with pytest.raises(ValueError, match="decode_kernel='native'.*float32"):
    native.choose("native", bf16, jax.devices())


def test_unknown_decode_kernel_is_rejected():
  with pytest.raises(ValueError, match="decode_kernel"):
    sampling.SamplingConfig(decode_kernel="cuda")


def test_a_failed_build_names_the_command(tmp_path):
  with pytest.raises(native.BuildError, match="compiling kernels.cc failed.*false"):
    native._build("false", tmp_path)  # pylint: disable=protected-access
  assert not list(tmp_path.glob("*.so"))  # no half-written library left behind


def test_native_with_sharded_params_is_an_error(needs_native_step):
  mesh = Mesh(np.array(jax.devices()), ("fsdp",), axis_types=(AxisType.Auto,))
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), models.abstract_params(CFG))
  params["embed"]["embedding"] = jax.device_put(params["embed"]["embedding"], NamedSharding(mesh, P(None, "fsdp")))
  scfg = sampling.SamplingConfig(greedy=True, max_new_tokens=4, max_length=16, decode_kernel="native")
  engine = sampling.RolloutEngine(CFG, scfg, num_slots=len(jax.devices()), mesh=mesh)
  with pytest.raises(ValueError, match="needs params replicated"):
    engine.run(params, [sampling.Request(0, [1, 2])], None, 0, None, jax.random.key(0))


# The native step's matmuls (weight pieces) and how close to XLA's float32 step each must be: float32 FMAs and 6
# products of 3 bfloat16 pieces as float32; 3 products of 2 pieces keep 16 bits of each operand.
MATMULS = {"float32": 2e-5, "bf16x6": 2e-5, "int8x9": 2e-5, "bf16x3": 2e-4}


@pytest.mark.parametrize("matmul", list(MATMULS))
@pytest.mark.parametrize("d_ff,B", [(96, 23), (80, 13)])
def test_native_step_equals_xla_step_over_many_slots(needs_native_step, request, matmul, d_ff, B):
  """B slots (the work shared by the CPU threads) at their own positions, two of them inactive (position >= the
  cache length): logits and written caches match XLA's step; inactive slots leave their cache untouched.
  d_ff 80 and vocab 80 end in part-filled weight panels; 23 and 13 slots split into row blocks of 12 + 11 and 7 + 6
  (FMAs), and into two row tiles and one (AMX, the rows padded to whole tiles of 16)."""
  tol = MATMULS[matmul]
  if matmul != "float32":
    request.getfixturevalue("needs_amx")
  from k15.sampling import step  # pylint: disable=g-import-not-at-top
  cfg = models.ModelConfig(vocab_size=80, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=d_ff,
                           qkv_bias=True, tie_embeddings=True)
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda a: (0.3 * rng.normal(size=a.shape)).astype(np.float32), models.abstract_params(cfg))
  S = 40
  cache_k = tuple(rng.normal(size=(B, 2, 16, S)).astype(np.float32) for _ in range(2))
  cache_v = tuple(rng.normal(size=(B, 2, S, 16)).astype(np.float32) for _ in range(2))
  tokens = rng.randint(0, 80, B).astype(np.int32)
  positions = rng.randint(0, S, B).astype(np.int32)
  positions[[3, B - 1]] = [S, S + 5]  # inactive
  weights = native.decode_weights(cfg, params, matmul)
  nat = jax.jit(lambda ck, cv: native.decode_step(cfg, weights, ck, cv, tokens, positions))(cache_k, cache_v)
  ref = jax.jit(lambda ck, cv: step.decode_step(cfg, params, ck, cv, tokens, positions))(cache_k, cache_v)
  active = positions < S
  np.testing.assert_allclose(np.asarray(nat[0])[active], np.asarray(ref[0])[active], atol=tol, rtol=tol)
  for got, want, orig in zip(nat[2] + nat[3], ref[1] + ref[2], cache_k + cache_v):
    np.testing.assert_allclose(got, want, atol=tol)
    np.testing.assert_array_equal(np.asarray(got)[~active], orig[~active])
  _check_stats(np.asarray(nat[0]), nat[1])


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
  rng = np.random.RandomState(1)
  params = jax.tree.map(lambda a: (0.3 * rng.normal(size=a.shape)).astype(np.float32), models.abstract_params(cfg))
  params["embed"]["embedding"][7] = np.nan
  B, S = 5, 8
  cache_k = (np.zeros((B, 1, 16, S), np.float32),)
  cache_v = (np.zeros((B, 1, S, 16), np.float32),)
  tokens = np.array([1, 7, 2, 3, 4], np.int32)
  positions = np.array([0, 1, 2, 3, 4], np.int32)
  weights = native.decode_weights(cfg, params, matmul)
  logits, stats, _, _ = jax.jit(lambda: native.decode_step(cfg, weights, cache_k, cache_v, tokens, positions))()
  logits = np.asarray(logits)
  assert np.isnan(logits[1]).all() and not np.isnan(np.delete(logits, 1, axis=0)).any()
  assert stats.argmax_B[1] == cfg.vocab_size - 1 and np.isnan(stats.max_B[1]) and np.isnan(stats.lse_B[1])
  np.testing.assert_array_equal(np.asarray(select.first_argmax(logits))[1], cfg.vocab_size - 1)
  _check_stats(np.delete(logits, 1, axis=0), jax.tree.map(lambda a: np.delete(np.asarray(a), 1), stats))


def _variant_inputs(seed):
  """A small model, its random params, 5 slots' caches (24 positions), tokens and positions: for variant builds."""
  cfg = models.ModelConfig(vocab_size=80, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96)
  rng = np.random.RandomState(seed)
  params = jax.tree.map(lambda a: (0.3 * rng.normal(size=a.shape)).astype(np.float32), models.abstract_params(cfg))
  B, S = 5, 24
  caches = [tuple(rng.normal(size=shape).astype(np.float32) for _ in range(2))
            for shape in ((B, 2, 16, S), (B, 2, S, 16))]
  tokens, positions = rng.randint(0, 80, B).astype(np.int32), rng.randint(0, S, B).astype(np.int32)
  return cfg, params, caches, tokens, positions


def test_a_build_without_amx_steps_alike_and_names_amx_weights(needs_native_step):
  """kernels.cc built as for a CPU without AMX (K15_NO_AMX): it compiles, its float32 step gives the repo step's
  logits and caches bit for bit, and AMX weights get an error that names the missing AMX."""
  cfg, params, caches, tokens, positions = _variant_inputs(seed=2)
  target = native.load_variant("no_amx", defines=("K15_NO_AMX",))
  step = lambda w, t: jax.jit(lambda ck, cv: native.decode_step(cfg, w, ck, cv, tokens, positions, target=t))
  weights = native.decode_weights(cfg, params)
  got, want = step(weights, target)(*caches), step(weights, native.TARGET)(*caches)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(Exception, match="AMX weights, but this build or this CPU has no AMX"):
    jax.block_until_ready(step(native.decode_weights(cfg, params, "int8x9"), target)(*caches))


def test_a_phase_times_build_steps_alike_and_counts_every_phase(needs_native_step):
  """benchmarks/decode_step.py's profiling build: the same logits and caches as the repo's step, every kind of
  phase timed, the calls counted, and the threads' running time within the wall time they had."""
  cfg, params, caches, tokens, positions = _variant_inputs(seed=1)
  weights = native.decode_weights(cfg, params)
  target = native.load_variant("phase_times", defines=("K15_PHASE_TIMES",))
  steps = {t: jax.jit(lambda ck, cv, t=t: native.decode_step(cfg, weights, ck, cv, tokens, positions, target=t))
           for t in (native.TARGET, target)}
  want = steps[native.TARGET](*caches)
  native.phase_times(target)  # clears
  start = time.perf_counter()
  for _ in range(3):
    got = jax.block_until_ready(steps[target](*caches))
  wall = time.perf_counter() - start
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  times, calls = native.phase_times(target)
  assert calls == 3
  assert set(times) == set(native.PHASE_KINDS) and all(run > 0 and wait >= 0 for run, wait in times.values())
  assert sum(run + wait for run, wait in times.values()) <= wall * os.cpu_count()  # threads of XLA's CPU pool
  assert native.phase_times(target) == ({k: (0.0, 0.0) for k in native.PHASE_KINDS}, 0)  # read clears


def test_a_variant_that_does_not_compile_names_its_file(needs_native_step, tmp_path):
  broken = tmp_path / "broken_step.cc"
  broken.write_text("this is not C++\n")
  with pytest.raises(native.BuildError, match="compiling broken_step.cc failed"):
    native.load_variant("broken", source=broken)


def test_a_variant_without_a_compiler_says_so(monkeypatch, tmp_path):
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with pytest.raises(native.BuildError, match="no C.. compiler to build kernels.cc.*no-such-compiler"):
    native.load_variant("nocompiler")


@pytest.mark.parametrize("M,K,N,swiglu", [(1, 32, 32, False), (37, 72, 80, False), (300, 64, 96, True),
                                          (600, 40, 33, False)])
def test_amx_matmul_matches_float64(needs_amx, M, K, N, swiglu):
  """native.matmul (prefill's matmuls on AMX tiles) against numpy in float64, layer 1 of a stack of 2: with 3
  bfloat16 pieces within float32's error (as XLA's float32 matmul), with 2 within 16 bits; int8 slices within
  float32's error relative to each weight column's largest value (their scale). Shapes cover a single row, K
  padded to whole 32- and 64-row blocks, part-filled panels and row tiles, several row blocks (600 rows), and the
  fused silu(x Wgate) * (x Wup) over gate and up panels alternating. One input column is 100 times the others (an
  activation outlier: a row's int8 slices resolve the rest relative to it)."""
  rng = np.random.RandomState(0)
  x = rng.normal(size=(M, K)).astype(np.float32)
  x[:, K // 3] *= 100
  w = (rng.normal(size=(2, K, 2 * N if swiglu else N)) / np.sqrt(K)).astype(np.float32)
  x64, w64 = x.astype(np.float64), w[1].astype(np.float64)
  if swiglu:
    gate, up = x64 @ w64[:, :N], x64 @ w64[:, N:]
    want = gate / (1 + np.exp(-gate)) * up
    scale = (np.abs(x64) @ np.abs(w64[:, :N])) * (np.abs(x64) @ np.abs(w64[:, N:]))  # |gate| |up| bounds
  else:
    want, scale = x64 @ w64, np.abs(x64) @ np.abs(w64)  # error bounds scale with the sum of |products|
  # int8 slices: each |w| counts as its column's largest (their shared scale)
  at_max = np.abs(x64) @ np.broadcast_to(np.abs(w64).max(axis=0, keepdims=True), w64.shape)
  if swiglu:
    g, u = np.abs(x64) @ np.abs(w64[:, :N]), np.abs(x64) @ np.abs(w64[:, N:])
    int8_scale = at_max[:, :N] * u + g * at_max[:, N:]
  else:
    int8_scale = at_max
  xla_error = np.max(np.abs(np.asarray(jax.jit(lambda a, b: a @ b)(x, w[1][:, :N] if swiglu else w[1])) -
                            (x64 @ w64[:, :N] if swiglu else want)) / (np.abs(x64) @ np.abs(w64[:, :N])))
  float32 = 4 * max(xla_error, 2 ** -24)
  for matmul, bound, norm in [("bf16x6", float32, scale), ("int8x9", float32, int8_scale), ("bf16x3", 2 ** -14, scale)]:
    w_native = native.decode_weights_packer(matmul)
    packed = native.pack_pairs(w, w_native) if swiglu else w_native(w)
    got = np.asarray(jax.jit(lambda a, b: native.matmul(a, b, N, layer=1, swiglu=swiglu))(x, packed))
    assert got.shape == (M, N)
    assert np.max(np.abs(got - want) / norm) < bound, matmul


def test_int8_slices_resolve_each_value_beside_a_row_outlier(needs_amx):
  """int8x9: a row's slices share one scale (its largest value, here 1000 times the rest), so the others live in
  the later slices; with four of them (and every product of order 3) each is still resolved to about 2^-31 of
  the largest (here about 1e-6 of the others: float32 would keep 6e-8). Each output column picks one input column
  (times a weight of 24 bits), so every result is one product. Dropping the fourth slice or an order-3 product
  errs by 1e-5 and more."""
  rng = np.random.RandomState(3)
  M, K, N = 20, 96, 64
  x = rng.uniform(0.5, 1.0, size=(M, K)).astype(np.float32) * rng.choice([-1, 1], size=(M, K))
  x[:, 7] *= 1000
  w = np.zeros((K, N), np.float32)
  w[(np.arange(N) * 5 + 1) % K, np.arange(N)] = rng.uniform(0.5, 1.0, N)  # never row 7
  got = np.asarray(jax.jit(lambda a, b: native.matmul(a, b, N))(x, native.pack_int8(w)))
  np.testing.assert_allclose(got, x.astype(np.float64) @ w.astype(np.float64), rtol=4e-6)


@pytest.mark.parametrize("matmul", ["bf16x6", "int8x9"])
def test_amx_matmul_names_a_shape_mismatch(needs_amx, matmul):
  packed = native.decode_weights_packer(matmul)(np.zeros((64, 32), np.float32))
  with pytest.raises(Exception, match="k15 matmul: shapes of x, w and y do not match"):
    jax.block_until_ready(jax.jit(lambda a: native.matmul(a, packed, 32))(np.zeros((4, 160), np.float32)))


@pytest.mark.parametrize("P,T,N,K,H", [(3, 37, 6, 2, 8), (2, 70, 4, 4, 40), (1, 1, 2, 1, 16), (2, 100, 8, 4, 32)])
def test_prefill_attention_matches_the_models_attend(needs_native_step, P, T, N, K, H):
  """native.prefill_attention against the model's attention with a causal mask: grouped queries (up to 3 per kv
  head), head sizes under, over and at 32 (a slab's width), positions in part-filled 32-position blocks."""
  from k15.models.transformer import attend  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  q, k, v = (rng.normal(size=(P, T, n, H)).astype(np.float32) for n in (N, K, K))
  positions = np.arange(T)
  want = jax.jit(attend)(q, k, v, np.broadcast_to(positions[None, :] <= positions[:, None], (P, T, T)))
  got = jax.jit(native.prefill_attention)(q, k, v)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-6)


def test_native_step_names_weights_that_do_not_match_the_config(needs_native_step):
  """Weights packed for one model, stepped with another's config (here a different d_ff): a clear error, not a
  read past the buffers."""
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), models.abstract_params(CFG))
  weights = native.decode_weights(CFG, params)
  other = dataclasses.replace(CFG, d_ff=96)
  caches = (np.zeros((2, 1, 16, 8), np.float32),), (np.zeros((2, 1, 8, 16), np.float32),)
  tokens, positions = np.zeros((2,), np.int32), np.zeros((2,), np.int32)
  with pytest.raises(Exception, match="weight shapes do not match the head counts and d_ff"):
    jax.block_until_ready(jax.jit(lambda: native.decode_step(other, weights, *caches, tokens, positions))())


def test_prefill_benchmark_runs(needs_native_step, monkeypatch, capsys):
  """benchmarks/prefill.py --quick: every part runs and prints its ratios to XLA."""
  import pathlib  # pylint: disable=g-import-not-at-top
  import runpy  # pylint: disable=g-import-not-at-top
  script = pathlib.Path(__file__).parents[1] / "benchmarks" / "prefill.py"
  monkeypatch.setattr("sys.argv", [str(script), "--quick"])
  runpy.run_path(str(script), run_name="__main__")
  out = capsys.readouterr().out
  assert "causal attention" in out and "native, float32" in out and out.count("x XLA") >= 3
