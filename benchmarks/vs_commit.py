"""k15's sampling paths against transformers, at another commit and at this tree, in one run.

  python benchmarks/vs_commit.py --commit f68d960

The sampler benchmark's ratios to transformers move with the machine (a target set on a CPU with AMX cannot be read
on one without it); this puts an older commit's ratios beside this tree's on the same machine. Each tree (this one,
and the commit checked out into a temporary git worktree) runs in a child process of its own, on the sampler
benchmark's model and workload (benchmarks/sampler.py: batch 32, prompt 64, 256 new greedy tokens):
- "native": `sampling.generate` as a user gets it on CPU (the native step, one device; in this tree the plug-in
  `k15.sampling.native`, as the experiment configs name it);
- "xla": `sampling.generate` through XLA (the model's paged passes, or the hand-written XLA step of older trees) on a
  mesh of one fake CPU device per core;
- transformers `generate` and a 2048-square float32 matmul (the machine's FLOP/s),
interleaved for --repeats rounds, the best of each kept. The children take turns for --rounds rounds; each tree's best
ratios are printed, with each path's useful FLOP/s as a share of the matmul's; then each tree's paths against one
transformers time, the fastest of all the children's (each child's own moves with the host's speed during its turn).
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import qwen2_model

REPO = pathlib.Path(__file__).resolve().parent.parent
PATHS = ("native", "xla")


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--commit", default="f68d960", help="the other tree's commit (default: the last before the paged "
                 "cache whose native step builds without AMX; the sampler targets were set at aa62d0e, before its fixes)")
  p.add_argument("--rounds", type=int, default=2, help="turns of each tree's child")
  p.add_argument("--repeats", type=int, default=5, help="interleaved rounds inside a child")
  p.add_argument("--quick", action="store_true", help="small sizes: checks that it runs")
  p.add_argument("--child", help=argparse.SUPPRESS)  # a tree's path: run its measurement, print one JSON line
  return p.parse_args()


def workload(quick: bool):
  """batch, prompt, new tokens, chunk."""
  return (4, 16, 32, 16) if quick else (32, 64, 256, 64)


def measure(tree: str, repeats: int, quick: bool) -> dict:
  """In a child: the tree's native and XLA generates, transformers generate and the matmul, interleaved."""
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={os.cpu_count()}"
  sys.path.insert(0, tree)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
  from k15 import models, sampling, sharding  # pylint: disable=import-outside-toplevel
  from timing import interleaved_best, matmul_run  # pylint: disable=import-outside-toplevel

  batch, prompt, new, chunk = workload(quick)
  with tempfile.TemporaryDirectory() as path:
    hf = qwen2_model.save(path, quick)  # this tree's model, whichever tree's k15 loads it
    cfg, params = models.load_hf(path)
  prompts = np.random.RandomState(1).randint(1, cfg.vocab_size - 1, (batch, prompt)).tolist()
  mesh = sharding.make_mesh({"data": -1})  # every device on the slot axis
  replicated = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  fields = dict(greedy=True, max_new_tokens=new, chunk_size=chunk, max_length=prompt + new)
  if hasattr(sampling, "ModelBackend"):  # the backend interface, the native step a plug-in the configs name
    plugin = sampling.load_backend("k15.sampling.native", cfg, jax.devices()[:1], {"required": True})
    native = (sampling.SamplingConfig(**fields), dict(backend=plugin))
    xla = (sampling.SamplingConfig(**fields), dict(backend=sampling.ModelBackend()))
  else:  # before it: the decode kernel was a sampling config field
    native = (sampling.SamplingConfig(decode_kernel="native", **fields), {})
    xla = (sampling.SamplingConfig(decode_kernel="xla", **fields), {})

  def k15_run(setup, p, m):
    scfg, kwargs = setup
    return lambda: sampling.generate(cfg, p, prompts, scfg, jax.random.key(0), mesh=m, **kwargs)

  ids = torch.tensor(prompts)

  def hf_run():
    with torch.no_grad():
      return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                         min_new_tokens=new, eos_token_id=None, pad_token_id=0)

  runs = {"native": k15_run(native, params, None), "xla": k15_run(xla, replicated, mesh), "transformers": hf_run,
          "matmul": matmul_run()}
  hf_tokens = hf_run()[:, prompt:].numpy()
  agree = {}
  for name in PATHS:  # compiles
    tokens = np.stack([t.response_tokens for t in runs[name]()])
    agree[name] = float(np.mean(tokens[:, :16] == hf_tokens[:, :16]))
  return dict(seconds=interleaved_best(runs, repeats), agree=agree)


def report(name, results, useful_flops, tokens):
  """The tree's best ratio of each path over its rounds."""
  from timing import MATMUL_FLOPS  # pylint: disable=import-outside-toplevel
  for path in PATHS:
    best = max(results, key=lambda r: r["seconds"]["transformers"] / r["seconds"][path])
    s = best["seconds"]
    share = useful_flops / s[path] / (MATMUL_FLOPS / s["matmul"])
    print(f"{name:>10}, {path:>6}: {s['transformers'] / s[path]:.2f}x transformers ({tokens / s[path]:.0f} against "
          f"{tokens / s['transformers']:.0f} new tokens/s), {share:.0%} of the matmul's FLOP/s; first 16 tokens "
          f"agree with transformers: {best['agree'][path]:.0%}")


def main():
  args = parse_args()
  if args.child:
    print(json.dumps(measure(args.child, args.repeats, args.quick)))
    return
  sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.commit], check=True, capture_output=True,
                       text=True).stdout.strip()
  with tempfile.TemporaryDirectory() as tmp:
    old = os.path.join(tmp, sha)
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", old, sha], check=True)
    try:
      trees = {f"{sha}": old, "this tree": str(REPO)}
      results = {name: [] for name in trees}
      for r in range(args.rounds):
        for name, tree in trees.items():
          cmd = [sys.executable, __file__, "--child", tree, "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
          child = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=tmp)
          if child.returncode:
            raise SystemExit(f"{name} ({tree}) failed:\n{child.stderr[-3000:]}")
          out = child.stdout
          results[name].append(json.loads(out.strip().splitlines()[-1]))
          print(f"round {r + 1}, {name}: {results[name][-1]}", flush=True)
    finally:
      subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", old], check=False)
  import sampler  # pylint: disable=import-outside-toplevel  (this tree's: its FLOP count)
  batch, prompt, new, _ = workload(args.quick)
  with tempfile.TemporaryDirectory() as path:
    qwen2_model.save(path, args.quick)
    useful = sampler.useful_flops(sampler.models.load_hf(path)[0], batch, prompt, new)
  print(f"\n== k15's sampling paths / transformers generate (best of {args.rounds} rounds of each tree) ==")
  for name, rs in results.items():
    report(name, rs, useful, batch * new)
  # transformers is the same in every child, but each child times it in its own turns, as the host's speed drifts
  pooled = min(r["seconds"]["transformers"] for rs in results.values() for r in rs)
  print(f"\n== each tree's paths (best of its rounds) against the fastest transformers generate of all children "
        f"({batch * new / pooled:.0f} new tokens/s) ==")
  for name, rs in results.items():
    print(f"{name:>10}: " + ", ".join(f"{path} {pooled / min(r['seconds'][path] for r in rs):.2f}x"
                                      for path in PATHS))


if __name__ == "__main__":
  main()
