"""Compile time against depth: the model backend's layers apart (default) and looped over their stack.

  python benchmarks/compile_depth.py                 # 4 and 28 layers (about a minute)
  python benchmarks/compile_depth.py --layers 4,64

A generate's first call compiles the rollout engine's programs (prepare, prefill, decode chunk, ...); its second
runs them. With each layer's weights apart (`ModelBackend()`), the passes hold one copy of the layer per layer, so
compile time grows with depth; `ModelBackend(scan_layers=True)` loops over the stack. Prints both, per depth, on a
narrow model (width 64), so the figures are compile time, not compute (after a 1-layer generate warms jax up).
"""
import argparse
import time

import jax

from k15 import models, sampling


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", default="4,28", help="comma-separated depths")
  args = p.parse_args()
  scfg = sampling.SamplingConfig(greedy=True, max_new_tokens=8, chunk_size=8, max_length=32, page_size=8)
  warm = models.ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128)
  sampling.generate(warm, models.init_params(warm, jax.random.key(0)), [[1, 2, 3]] * 4, scfg, jax.random.key(0))
  for layers in (int(n) for n in args.layers.split(",")):
    cfg = models.ModelConfig(vocab_size=256, d_model=64, n_layers=layers, n_heads=4, n_kv_heads=2, head_dim=16,
                             d_ff=128)
    params = models.init_params(cfg, jax.random.key(0))
    for scan in (False, True):
      backend = sampling.ModelBackend(scan_layers=scan)
      seconds = []
      for _ in range(2):
        start = time.perf_counter()
        sampling.generate(cfg, params, [[1, 2, 3]] * 4, scfg, jax.random.key(0), backend=backend)
        seconds.append(time.perf_counter() - start)
      print(f"{layers:3d} layers, {'looped over the stack' if scan else 'apart':>21}: first generate "
            f"{seconds[0]:5.1f} s (compiles), second {seconds[1]:.2f} s")


if __name__ == "__main__":
  main()
