"""Prefill through the native plug-in against the model's paged pass (XLA), on the sampler benchmark's model.

  python benchmarks/prefill.py           # 32 sequences of 64, and 8 of 512 tokens, width 256, MLP 1024
  python benchmarks/prefill.py --quick   # a smoke run of every part

The sampler encodes a sequence a page per row, every row of a refill in one call (`k15.sampling.slots.prefill`).
For each workload this times that call with the model's paged pass (`k15.sampling.ModelBackend`: XLA's matmuls and
the XLA paged attention) and with the plug-in for each of its matmuls this CPU runs, in interleaved rounds (best
of each), and prints tokens per second, the ratio to XLA, the share of the machine's float32 matmul rate, and the
largest difference of the written cache from XLA's.
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

from k15 import flops, models, sampling
from k15.sampling import native
from timing import MATMUL_FLOPS, interleaved_best, matmul_run


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--page_size", type=int, default=16)
  p.add_argument("--rounds", type=int, default=7)
  return p.parse_args()


def rows_of(sequences, page_size, pages_per_seq):
  """The sampler's prefill rows: a page of a sequence per row, each sequence over its own pages."""
  tokens, positions, tables = [], [], []
  for s, seq in enumerate(sequences):
    for j in range(0, len(seq), page_size):
      m = min(page_size, len(seq) - j)
      tokens.append(np.pad(seq[j:j + m], (0, page_size - m)))
      positions.append(np.where(np.arange(page_size) < m, j + np.arange(page_size), -1))
      tables.append(s * pages_per_seq + np.arange(pages_per_seq))
  return (np.stack(tokens).astype(np.int32), np.stack(positions).astype(np.int32),
          np.stack(tables).astype(np.int32))


def matmul_rate():
  """The 2048-square float32 matmul's FLOP/s, best of 3."""
  return MATMUL_FLOPS / interleaved_best({"mm": matmul_run()}, 3)["mm"]


def main():
  args = parse_args()
  cfg = models.ModelConfig(vocab_size=1024, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, d_ff=1024,
                           qkv_bias=True, tie_embeddings=True)
  workloads = [(32, 64), (8, 512)]
  if args.quick:
    cfg = models.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64)
    workloads, args.rounds = [(4, 24)], 1
  params = models.init_params(cfg, jax.random.key(0))
  backends = {"XLA (the model's pass)": sampling.ModelBackend()}
  native.backend.build.require("the native prefill")
  for matmul in ("float32", "bf16x6", "int8x9"):
    if matmul == "float32" or native.amx_available():
      backends[f"native, {matmul}"] = native.NativeBackend(matmul)
  rate = matmul_rate()
  print(f"jax {jax.__version__}, width {cfg.d_model}, {cfg.n_layers} layers, MLP {cfg.d_ff}; float32 matmul "
        f"{rate / 1e9:.1f} GFLOP/s")
  scfg = sampling.SamplingConfig(page_size=args.page_size)
  for n_seqs, length in workloads:
    rng = np.random.RandomState(0)
    sequences = [rng.randint(0, cfg.vocab_size, length) for _ in range(n_seqs)]
    pages_per_seq = -(-length // args.page_size)
    tokens, positions, tables = rows_of(sequences, args.page_size, pages_per_seq)
    kv = jnp.zeros(models.kv_pages_shape(cfg, n_seqs * pages_per_seq, args.page_size), jnp.float32)
    calls, caches = {}, {}
    for name, backend in backends.items():
      weights = backend.prepare(cfg, params)
      call = jax.jit(lambda kv, b=backend, w=weights: b.prefill(cfg, scfg, w, kv, tokens, positions, tables))
      caches[name] = np.asarray(call(kv))
      calls[name] = lambda c=call: jax.block_until_ready(c(kv))
    best = interleaved_best(calls, args.rounds)
    useful = n_seqs * sum(flops.token_flops(cfg, c + 1) for c in range(length))
    base = "XLA (the model's pass)"
    print(f"\n== {n_seqs} sequences of {length} tokens ({len(tokens)} rows of {args.page_size}) ==")
    for name, seconds in best.items():
      gap = np.max(np.abs(caches[name] - caches[base]))
      print(f"{name:>24}: {n_seqs * length / seconds:9.0f} tok/s ({seconds * 1e3:7.1f} ms), {best[base] / seconds:5.2f}x "
            f"XLA, {useful / seconds / rate:4.0%} of the matmul's FLOP/s; cache within {gap:.1e} of XLA's")


if __name__ == "__main__":
  main()
