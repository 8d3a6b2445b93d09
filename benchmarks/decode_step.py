"""Where the native plug-in's decode step's time goes, and A/B runs of variants of it against the repo's step.

  python benchmarks/decode_step.py                # time per phase kind of one step (a profiling build)
  python benchmarks/decode_step.py a.cc [b.cc..]  # each variant of kernels.cc against the repo's step
  python benchmarks/decode_step.py --prefill      # time per phase kind of one prefill call

On the sampler benchmark's model (width 256, 4 layers, 8 / 4 heads, MLP 1024, vocab 1024), `--batch` slots
at `--context` cached positions in pages of `--page_size` (each slot's pages spread over the cache, as a run's
allocations leave them), `--steps` greedy steps per jitted loop (the token of each step feeds the next);
`--matmul` picks the step's matmuls (float32 FMAs, or bfloat16 pieces or int8 slices on AMX tiles).

The default run builds kernels.cc with K15_PHASE_TIMES and prints, per kind of phase (embedding, each
layer's qkv / attention / o / norms / matmuls summed over layers, the output head, the logit stats), the time
a step spends running its items and waiting at the barrier that ends the phase, per thread (the threads'
seconds summed and divided by their number), and each matmul phase's FLOP/s. The timers cost the step a few
percent; the shares hold. With `--prefill`, the same for one prefill call that encodes `--batch` sequences of
`--context` tokens, a page of a sequence per row (as the engine's refills call it).

With variants: each file (same FFI arguments and results as kernels.cc) is built and checked for
bit-identical logits and caches against the repo's step, then all are timed interleaved, `--rounds` rounds; prints
the best ms per step of each, its ratio to the repo step's best, and the median over rounds of each round's ratio
(steadier when the host's speed drifts between rounds).
"""
import argparse
import ctypes
import functools
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from k15 import models
from k15.sampling import native
from k15.sampling.native import build
from timing import interleaved_times, median_ratio

# kernels.cc's phase kinds (PhasedStep::Kind), in order: what a K15_PHASE_TIMES build times.
PHASE_KINDS = ("embed", "qkv", "write", "attention", "o", "mlp norm", "gate_up", "act split", "down", "norm", "head",
               "stats")


def variant(name: str, source=build.SOURCE, defines=()) -> str:
  """`source` (kernels.cc or a variant of it: same arguments and results) built with macros `defines` and registered
  as FFI target "k15_paged_step_<name>"; returns the target."""
  target = f"{build.TARGET}_{name}"
  build.register(target, build.build(source, defines))
  return target


def phase_times(target: str):
  """{phase kind: (running, waiting) seconds summed over threads} and the calls since the last read, from a build
  with K15_PHASE_TIMES; clears them."""
  out = (ctypes.c_double * (2 * len(PHASE_KINDS) + 1))()
  build._LIBRARIES[target].K15PhaseTimes(out)  # pylint: disable=protected-access
  return {k: (out[2 * i], out[2 * i + 1]) for i, k in enumerate(PHASE_KINDS)}, int(out[-1])


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("variants", nargs="*", type=pathlib.Path, help="variants of kernels.cc to A/B")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--context", type=int, default=192, help="cached positions (the sampler benchmark's mean)")
  p.add_argument("--steps", type=int, default=64, help="steps per timed loop")
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--threads", type=int, default=0, help="0: XLA's whole CPU thread pool")
  p.add_argument("--page_size", type=int, default=16)
  p.add_argument("--prefill", action="store_true", help="profile a prefill call of --batch sequences of --context "
                 "tokens instead of a decode step")
  p.add_argument("--matmul", choices=list(native.MATMUL_PIECES), default="float32",
                 help="the step's matmuls: float32 FMAs, or bfloat16 pieces or int8 slices on AMX tiles")
  return p.parse_args()


CFG = models.ModelConfig(qkv_bias=True, tie_embeddings=True)


def step_loop(weights, table, args, target):
  """A jitted loop of `args.steps` steps of FFI target `target` at positions centred on `args.context` (their mean
  cached length); returns (the cache, last tokens, sum of the logits)."""
  B = args.batch

  def body(i, carry):
    kv, tokens_B, total = carry
    positions_B = jnp.full((B,), args.context - args.steps // 2, jnp.int32) + i
    logits, stats, kv = native.paged_step(CFG, weights, kv, tokens_B, positions_B, table, threads=args.threads,
                                          target=target)
    return kv, stats.argmax_B, total + logits

  @jax.jit
  def run(kv):
    init = (kv, jnp.arange(B, dtype=jnp.int32) * 7 % CFG.vocab_size, jnp.zeros((B, CFG.vocab_size), jnp.float32))
    return jax.lax.fori_loop(0, args.steps, body, init)

  return run


def inputs(args):
  """The packed weights, a cache of random keys and values with room for every slot at --context (and its steps
  past it), and a page table that gives each slot pages spread over it."""
  rng = np.random.RandomState(0)
  params = models.init_params(CFG, jax.random.key(0))
  M = -(-(args.context + (0 if args.prefill else args.steps // 2)) // args.page_size)
  P = args.batch * M
  kv = jnp.asarray(rng.normal(size=models.kv_pages_shape(CFG, P, args.page_size)), jnp.float32)
  table = rng.permutation(P).reshape(args.batch, M).astype(np.int32)
  return native.native_weights(CFG, params, args.matmul), kv, table


def prefill_call(weights, table, args, target):
  """A jitted prefill of --batch sequences of --context random tokens (row r: page r % M of sequence r // M) over
  each sequence's pages of `table`; returns the cache."""
  B, M, Z = args.batch, table.shape[1], args.page_size
  tokens = np.random.RandomState(1).randint(1, CFG.vocab_size, (B * M * Z,)).astype(np.int32)
  positions = np.arange(M * Z)[None].repeat(B, 0)
  positions = np.where(positions < args.context, positions, -1).reshape(-1).astype(np.int32)  # past it: padding
  rows_table = table.repeat(M, axis=0)  # each row reads its sequence's pages

  @jax.jit
  def run(kv):
    return native.paged_step(CFG, weights, kv, tokens, positions, rows_table, prefill=True, threads=args.threads,
                             target=target)[2]

  return run


def matmul_flops(args):
  """{matmul phase kind: FLOPs per call}: a step's tokens through every layer and the head; a prefill's through
  every layer's qkv, the last layer stopping at its keys and values."""
  D, E, NH, F = CFG.d_model, (CFG.n_heads + 2 * CFG.n_kv_heads) * CFG.head_dim, CFG.n_heads * CFG.head_dim, CFG.d_ff
  tokens = args.batch * (args.context if args.prefill else 1)
  L, rest = CFG.n_layers, CFG.n_layers - (1 if args.prefill else 0)
  return {"qkv": 2 * tokens * D * E * L, "o": 2 * tokens * NH * D * rest, "gate_up": 4 * tokens * D * F * rest,
          "down": 2 * tokens * F * D * rest, "head": 0 if args.prefill else 2 * tokens * D * CFG.vocab_size}


def phases(args):
  weights, kv, table = inputs(args)
  target = variant("phase_times", defines=("K15_PHASE_TIMES",))
  run = (prefill_call if args.prefill else step_loop)(weights, table, args, target)
  jax.block_until_ready(run(kv))  # compiles
  best, best_times = math.inf, None
  for _ in range(args.rounds):
    phase_times(target)  # clears
    start = time.perf_counter()
    jax.block_until_ready(run(kv))
    seconds = time.perf_counter() - start
    times, calls = phase_times(target)
    if seconds < best:
      best, best_times = seconds, (times, calls)
  times, calls = best_times
  threads = sum(run_s + wait_s for run_s, wait_s in times.values()) / best  # the threads that took part
  per_step = lambda s: 1e3 * s / calls / threads
  total = sum(run_s for run_s, _ in times.values())
  if args.prefill:
    print(f"prefill of {args.batch} sequences of {args.context} tokens (a page of {args.page_size} a row): "
          f"{1e3 * best:.3f} ms per call (best of {args.rounds}), about {threads:.1f} threads working")
  else:
    print(f"{args.batch} slots at {args.context} cached positions (pages of {args.page_size}): "
          f"{1e3 * best / args.steps:.3f} ms per step "
          f"(best of {args.rounds} loops of {args.steps}), about {threads:.1f} threads working")
  flops = matmul_flops(args)
  print(f"{'phase':>10} {'running ms':>11} {'waiting ms':>11} {'share':>6} {'GFLOP/s':>8}")
  for kind, (run_s, wait_s) in times.items():
    rate = f"{flops[kind] / (per_step(run_s) * 1e-3) / 1e9:8.1f}" if flops.get(kind) and run_s else ""
    print(f"{kind:>10} {per_step(run_s):11.3f} {per_step(wait_s):11.3f} {run_s / total:6.1%} {rate}")
  wait = sum(w for _, w in times.values())
  print(f"{'all':>10} {per_step(total):11.3f} {per_step(wait):11.3f}")


def ab(args):
  weights, kv, table = inputs(args)
  names = ["repo"] + [str(v) for v in args.variants]
  targets = [build.TARGET] + [variant(f"v{i}", source=v) for i, v in enumerate(args.variants)]
  runs = [step_loop(weights, table, args, t) for t in targets]
  outs = [jax.block_until_ready(r(kv)) for r in runs]
  for name, out in zip(names[1:], outs[1:]):
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(outs[0])))
    diff = float(jnp.max(jnp.abs(out[2] - outs[0][2])))
    print(f"{name}: " + ("bit-identical to the repo step" if same else
                         f"DIFFERS from the repo step (summed logits by up to {diff:.3g})"))
  times = interleaved_times({name: functools.partial(lambda run: jax.block_until_ready(run(kv)), run)
                             for name, run in zip(names, runs)}, args.rounds)
  for name in names:
    b = min(times[name])
    print(f"{name:>24} {1e3 * b / args.steps:7.3f} ms per step  {b / min(times['repo']):6.3f}x the repo step (best of "
          f"each); {median_ratio(times, 'repo', name):6.3f}x (median of the rounds' ratios)")


def main():
  args = parse_args()
  build.require("the native decode step")
  if args.matmul != "float32" and not native.amx_available():
    raise SystemExit(f"--matmul={args.matmul} needs a CPU with AMX tiles")
  if args.prefill and args.variants:
    raise SystemExit("--prefill profiles the repo's kernels.cc; variants are timed on decode steps (drop one)")
  ab(args) if args.variants else phases(args)


if __name__ == "__main__":
  main()
