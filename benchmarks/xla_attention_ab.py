"""The XLA decode step with this tree's paged attention against variants of it, timed in one process.

  python benchmarks/xla_attention_ab.py variant.py [more.py ...]   # copies of k15/models/attention.py, changed
  python benchmarks/xla_attention_ab.py --rev HEAD~1                # the file as it was at a git revision
  python benchmarks/xla_attention_ab.py --native --scan_layers      # the native plug-in's attention; the layers
                                                                    # looped over their stack

A variant's `paged_attention_xla` takes the same arguments and gives the same results: each is first checked
against this tree's on random rows (padding and trailing padding included). Then the sampler benchmark's XLA decode
step (benchmarks/sampler.py `step_runs`: its model, one fake CPU device per core, the slots split over them) is
compiled with each (`sampling.ModelBackend(attention=...)`) and timed, interleaved for --rounds rounds, the best of
each kept. Prints ms per step and the ratio to this tree's. In one process, a drift of the machine's speed moves
every version alike (across processes, as in benchmarks/vs_commit.py, it does not).
"""
import argparse
import pathlib
import subprocess
import tempfile
import types

import numpy as np

import qwen2_model
import sampler as bench  # sets one fake CPU device per core before JAX starts
from timing import interleaved_best

from k15 import models, sampling
from k15.models import attention

REPO = pathlib.Path(__file__).resolve().parent.parent


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("variants", nargs="*", type=pathlib.Path, help="changed copies of k15/models/attention.py")
  p.add_argument("--rev", action="append", default=[], help="a git revision whose attention.py to time (repeatable)")
  p.add_argument("--native", action="store_true", help="also the native plug-in's attention (step='model')")
  p.add_argument("--scan_layers", action="store_true", help="also this tree's step with the layers looped over their "
                 "stack (ModelBackend(scan_layers=True)), each layer's weights sliced out of it")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--context", type=int, default=192, help="cached positions (the sampler benchmark's mean)")
  p.add_argument("--steps", type=int, default=64, help="steps per timed loop")
  p.add_argument("--rounds", type=int, default=9)
  args = p.parse_args()
  if not (args.variants or args.rev or args.native or args.scan_layers):
    p.error("name at least one variant file, --rev, --native or --scan_layers")
  return args


def load(name, source):
  """A module run from `source`: a version of k15/models/attention.py."""
  module = types.ModuleType(f"attention_{name}")
  exec(compile(source, name, "exec"), module.__dict__)  # pylint: disable=exec-used
  return module


def versions(args):
  """{name: paged_attention_xla}: this tree's first, then each variant's."""
  out = {"this tree": attention.paged_attention_xla}
  for path in args.variants:
    out[path.name] = load(path.name, path.read_text()).paged_attention_xla
  for rev in args.rev:
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:k15/models/attention.py"], capture_output=True,
                            text=True, check=True).stdout
    out[rev] = load(rev, source).paged_attention_xla
  if args.native:
    from k15.sampling import native  # pylint: disable=g-import-not-at-top
    out["native attention"] = native.paged_attention
  return out


def check(name, fn, want_fn):
  """fn's outputs equal want_fn's at every real query of random rows over shuffled pages."""
  rng = np.random.RandomState(0)
  R, T, N, K, H, Z, P, M = 6, 3, 8, 4, 32, 16, 64, 8
  kv = rng.normal(size=(P, Z, 2 * K, H)).astype(np.float32)
  q = rng.normal(size=(R, T, N, H)).astype(np.float32)
  table = rng.permutation(P)[:R * M].reshape(R, M).astype(np.int32)
  positions = (rng.randint(0, M * Z - T, R)[:, None] + np.arange(T)).astype(np.int32)
  positions[1], positions[2, T // 2:] = -1, -1  # a padding row; a sequence that ends inside its row
  real = positions >= 0
  got, want = (np.asarray(f(q, kv, table, positions, 16))[real] for f in (fn, want_fn))
  if not np.allclose(got, want, atol=1e-5, rtol=1e-5):
    raise SystemExit(f"{name}: paged_attention_xla differs from this tree's by {np.abs(got - want).max():.1e}")


def main():
  args = parse_args()
  fns = versions(args)
  for name, fn in fns.items():
    check(name, fn, fns["this tree"])
  with tempfile.TemporaryDirectory() as path:
    qwen2_model.save(path, False)
    cfg, params = models.load_hf(path)
  backends = {name: sampling.ModelBackend(attention=fn) for name, fn in fns.items()}
  if args.scan_layers:
    backends["layers scanned"] = sampling.ModelBackend(scan_layers=True)
  mesh = bench.device_mesh()
  runs = {name: bench.step_runs(cfg, params, args.batch, args.context, args.steps, backend, mesh)
          for name, backend in backends.items()}
  best = interleaved_best(runs, args.rounds)
  print(f"XLA decode step, batch {args.batch}, {args.context} cached positions, {mesh.size if mesh else 1} devices "
        f"(best of {args.rounds} interleaved rounds of {args.steps} steps):")
  for name, seconds in best.items():
    print(f"  {name:>20}: {seconds / args.steps * 1e3:.3f} ms per step, {seconds / best['this tree']:.3f}x this "
          f"tree's")


if __name__ == "__main__":
  main()
