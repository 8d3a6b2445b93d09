"""k15's XLA sampling path against transformers, at another commit and at this tree, in one run.

  python benchmarks/xla_vs_commit.py --commit aa62d0e

The sampler benchmark's ratio of the XLA path to transformers moves with the machine; this puts an older commit's
ratio beside this tree's on the same machine. Each tree (this one, and the commit checked out into a temporary git
worktree) runs in a child process of its own: on the sampler benchmark's model and workload (benchmarks/sampler.py:
batch 32, prompt 64, 256 new greedy tokens), k15's `sampling.generate` through the model's XLA passes, on a mesh of
one fake CPU device per core, and transformers `generate`, interleaved for --repeats rounds, the best of each kept.
The children take turns for --rounds rounds; each tree's best ratio is printed.
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


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--commit", default="aa62d0e", help="the other tree's commit")
  p.add_argument("--rounds", type=int, default=2, help="turns of each tree's child")
  p.add_argument("--repeats", type=int, default=5, help="interleaved rounds inside a child")
  p.add_argument("--quick", action="store_true", help="small sizes: checks that it runs")
  p.add_argument("--child", help=argparse.SUPPRESS)  # a tree's path: run its measurement, print one JSON line
  return p.parse_args()


def measure(tree: str, repeats: int, quick: bool) -> dict:
  """In a child: this tree's XLA generate and transformers generate on one random Qwen2-style model."""
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={os.cpu_count()}"
  sys.path.insert(0, tree)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
  from k15 import models, sampling, sharding  # pylint: disable=import-outside-toplevel
  from timing import interleaved_best  # pylint: disable=import-outside-toplevel

  batch, prompt, new, chunk = (4, 16, 32, 16) if quick else (32, 64, 256, 64)
  with tempfile.TemporaryDirectory() as path:
    hf = qwen2_model.save(path, quick)  # this tree's model, whichever tree's k15 loads it
    cfg, params = models.load_hf(path)
  prompts = np.random.RandomState(1).randint(1, cfg.vocab_size - 1, (batch, prompt)).tolist()
  mesh = sharding.make_mesh({"data": -1})  # every device on the slot axis
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  fields = dict(greedy=True, max_new_tokens=new, chunk_size=chunk, max_length=prompt + new)
  if hasattr(sampling, "ModelBackend"):  # the backend interface
    scfg, kwargs = sampling.SamplingConfig(**fields), dict(backend=sampling.ModelBackend())
  else:  # before it: the decode kernel was a sampling config field
    scfg, kwargs = sampling.SamplingConfig(decode_kernel="xla", **fields), {}
  ids = torch.tensor(prompts)

  def k15_run():
    return sampling.generate(cfg, params, prompts, scfg, jax.random.key(0), mesh=mesh, **kwargs)

  def hf_run():
    with torch.no_grad():
      return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                         min_new_tokens=new, eos_token_id=None, pad_token_id=0)

  k15_tokens = np.stack([t.response_tokens for t in k15_run()])  # compiles
  hf_tokens = hf_run()[:, prompt:].numpy()
  best = interleaved_best({"k15": k15_run, "transformers": hf_run}, repeats)
  return dict(k15_tok_s=batch * new / best["k15"], transformers_tok_s=batch * new / best["transformers"],
              ratio=best["transformers"] / best["k15"], agree=float(np.mean(k15_tokens[:, :16] == hf_tokens[:, :16])))


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
          out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tmp).stdout
          results[name].append(json.loads(out.strip().splitlines()[-1]))
          print(f"round {r + 1}, {name}: {results[name][-1]}", flush=True)
    finally:
      subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", old], check=False)
  print(f"\n== k15's XLA path / transformers generate (best of {args.rounds} rounds of each tree) ==")
  for name, rs in results.items():
    best = max(rs, key=lambda x: x["ratio"])
    print(f"{name:>10}: {best['ratio']:.2f}x transformers (k15 {best['k15_tok_s']:.0f} tok/s, transformers "
          f"{best['transformers_tok_s']:.0f}; first 16 tokens agree: {best['agree']:.0%})")


if __name__ == "__main__":
  main()
