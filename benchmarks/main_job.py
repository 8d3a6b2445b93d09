"""The arith main job end to end, with the long-sequence paths off and on, in one run.

  python benchmarks/main_job.py            # about 12 minutes on an idle 2-core CPU
  python benchmarks/main_job.py --quick    # the smoke config, under a minute

"plain": a row per sample, dense attention, every logit at once (rl.pack=False, model.attention=dense,
model.logprob_chunk=0). "packed+tiled": samples packed into rows, blockwise attention and log-probs in chunks of
64 positions (smaller than the task's ~190-token rows, so each really is tiled). Each runs the whole job (task,
SFT warm-up, RL, evaluation) from an empty workdir in a subprocess; the script prints wall and CPU time, their
ratio packed+tiled / plain, and each run's held-out accuracy. The paths give the same losses to float rounding, so
accuracies differ only by the rounding's effect on sampling.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "plain": ["--config.rl.pack=False", "--config.model.attention=dense", "--config.model.logprob_chunk=0"],
    "packed+tiled": ["--config.rl.pack=True", "--config.model.attention=blockwise", "--config.model.attention_block=64",
                     "--config.model.logprob_chunk=64"],
}


def run_job(config: str, overrides, workdir: str) -> dict:
  """Runs the main job; returns its wall and CPU seconds and summary.json."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  cmd = [sys.executable, "-m", "experiments.train", f"--config={config}", f"--workdir={workdir}", *overrides]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  if out.returncode != 0:
    sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  with open(os.path.join(workdir, "summary.json")) as f:
    return dict(wall=wall, cpu=cpu, summary=json.load(f))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="the smoke config")
  args = parser.parse_args()
  config = "experiments/configs/arith.py" + (":smoke" if args.quick else "")
  results = {}
  with tempfile.TemporaryDirectory() as root:
    for name, overrides in VARIANTS.items():
      print(f"running {name} ...", flush=True)
      results[name] = run_job(config, overrides, os.path.join(root, name))
  print(f"\nmain job {config}")
  print(f"  {'':14} {'wall s':>8} {'cpu s':>8}  held-out accuracy (greedy) warm-up -> RL")
  for name, r in results.items():
    s = r["summary"]
    start = next(k for k in s if k not in ("k1.5 RL", "per_level_accuracy", "wall_time_s"))
    print(f"  {name:14} {r['wall']:8.1f} {r['cpu']:8.1f}  {s[start]['accuracy']:.3f} -> {s['k1.5 RL']['accuracy']:.3f}")
  plain, new = results["plain"], results["packed+tiled"]
  print(f"  packed+tiled / plain: wall {new['wall'] / plain['wall']:.3f}x, cpu {new['cpu'] / plain['cpu']:.3f}x")


if __name__ == "__main__":
  main()
