"""Sandbox throughput: executions per second per core of a trivial program, against the k1.5 report's sandbox.

  python benchmarks/sandbox.py            # 300 runs per variant (about half a minute on a 2-core CPU)
  python benchmarks/sandbox.py --quick    # 40 runs per variant

The report's code sandbox starts about 120 containers per second on 16 cores (7.5 per second per core). From one
run this prints, per core: the full k15 sandbox (as configured on this machine), the same without namespaces,
a bare `python -I -S` subprocess with no isolation (the floor on this machine), and CodeVerifier end to end
(code extraction, one stdin test, output check); with ratios against the report and against the bare subprocess.
The report's figure is for container starts (stronger isolation, heavier images), measured on its own hardware;
the ratio says whether the sandbox keeps up with rollouts, not which isolation is better. The machine may be shared:
the bare-subprocess row, measured in the same run, is the fair yardstick.
"""
import argparse
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from k15.rewards.code import CodeVerifier  # noqa: E402
from k15.rewards.sandbox import Sandbox, SandboxConfig  # noqa: E402

REPORT_PER_CORE = 120 / 16  # k1.5 report, section 2.6.4: ~120 container starts per second on 16 cores
PROGRAM = "print(input())"


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="fewer runs: checks that every part runs")
  p.add_argument("--runs", type=int, default=300, help="executions per variant")
  p.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel executions (default: one per core)")
  return p.parse_args()


def rate(fn, runs, workers):
  """Executions per second of fn() called `runs` times on `workers` threads (after one warm-up call)."""
  fn()
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    start = time.perf_counter()
    list(pool.map(lambda _: fn(), range(runs)))
    return runs / (time.perf_counter() - start)


def main():
  args = parse_args()
  runs = 40 if args.quick else args.runs
  cores = os.cpu_count()
  work_root = tempfile.mkdtemp(prefix="k15-bench-")
  config = SandboxConfig(work_root=work_root)
  full = Sandbox(config, slots=args.workers)
  plain = Sandbox(SandboxConfig(work_root=work_root, namespaces=False, allow_unisolated=True), slots=args.workers)
  python = full._python  # pylint: disable=protected-access  # the same interpreter for the bare floor

  def check(sandbox):
    def fn():
      result = sandbox.run({"main.py": PROGRAM}, "hi\n")
      assert result.status == "ok" and result.stdout == b"hi\n", result
    return fn

  def bare():
    out = subprocess.run([python, "-I", "-S", "-c", PROGRAM], input=b"hi\n", capture_output=True, check=True)
    assert out.stdout == b"hi\n"

  verifier = CodeVerifier(config, num_workers=args.workers)
  response, tests = f"```python\n{PROGRAM}\n```", [{"input": "hi\n", "output": "hi"}]

  def verify():
    assert verifier.score_one(response, tests).reward == 1.0

  print(f"{cores} cores, {args.workers} workers, {runs} runs per variant; isolation here: {full.isolation}")
  rows = [("k15 sandbox", check(full)), ("k15 sandbox, no namespaces", check(plain)),
          ("bare python -I -S subprocess", bare), ("CodeVerifier, 1 stdin test", verify)]
  rates = {name: rate(fn, runs, args.workers) for name, fn in rows}
  verifier.close()
  os.rmdir(work_root)
  floor = rates["bare python -I -S subprocess"]
  print(f"{'variant':32} {'exec/s':>8} {'per core':>9} {'/ report':>9} {'/ bare':>7}")
  for name, r in rates.items():
    print(f"{name:32} {r:8.1f} {r / cores:9.2f} {r / cores / REPORT_PER_CORE:8.2f}x {r / floor:6.2f}x")
  print(f"report's sandbox: 120 starts/s on 16 cores = {REPORT_PER_CORE:.2f}/s/core")


if __name__ == "__main__":
  main()
