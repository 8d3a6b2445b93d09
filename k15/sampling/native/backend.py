"""The sampler backend of kernels.cc: its paged pass as the decode step and the prefill, on CPU devices."""
import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from k15.models import ModelConfig
from k15.sampling.backend import ModelBackend
from k15.sampling.native import build
from k15.sampling.native.attention import paged_attention, threads_per_call
from k15.sampling.native.weights import MATMUL_PIECES, native_weights, pieces_of
from k15.sampling.select import LogitStats


def paged_step(cfg: ModelConfig, weights, kv, tokens_N, positions_N, table_RxM, *, prefill: bool = False,
               threads: int = 0, target: str = build.TARGET):
  """kernels.cc's paged pass over N tokens in R rows of N / R consecutive tokens (row r reads the pages of table
  row r): (logits_NxV, LogitStats, the cache with every token's keys and values written). A token at a position
  outside the table's pages writes nothing and gets garbage logits. With `prefill`, no logits (0 rows) or stats.

  `threads`: at most this many threads work on the call (0: XLA's whole CPU thread pool). `target`: the FFI target
  of a build of kernels.cc (default: the one `build.load` registers).
  """
  if target == build.TARGET:
    build.require("the native paged step")
  N, R = tokens_N.shape[0], table_RxM.shape[0]
  rows = 0 if prefill else N
  results = [jax.ShapeDtypeStruct((rows, cfg.vocab_size), jnp.float32), jax.ShapeDtypeStruct((rows,), jnp.int32),
             jax.ShapeDtypeStruct((rows,), jnp.float32), jax.ShapeDtypeStruct((rows,), jnp.float32),
             jax.ShapeDtypeStruct(kv.shape, jnp.float32)]
  call = jax.ffi.ffi_call(target, results, input_output_aliases={12: 4})
  out = call(tokens_N.astype(jnp.int32), positions_N.astype(jnp.int32), *weights, kv.astype(jnp.float32),
             table_RxM.astype(jnp.int32), eps=np.float32(cfg.rms_norm_eps), theta=np.float32(cfg.rope_theta),
             n_heads=np.int64(cfg.n_heads), n_kv_heads=np.int64(cfg.n_kv_heads), d_ff=np.int64(cfg.d_ff),
             pieces=np.int64(pieces_of(weights)), threads=np.int64(threads), tokens_per_row=np.int64(N // R),
             prefill=bool(prefill))
  return out[0], LogitStats(*out[1:4]), out[4]


@dataclasses.dataclass(frozen=True)
class NativeBackend:
  """kernels.cc as the sampler's prefill and decode step (`k15.sampling.backend`); a float32 model on CPU.

  matmul: its matmuls (`weights.MATMUL_PIECES`). target: the FFI target of the build to call.
  """
  matmul: str = "float32"
  target: str = build.TARGET
  splits_over_mesh = False  # a custom call XLA cannot split: each device decodes its own slots

  def prepare(self, cfg: ModelConfig, params):
    return native_weights(cfg, params, self.matmul)

  def prefill(self, cfg, scfg, weights, kv, tokens_RxT, positions_RxT, table_RxM):
    del scfg
    return paged_step(cfg, weights, kv, tokens_RxT.reshape(-1), positions_RxT.reshape(-1), table_RxM, prefill=True,
                      threads=threads_per_call(), target=self.target)[2]

  def step(self, cfg, scfg, weights, kv, tokens_B, positions_B, table_BxM):
    del scfg
    return paged_step(cfg, weights, kv, tokens_B, positions_B, table_BxM, threads=threads_per_call(),
                      target=self.target)


def unsupported(cfg: ModelConfig, devices) -> Optional[str]:
  """Why kernels.cc does not apply to `cfg` on `devices` (not a CPU, not float32, rope scaling), or None."""
  platforms = {d.platform for d in devices}
  if platforms != {"cpu"}:
    return f"it runs on CPU devices only, not {sorted(platforms)}"
  if cfg.jnp_dtype != jnp.float32 or cfg.jnp_param_dtype != jnp.float32:
    return f"it computes in float32 only, not dtype={cfg.dtype!r}, param_dtype={cfg.param_dtype!r}"
  if cfg.rope_scaling is not None:
    return f"it computes plain rotary embeddings, not rope scaling {cfg.rope_scaling.type!r}"
  return None


STEPS = ("native", "model")


def make_backend(cfg: ModelConfig, devices, matmul: str = "auto", required: bool = False, step: str = "native"):
  """The plug-in's entry (`k15.sampling.load_backend`): for `cfg` on `devices`, a NativeBackend (step="native":
  kernels.cc's whole pass), or the model's passes with kernels.cc's paged attention (step="model": XLA computes
  the rest, split over a mesh as on TPU). None (with a warning) where it does not apply (off CPU, below float32,
  rope scaling) or does not build, unless `required`.

  matmul: "auto" takes int8x9 where the CPU has AMX, else float32; an AMX choice on a CPU without AMX warns and
  takes float32."""
  if matmul != "auto" and matmul not in MATMUL_PIECES:
    raise ValueError(f"native backend: matmul must be 'auto' or one of {sorted(MATMUL_PIECES)}, got {matmul!r}")
  if step not in STEPS:
    raise ValueError(f"native backend: step must be one of {STEPS}, got {step!r}")
  reason = unsupported(cfg, devices) or build.load()
  if reason is not None:
    if required:
      raise ValueError(f"the native sampling backend is unavailable: {reason}")
    _warn_once(f"k15: sampling with the model's passes; the native CPU kernels are unavailable: {reason}")
    return None
  if step == "model":
    return ModelBackend(attention=paged_attention)
  if matmul == "auto":
    matmul = "int8x9" if build.amx_available() else "float32"
  elif matmul != "float32" and not build.amx_available():
    _warn_once(f"k15: native matmul={matmul!r} needs a CPU with AMX; using float32 FMAs")
    matmul = "float32"
  return NativeBackend(matmul)


@functools.cache
def _warn_once(message: str):
  logging.warning(message)
