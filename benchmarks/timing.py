"""Timing helpers shared by the benchmarks: interleaved best-of rounds and the machine's matmul rate."""
import math
import time

import jax
import jax.numpy as jnp

MATMUL_FLOPS = 2 * 2048 ** 3


def interleaved_best(runs, repeats):
  """Best seconds of each named callable over `repeats` rounds, each round running every callable once.

  Interleaving puts a change in the machine's speed (a shared or throttled CPU) on all of them alike, so
  the ratios between them hold even when the absolute times drift during the run.
  """
  best = {name: math.inf for name in runs}
  for _ in range(repeats):
    for name, fn in runs.items():
      start = time.perf_counter()
      fn()
      best[name] = min(best[name], time.perf_counter() - start)
  return best


def matmul_run():
  """A 2048-square float32 matmul (MATMUL_FLOPS): the machine's practical FLOP/s."""
  x = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  run = lambda: f(x).block_until_ready()
  run()
  return run
