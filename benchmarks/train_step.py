"""The RL train step's achieved FLOP/s as a fraction of a 2048-square float32 matmul's, timed in the same run.

  python benchmarks/train_step.py            # a few minutes on a 2-core CPU
  python benchmarks/train_step.py --quick    # small sizes: checks that every part runs

Two float32 models: the main job's (experiments/configs/architectures.py "arith", d_model 128) and a wider one
(d_model 1024). Each takes the k1.5 train step (loss, gradients, clipping, Adam; reference log-probs given) on one
minibatch of rollouts with long-tailed lengths (log-normal responses after a fixed prompt, capped at the row), in
four setups:
- untiled: dense attention (a T x T score matrix) and every logit at once (model.attention="dense",
  model.logprob_chunk=0); tiled: blockwise attention and log-probs a chunk of positions at a time;
- a row per sample, or samples packed into as few rows as the loop's size classes allow (rl.pack).
Useful FLOPs are the model's formula (k15.flops: 3x a forward, backward = 2x) over each sample's own tokens, so
padding is work that is not useful. The formula is checked against XLA's cost analysis of the compiled untiled step
of a one-layer copy (XLA counts a loop body once, and the layers are a scan) and the ratio printed.
"""
import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs.architectures import ARCHITECTURES
from k15 import flops, models
from k15.rl import loop, trainer
from timing import MATMUL_FLOPS, interleaved_best, matmul_run

# The fields of config.rl that the loss and the optimizer read, as in experiments/configs/arith.py.
RL = dataclasses.make_dataclass("RL", ["loss", "tau", "log_ratio", "baseline", "form", "samples_per_prompt",
                                       "optimizer", "learning_rate", "adam_eps", "max_grad_norm"])(
    "k15", 0.1, "sequence", "mean", "gradient", 8, "adam", 1e-5, 1e-8, 1.0)
OPTIMIZER = loop.rl_optimizer(RL)


def workloads(quick: bool):
  """(name, model config, rows, row length, prompt tokens, median response, block) of each model."""
  arith = models.ModelConfig(**ARCHITECTURES["arith"])
  wide = models.ModelConfig(vocab_size=8192, d_model=1024, n_layers=2, n_heads=16, n_kv_heads=4, head_dim=64,
                            d_ff=4096, qkv_bias=True, tie_embeddings=True)
  if quick:
    wide = dataclasses.replace(wide, d_model=256, n_heads=4, d_ff=512)
    return [("main job (d_model 128)", arith, 16, 192, 24, 48, 64), ("wider (d_model 256)", wide, 8, 256, 32, 64, 64)]
  # The main job's minibatch: 16 prompts x 8 samples / 2 minibatches, rows of prompt + 160 response tokens.
  return [("main job (d_model 128)", arith, 64, 192, 24, 48, 64), ("wider (d_model 1024)", wide, 8, 512, 32, 128, 128)]


def minibatch(cfg, rows, T, prompt, median, rng):
  """A minibatch of `rows` samples: random tokens, lengths prompt + a log-normal response, the loss mask on
  responses, rewards and reference log-probs."""
  lengths = prompt + np.clip(np.round(rng.lognormal(math.log(median), 0.8, rows)), 4, T - prompt).astype(np.int32)
  tokens = np.zeros((rows, T), np.int32)
  for b, n in enumerate(lengths):
    tokens[b, :n] = rng.randint(2, cfg.vocab_size, n)
  pos = np.arange(T - 1)[None]
  mask = ((pos >= prompt - 1) & (pos < lengths[:, None] - 1)).astype(np.float32)
  return {"tokens": tokens, "mask": mask, "ref_logp": rng.normal(-4, 1, (rows, T - 1)).astype(np.float32) * mask,
          "rewards": rng.randint(0, 2, rows).astype(np.float32), "weights": np.ones(rows, np.float32),
          "lengths": lengths}


def step_run(cfg, batch):
  """A callable taking one train step on `batch` (compiled first), and the step's rows x T."""
  params = models.init_params(cfg, jax.random.key(0))
  opt_state = OPTIMIZER.init(params)
  step = jax.jit(trainer.train_step(loop.make_loss_fn(cfg, RL), OPTIMIZER))
  batch = jax.tree.map(jnp.asarray, batch)
  run = lambda: jax.block_until_ready(step(params, opt_state, batch))
  run()
  return run


def xla_over_formula(cfg, rows, T):
  """XLA's FLOPs of the compiled untiled step of a one-layer copy of cfg over the formula's."""
  one = dataclasses.replace(cfg, n_layers=1, attention="dense", logprob_chunk=0)
  spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
  batch = {"tokens": spec((rows, T), jnp.int32), "mask": spec((rows, T - 1)), "ref_logp": spec((rows, T - 1)),
           "rewards": spec((rows,)), "weights": spec((rows,))}
  params = models.abstract_params(one)
  step = jax.jit(trainer.train_step(loop.make_loss_fn(one, RL), OPTIMIZER))
  compiled = step.lower(params, jax.eval_shape(OPTIMIZER.init, params), batch).compile()
  return compiled.cost_analysis()["flops"] / (3 * rows * flops.forward_flops(one, T))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="small sizes: checks that every part runs")
  parser.add_argument("--repeats", type=int, default=3, help="timed rounds (interleaved); the best is kept")
  args = parser.parse_args()
  rng = np.random.RandomState(0)
  runs, work, shapes = {"matmul": matmul_run()}, {}, {}
  checks = {}
  for name, cfg, rows, T, prompt, median, block in workloads(args.quick):
    batch = minibatch(cfg, rows, T, prompt, median, rng)
    packed_batch, padding = loop.pack_minibatch(batch, pad_id=0)
    useful = 3 * sum(flops.forward_flops(cfg, int(n)) for n in batch["lengths"])
    checks[name] = (xla_over_formula(cfg, rows, T), rows, T, 1 - batch["lengths"].sum() / (rows * T),
                    len(packed_batch["packed_tokens"]), padding)
    for tiling, fields in [("untiled", dict(attention="dense", logprob_chunk=0)),
                           ("tiled", dict(attention="blockwise", attention_block=block, logprob_chunk=block))]:
      for packing, b in [("a row per sample", batch), ("packed", packed_batch)]:
        key = (name, tiling, packing)
        runs[key] = step_run(dataclasses.replace(cfg, **fields), b)
        work[key] = useful
  best = interleaved_best(runs, args.repeats)
  rate = MATMUL_FLOPS / best["matmul"]
  print(f"2048^2 float32 matmul: {rate / 1e9:.1f} GFLOP/s (best of {args.repeats})")
  for name, (ratio, rows, T, pad, packed_rows, packed_pad) in checks.items():
    print(f"\n{name}: {rows} samples, rows of {T} tokens ({pad:.0%} padding; packed: {packed_rows} rows, "
          f"{packed_pad:.0%} padding); XLA's FLOPs / the formula's: {ratio:.3f}")
    print(f"  {'':10} {'':18} {'ms/step':>9} {'useful GFLOP/s':>15} {'of matmul':>10}")
    for key, seconds in best.items():
      if key != "matmul" and key[0] == name:
        n, tiling, packing = key
        achieved = work[(n, tiling, packing)] / seconds
        print(f"  {tiling:10} {packing:18} {seconds * 1e3:9.1f} {achieved / 1e9:15.2f} {achieved / rate:10.1%}")


if __name__ == "__main__":
  main()
