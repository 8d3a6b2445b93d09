"""Whether the native attention's arithmetic and its reads of the KV cache overlap.

  python benchmarks/attention_reads.py [--context 192] [--tokens 256] [--rounds 9]
  python benchmarks/attention_reads.py a.cc [b.cc ...]   # the same for variants of kernels.cc

Times kernels.cc's paged attention (`native.paged_attention`: what the native decode step runs for each token) on
the sampler benchmark's heads (8 query and 4 kv heads of 32, pages of 16 positions): `--tokens` decode tokens of
one query each, each over `--context` positions, with XLA's whole CPU thread pool, over one cache (as XLA allocates
it, on 4 KB pages, and as numpy does, on 2 MB pages) by three page tables:
- hot: every token reads the same pages (one token's keys and values stay in L2): about the arithmetic alone;
- spread: each token reads pages of its own, spread at random over a cache of all the tokens' pages, as a decode
  step reads its slots' (from L3 or memory, by the cache's size);
- in order: each token's pages right after the previous token's (one sequential sweep of the cache);
and `stream.cc` reading as many bytes as spread's on every core, the floor for spread's reads. Prints each one's
time a token, and what spread and in order take beyond hot against stream.cc's time for the same bytes (1x:
the reads at the streaming rate, none of the arithmetic overlapped with them; less: some overlapped). Given
variants of kernels.cc (the same attention handler, `K15PagedAttentionF32`), times theirs too, interleaved with
the repo's.
"""
import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from k15.sampling import native
from k15.sampling.native import build
from timing import STREAM_PASSES, interleaved_best, stream_run

N_HEADS, KV_HEADS, HEAD_DIM, PAGE = 8, 4, 32, 16


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("variants", nargs="*", type=pathlib.Path, help="variants of kernels.cc")
  p.add_argument("--context", type=int, default=192, help="positions each token attends over")
  p.add_argument("--tokens", type=int, default=256, help="tokens per call (one query each)")
  p.add_argument("--rounds", type=int, default=9)
  return p.parse_args()


def attention_target(source: pathlib.Path, i: int) -> str:
  """The attention handler of `source` (a variant of kernels.cc) registered as an FFI target of its own."""
  target = f"{build.ATTENTION_TARGET}_v{i}"
  lib = build.register(f"{build.TARGET}_attention_v{i}", build.build(source))
  jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.K15PagedAttentionF32), platform="cpu")
  return target


def on_huge_pages(x: np.ndarray):
  """x in a numpy buffer of its own, which numpy advises onto transparent huge pages before it first touches it,
  viewed by JAX in place (dlpack; XLA's own buffers come from malloc on 4 KB pages); and how many of its bytes are on
  huge pages (/proc/self/smaps)."""
  buf = np.empty(x.size + 64, x.dtype)
  start = (-buf.ctypes.data % 64) // x.itemsize  # XLA's CPU buffers are 64-byte aligned
  view = buf[start:start + x.size].reshape(x.shape)
  view[...] = x
  array = jax.dlpack.from_dlpack(view)
  assert array.unsafe_buffer_pointer() == view.ctypes.data, "dlpack copied the array"
  return array, huge_page_bytes(view.ctypes.data, view.nbytes)


def huge_page_bytes(address: int, size: int) -> int:
  """Bytes of the mappings overlapping [address, address + size) on transparent huge pages."""
  total, overlaps = 0, False
  with open("/proc/self/smaps") as f:
    for line in f:
      field = line.split()
      if "-" in field[0] and ":" not in field[0]:  # a mapping's first line: its address range
        begin, end = (int(a, 16) for a in field[0].split("-"))
        overlaps = begin < address + size and address < end
      elif overlaps and field[0] == "AnonHugePages:":
        total += int(field[1]) * 1024
  return total


def attention_run(target, q, kv, table, positions):
  q, kv, table, positions = jax.device_put((q, kv, table, positions))  # once, not in every timed call
  ffi = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, jnp.float32))
  call = jax.jit(lambda *args: ffi(*args, threads=np.int64(0)))
  jax.block_until_ready(call(q, kv, table, positions))  # compiles
  return lambda: jax.block_until_ready(call(q, kv, table, positions))


def main():
  args = parse_args()
  native.build.require("the native paged attention")
  rng = np.random.RandomState(0)
  R, M = args.tokens, -(-args.context // PAGE)
  pages = R * M
  kv = rng.normal(size=(pages, PAGE, 2 * KV_HEADS, HEAD_DIM)).astype(np.float32)
  q = rng.normal(size=(R, 1, N_HEADS, HEAD_DIM)).astype(np.float32)
  positions = np.full((R, 1), args.context - 1, np.int32)
  spread = rng.permutation(pages).reshape(R, M).astype(np.int32)
  in_order = np.arange(pages, dtype=np.int32).reshape(R, M)
  hot = np.tile(np.arange(M, dtype=np.int32), (R, 1))
  read_bytes = R * args.context * 2 * KV_HEADS * HEAD_DIM * 4
  targets = {"repo": build.ATTENTION_TARGET}
  targets.update({str(v): attention_target(v, i) for i, v in enumerate(args.variants)})
  huge_kv, huge_bytes = on_huge_pages(kv)
  caches = {"4 KB pages": kv, "2 MB pages": huge_kv}
  tables = {"hot": hot, "spread": spread, "in order": in_order}
  runs = {(name, c, t): attention_run(target, q, cache, table, positions)
          for name, target in targets.items() for c, cache in caches.items() for t, table in tables.items()}
  runs["stream"] = stream_run(read_bytes)
  best = interleaved_best(runs, args.rounds)
  stream_us = 1e6 * best.pop("stream") / STREAM_PASSES / R
  print(f"{R} tokens over {args.context} positions each ({read_bytes / R / 1024:.0f} KB a token; a cache of "
        f"{kv.nbytes / 2**20:.0f} MB, as XLA allocates it on 4 KB pages and as numpy does on 2 MB pages: "
        f"{huge_bytes / kv.nbytes:.0%} of it), best of {args.rounds} rounds; stream.cc reads a token's bytes in "
        f"{stream_us:.2f} us ({read_bytes / R / stream_us / 1e3:.1f} GB/s):")
  for name in targets:
    for c in caches:
      us = {t: 1e6 * best[(name, c, t)] / R for t in tables}
      print(f"{name}, {c}: " + ", ".join(f"{t} {us[t]:.2f} us a token ({read_bytes / R / us[t] / 1e3:.1f} GB/s)"
                                         for t in tables))
      print("  beyond hot: " + ", ".join(f"{t} {us[t] - us['hot']:.2f} us, {(us[t] - us['hot']) / stream_us:.2f}x "
                                         "stream.cc's time" for t in ("spread", "in order")))


if __name__ == "__main__":
  main()
