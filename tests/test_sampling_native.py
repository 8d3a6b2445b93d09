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
  assert native.choose("auto", CFG, jax.devices()) == "native"
  assert native.choose("xla", CFG, jax.devices()) == "xla"


def test_auto_falls_back_to_xla_below_float32_and_native_says_why():
  bf16 = dataclasses.replace(CFG, dtype="bfloat16")
  assert native.choose("auto", bf16, jax.devices()) == "xla"
  with pytest.raises(ValueError, match="decode_kernel='native'.*float32"):
    native.choose("native", bf16, jax.devices())


def test_unknown_decode_kernel_is_rejected():
  with pytest.raises(ValueError, match="decode_kernel"):
    sampling.SamplingConfig(decode_kernel="cuda")


def test_a_failed_build_names_the_command(tmp_path):
  with pytest.raises(native.BuildError, match="compiling decode_step.cc failed.*false"):
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


@pytest.mark.parametrize("d_ff,B", [(96, 23), (80, 13)])
def test_native_step_equals_xla_step_over_many_slots(needs_native_step, d_ff, B):
  """B slots (the work shared by the CPU threads) at their own positions, two of them inactive (position >= the
  cache length): logits and written caches match XLA's step; inactive slots leave their cache untouched.
  d_ff 80 and vocab 80 end in part-filled weight panels; 23 and 13 slots split into row blocks of 12 + 11 and 7 + 6."""
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
  weights = native.decode_weights(cfg, params)
  nat = jax.jit(lambda ck, cv: native.decode_step(cfg, weights, ck, cv, tokens, positions))(cache_k, cache_v)
  ref = jax.jit(lambda ck, cv: step.decode_step(cfg, params, ck, cv, tokens, positions))(cache_k, cache_v)
  active = positions < S
  np.testing.assert_allclose(np.asarray(nat[0])[active], np.asarray(ref[0])[active], atol=2e-5, rtol=2e-5)
  for got, want, orig in zip(nat[2] + nat[3], ref[1] + ref[2], cache_k + cache_v):
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[~active], orig[~active])
  _check_stats(np.asarray(nat[0]), nat[1])


def _check_stats(logits, stats):
  """The native step's LogitStats against numpy on its own logits (float64 log-sum-exp)."""
  np.testing.assert_array_equal(stats.argmax_B, np.argmax(logits, axis=-1))  # the first maximum
  np.testing.assert_array_equal(stats.max_B, logits.max(axis=-1))
  lse = np.log(np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)).sum(axis=-1))
  np.testing.assert_allclose(stats.lse_B, lse, rtol=1e-6, atol=1e-6)


def test_native_stats_of_a_nan_row_follow_first_argmax(needs_native_step):
  """A slot whose token embeds to NaN gets NaN logits: its greedy token is V - 1 (`select.first_argmax`'s
  answer) and its max and lse are NaN; the other slots are untouched by it."""
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
  weights = native.decode_weights(cfg, params)
  logits, stats, _, _ = jax.jit(lambda: native.decode_step(cfg, weights, cache_k, cache_v, tokens, positions))()
  logits = np.asarray(logits)
  assert np.isnan(logits[1]).all() and not np.isnan(np.delete(logits, 1, axis=0)).any()
  assert stats.argmax_B[1] == cfg.vocab_size - 1 and np.isnan(stats.max_B[1]) and np.isnan(stats.lse_B[1])
  np.testing.assert_array_equal(np.asarray(select.first_argmax(logits))[1], cfg.vocab_size - 1)
  _check_stats(np.delete(logits, 1, axis=0), jax.tree.map(lambda a: np.delete(np.asarray(a), 1), stats))


def test_a_phase_times_build_steps_alike_and_counts_every_phase(needs_native_step):
  """benchmarks/decode_step.py's profiling build: the same logits and caches as the repo's step, every kind of
  phase timed, the calls counted, and the threads' running time within the wall time they had."""
  cfg = models.ModelConfig(vocab_size=80, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96)
  rng = np.random.RandomState(1)
  params = jax.tree.map(lambda a: (0.3 * rng.normal(size=a.shape)).astype(np.float32), models.abstract_params(cfg))
  B, S = 5, 24
  caches = [tuple(rng.normal(size=shape).astype(np.float32) for _ in range(2))
            for shape in ((B, 2, 16, S), (B, 2, S, 16))]
  tokens, positions = rng.randint(0, 80, B).astype(np.int32), rng.randint(0, S, B).astype(np.int32)
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
  with pytest.raises(native.BuildError, match="no C.. compiler to build decode_step.cc.*no-such-compiler"):
    native.load_variant("nocompiler")
