"""Where a decode step of the model's XLA passes spends its time on this CPU, op by op.

  python benchmarks/xla_step_profile.py             # about half a minute
  python benchmarks/xla_step_profile.py --top 30

On the sampler benchmark's model (benchmarks/sampler.py), in its XLA setup (one fake CPU device per core, the slots
split over them, params replicated), a loop of --steps decode steps at --context cached positions runs under jax's
profiler. Each compiled op's time (summed over the devices, which run side by side) is joined to the jax operation
it came from (the compiled HLO's op_name), and printed per step: by part of the step (the paged attention's work
loop, the rest of attention, the MLP, ...) and the --top ops.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import qwen2_model
import sampler as bench  # sets one fake CPU device per core before JAX starts
import jax

from k15 import models, sampling


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--context", type=int, default=192, help="cached positions (the sampler benchmark's mean)")
  p.add_argument("--steps", type=int, default=64)
  p.add_argument("--top", type=int, default=15)
  return p.parse_args()


def op_names(hlo_text):
  """{compiled instruction name: the jax op_name of its metadata}."""
  pattern = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]+)\"", re.M)
  return dict(pattern.findall(hlo_text))


def part_of(op_name):
  """A coarse part of the decode step, from an op's jax op_name."""
  if "attn" in op_name:
    return "attention: paged work loop" if "attn/while" in op_name else "attention: projections, rotary, cache write"
  for key, part in (("dynamic_index_in_dim", "a layer's weights taken from the layer stack"), ("mlp", "MLP"),
                    ("norm", "norms"), ("embed", "embedding, output head"), ("attend", "embedding, output head")):
    if key in op_name:
      return part
  return "loop, sampling stats, other"


def main():
  args = parse_args()
  with tempfile.TemporaryDirectory() as path:
    qwen2_model.save(path, False)
    cfg, params = models.load_hf(path)
  run = bench.step_runs(cfg, params, args.batch, args.context, args.steps, sampling.ModelBackend(), bench.device_mesh())
  names = op_names(run.compiled_text())
  run()
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      run()
    trace = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
    events = json.load(gzip.open(trace))["traceEvents"]
  ops, parts = collections.defaultdict(lambda: [0.0, 0]), collections.defaultdict(float)
  for e in events:
    op = e.get("args", {}).get("hlo_op")
    if e.get("ph") != "X" or op is None or op.startswith("while") or op not in names:
      continue
    ops[op][0] += e["dur"] / 1e3 / args.steps  # ms per step
    ops[op][1] += 1
    parts[part_of(names[op])] += e["dur"] / 1e3 / args.steps
  total = sum(parts.values())
  print(f"XLA decode step, batch {args.batch}, {args.context} cached positions, {jax.device_count()} devices: "
        f"{total:.2f} ms of device time per step in compiled ops (summed over the devices)")
  for part, ms in sorted(parts.items(), key=lambda x: -x[1]):
    print(f"  {part:>45}: {ms:6.3f} ms ({ms / total:.0%})")
  print(f"the {args.top} costliest ops (ms per step, runs per step, jax op):")
  for op, (ms, n) in sorted(ops.items(), key=lambda x: -x[1][0])[:args.top]:
    print(f"  {ms:6.3f} ms {n / args.steps:5.1f}x  {op}: {names[op]}")


if __name__ == "__main__":
  main()
