"""Prefill's native kernels against XLA, on the sampler benchmark's model and prefill (32 prompts of 64 tokens).

  python benchmarks/prefill.py           # 2048 tokens, width 256, MLP 1024, 8 / 4 heads of 32
  python benchmarks/prefill.py --quick   # a smoke run of every part

Prints, each timed in interleaved rounds (best of each), ratios to XLA on one CPU device:
- one layer's matmuls (qkv, o, gate and up fused with silu(gate) * up, down) as XLA float32 dots and as
  `native.matmul` on AMX tiles for each AMX `native_matmul` (where the CPU has AMX), with GFLOP/s and each one's
  largest error against float64, relative to sum |x| |w| (XLA's own float32 error printed beside them);
- causal attention: the model's `attend` (XLA) against `native.prefill_attention`;
- the whole `prefill.encode`: XLA throughout, native attention with XLA's matmuls (the float32 step's weights),
  and native attention with each AMX matmul.
"""
import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from k15 import models
from k15.models.transformer import attend
from k15.sampling import native, prefill


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--prompts", type=int, default=32)
  p.add_argument("--tokens", type=int, default=64, help="tokens per prompt")
  p.add_argument("--rounds", type=int, default=7)
  return p.parse_args()


def best_of(runs, rounds):
  """Best seconds of each callable over `rounds` rounds, each round running every callable once (a drift in
  the machine's speed falls on all of them alike)."""
  best = {name: math.inf for name in runs}
  for _ in range(rounds):
    for name, fn in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      best[name] = min(best[name], time.perf_counter() - start)
  return best


def matmuls(cfg, rows, rounds, amx):
  """One layer's prefill matmuls: XLA's float32 dots against native.matmul per AMX format."""
  rng = np.random.RandomState(0)
  D, F, E, NH = cfg.d_model, cfg.d_ff, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, cfg.n_heads * cfg.head_dim
  shapes = {"qkv": (D, E, False), "o": (NH, D, False), "gate_up": (D, F, True), "down": (F, D, False)}
  print(f"== one layer's matmuls, {rows} rows ==")
  print(f"{'matmul':>8} {'kernel':>8} {'ms':>8} {'GFLOP/s':>8} {'x XLA':>6} {'error':>9}")
  for name, (K, N, swiglu) in shapes.items():
    x = rng.normal(size=(rows, K)).astype(np.float32)
    w = (rng.normal(size=(K, 2 * N if swiglu else N)) / np.sqrt(K)).astype(np.float32)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    scale = np.abs(x64) @ np.abs(w64[:, :N])  # the error of the gate (or only) product, relative to sum |x||w|
    runs, errors = {}, {}

    def xla(a, b, swiglu=swiglu, N=N):
      y = a @ b
      return jax.nn.silu(y[:, :N]) * y[:, N:] if swiglu else y

    f = jax.jit(xla)
    runs["xla"] = lambda f=f: f(x, w)
    errors["xla"] = np.max(np.abs(np.asarray(jax.jit(lambda a, b: a @ b)(x, w[:, :N])) - x64 @ w64[:, :N]) / scale)
    for matmul in (m for m in native.MATMUL_PIECES if m != "float32" and amx):
      pack = native.decode_weights_packer(matmul)
      packed = native.pack_pairs(w, pack) if swiglu else pack(w)
      g = jax.jit(lambda a, b, swiglu=swiglu, N=N: native.matmul(a, b, N, swiglu=swiglu))
      runs[matmul] = lambda g=g, packed=packed: g(x, packed)
      plain = np.asarray(jax.jit(lambda a, b, N=N: native.matmul(a, b, N))(x, pack(w[:, :N])))  # gate's, alone
      errors[matmul] = np.max(np.abs(plain - x64 @ w64[:, :N]) / scale)
    for fn in runs.values():
      jax.block_until_ready(fn())  # compiles
    best = best_of(runs, rounds)
    flops = 2 * rows * K * N * (2 if swiglu else 1)
    for kernel, seconds in best.items():
      print(f"{name:>8} {kernel:>8} {seconds * 1e3:8.2f} {flops / seconds / 1e9:8.1f} "
            f"{best['xla'] / seconds:5.2f}x {errors[kernel]:9.2e}")


def attention(cfg, prompts, tokens, rounds):
  """Causal attention over the prompts: the model's attend (XLA) against native.prefill_attention."""
  rng = np.random.RandomState(1)
  q = rng.normal(size=(prompts, tokens, cfg.n_heads, cfg.head_dim)).astype(np.float32)
  k, v = (rng.normal(size=(prompts, tokens, cfg.n_kv_heads, cfg.head_dim)).astype(np.float32) for _ in range(2))
  mask = np.broadcast_to(np.tril(np.ones((tokens, tokens), bool)), (prompts, tokens, tokens))
  xla = jax.jit(attend)
  nat = jax.jit(native.prefill_attention)
  want = np.asarray(xla(q, k, v, mask))
  error = np.max(np.abs(np.asarray(nat(q, k, v)) - want))
  best = best_of({"xla": lambda: xla(q, k, v, mask), "native": lambda: nat(q, k, v)}, rounds)
  print(f"\n== causal attention, {prompts} x {tokens} positions, {cfg.n_heads}/{cfg.n_kv_heads} heads of "
        f"{cfg.head_dim} ==")
  print(f"xla {best['xla'] * 1e3:.2f} ms, native {best['native'] * 1e3:.2f} ms: "
        f"{best['xla'] / best['native']:.2f}x XLA (largest difference {error:.1e})")


def encode(cfg, prompts, tokens, rounds, amx):
  """The whole prefill.encode, XLA's and with the native step's weights of each native_matmul."""
  params = models.init_params(cfg, jax.random.key(0))
  rows = jax.random.randint(jax.random.key(1), (prompts, tokens), 1, cfg.vocab_size)
  run = jax.jit(prefill.encode, static_argnums=0)
  runs = {"xla": lambda: run(cfg, params, rows)}
  for matmul in (m for m in native.MATMUL_PIECES if m == "float32" or amx):
    weights = native.decode_weights(cfg, params, matmul)
    runs[f"native, {matmul}"] = lambda w=weights: run(cfg, params, rows, w)
  for fn in runs.values():
    jax.block_until_ready(fn())
  best = best_of(runs, rounds)
  print(f"\n== prefill.encode, {prompts} x {tokens} tokens, {cfg.n_layers} layers ==")
  for name, seconds in best.items():
    print(f"{name:>16} {seconds * 1e3:8.2f} ms  {best['xla'] / seconds:5.2f}x XLA")


def main():
  args = parse_args()
  native.require("prefill's native kernels")
  amx = native.amx_available()
  if args.quick:
    args.prompts, args.tokens, args.rounds = 2, 16, 1
    cfg = models.ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96,
                             qkv_bias=True, tie_embeddings=True)
  else:
    cfg = models.ModelConfig(vocab_size=1024, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32,
                             d_ff=1024, qkv_bias=True, tie_embeddings=True)
  print(f"jax {jax.__version__}, {len(jax.devices())} device(s); AMX: "
        f"{'yes' if amx else 'no (XLA and native attention only)'}")
  matmuls(cfg, args.prompts * args.tokens, args.rounds, amx)
  attention(cfg, args.prompts, args.tokens, args.rounds)
  encode(cfg, args.prompts, args.tokens, args.rounds, amx)


if __name__ == "__main__":
  main()
