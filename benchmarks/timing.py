"""Timing helpers shared by the benchmarks: interleaved rounds (their best times, and the median of each round's own
ratio), the machine's matmul rate and its streaming read (`stream.cc`)."""
import ctypes
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

MATMUL_FLOPS = 2 * 2048 ** 3


def interleaved_times(runs, repeats):
  """Seconds of each named callable in each of `repeats` rounds ({name: [seconds, a round each]}), each round
  running every callable once.

  Interleaving puts a change in the machine's speed (a shared or throttled CPU) on all of them alike, so
  the ratios between them hold even when the absolute times drift during the run.
  """
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, fn in runs.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return times


def interleaved_best(runs, repeats):
  """Best seconds of each named callable over `repeats` interleaved rounds (`interleaved_times`)."""
  return {name: min(seconds) for name, seconds in interleaved_times(runs, repeats).items()}


def median_ratio(times, name, peer):
  """The median over rounds of each round's time of `peer` / time of `name` (`interleaved_times`): a ratio each
  round measures within itself, which a slow round of one of them moves less than it can move the best times'."""
  return float(np.median(np.array(times[peer]) / np.array(times[name])))


def matmul_run():
  """A 2048-square float32 matmul (MATMUL_FLOPS): the machine's practical FLOP/s."""
  x = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  run = lambda: f(x).block_until_ready()
  run()
  return run


STREAM_PASSES = 16


def stream_run(n_bytes):
  """STREAM_PASSES reads of a float32 array of `n_bytes` on every core (benchmarks/stream.cc): the rate a
  decode step can read its weights and KV cache. The array is as large as what a step reads, so it stays in
  the same level of the memory (a large L3 cache holds it whole; a small one does not)."""
  from k15.sampling.native import build  # pylint: disable=import-outside-toplevel (vs_commit.py's older trees)
  lib = ctypes.cdll.LoadLibrary(str(build.build(pathlib.Path(__file__).with_name("stream.cc"))))
  lib.k15_stream.restype = ctypes.c_double
  lib.k15_stream.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
  x = np.ones(n_bytes // 4, np.float32)
  run = lambda: lib.k15_stream(x.ctypes.data, x.size, STREAM_PASSES, os.cpu_count())
  if run() != x.size * STREAM_PASSES:  # every value read, each pass
    raise RuntimeError(f"stream.cc read {run()} ones of {x.size * STREAM_PASSES}")
  return run
