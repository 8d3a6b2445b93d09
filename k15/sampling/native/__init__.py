"""Hand-written CPU kernels for float32 models (C++ through XLA's FFI): the sampler's fast path on CPU.

On a CPU, XLA runs a small model's decode step as dozens of separate kernels, and its matmuls with one row
per slot run well below the machine's matmul rate. `kernels.cc` does the whole step in one call:
register-blocked matmuls over weights packed for them, attention that reads each slot's cache only up to
its own position, the caches written in place, the work shared by XLA's CPU threads phase by phase. It computes
what `k15.sampling.step.decode_step` computes (the tests hold them to each other and to transformers).

On a CPU with AMX tiles (Sapphire Rapids and later), the step's matmuls can run on the tiles instead
(`MATMUL_PIECES`): each float32 operand split into int8 slices under a power-of-two scale (per weight column,
per activation row), 9 slice products summed exactly in int32 per order ("int8x9", the default there: float32's
accuracy relative to each column's largest weight), or into bfloat16 pieces whose products are summed in float32
(3 pieces and 6 products keep float32's accuracy element by element; 2 pieces and 3 products keep 16 bits of each
operand: opt-in, faster, log-probs within ~1e-3). Prefill's matmuls (`matmul`, thousands of rows) then run faster
than XLA's float32 dots, and the step faster than with FMAs. Prefill's attention (`prefill_attention`) runs here
too, with any native step: XLA runs it as many small batched dots.

It is compiled on first use by the system C++ compiler ($CXX, default g++) for this machine's CPU, and the
library is cached in $K15_NATIVE_CACHE (default ~/.cache/k15/native), keyed by the source, the flags, the
compiler, jaxlib and the CPU. `SamplingConfig.decode_kernel` and `native_matmul` choose (`choose`): "auto" takes
the native step on CPU devices with a float32 model when it builds (on AMX tiles where the CPU has them),
"native" requires it, "xla" never uses it.
"""
import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from k15.models import ModelConfig
from k15.sampling import step as xla_step
from k15.sampling.select import LogitStats

SOURCE = pathlib.Path(__file__).with_name("kernels.cc")
TARGET = "k15_decode_step_f32"
MATMUL_TARGET = "k15_matmul_amx"
ATTENTION_TARGET = "k15_prefill_attention"
PANEL = 32  # columns per panel of a packed weight (kernels.cc's matmul reads 32-column slabs)
_FLAGS = ("-O3", "-march=native", "-std=gnu++17", "-shared", "-fPIC", "-Wno-return-type")


class NativeWeights(NamedTuple):
  """What the native step reads: norms as they are, matmul weights packed (`pack`) and stacked over layers."""
  embed_VxD: jax.Array
  attn_norm_LxD: jax.Array
  qkv: jax.Array  # packed Dx(N+2K)H per layer
  qkv_bias_LxE: jax.Array  # zeros for a model without qkv bias
  o: jax.Array  # packed NHxD
  mlp_norm_LxD: jax.Array
  gate_up: jax.Array  # gate and up packed each (DxF), the up panels after the gate panels
  down: jax.Array  # packed FxD
  final_norm_D: jax.Array
  head: jax.Array  # packed DxV


def pack(w_KxN):
  """...xKxN -> ...xPxKx32: the N columns in P = ceil(N/32) contiguous Kx32 panels, the last zero-padded, so a
  matmul streams each panel once from start to end."""
  *lead, K, N = w_KxN.shape
  P = -(-N // PANEL)
  w = jnp.pad(w_KxN, [(0, 0)] * len(lead) + [(0, 0), (0, P * PANEL - N)])
  return jnp.moveaxis(w.reshape(*lead, K, P, PANEL), -2, -3)


def split_bf16(x, pieces: int):
  """float32 x as `pieces` bfloat16 arrays whose sum is x to 8 * pieces significant bits (each piece rounds
  what the ones before it left, to nearest even): with 3, every bit of a float32 significand."""
  out = []
  for _ in range(pieces):
    out.append(x.astype(jnp.bfloat16))
    x = x - out[-1].astype(jnp.float32)
  return out


def pack_amx(w_KxN, pieces: int):
  """...xKxN float32 -> ...xPxK/32x`pieces`x2x16x32 bfloat16, kernels.cc's AMX layout: per 32-column panel
  and per 32 rows of K (zero-padded to a multiple of 32), each bfloat16 piece (`split_bf16`) as two tiles of 16
  columns, a tile's row r holding rows 2r and 2r + 1 of K interleaved column by column (AMX's pair layout)."""
  *lead, K, N = w_KxN.shape
  P, Kb = -(-N // PANEL), -(-K // 32)
  w = jnp.pad(w_KxN.astype(jnp.float32), [(0, 0)] * len(lead) + [(0, Kb * 32 - K), (0, P * PANEL - N)])
  w = jnp.stack(split_bf16(w, pieces), axis=-3)  # ...x pieces x Kp x Np
  w = w.reshape(*lead, pieces, Kb, 16, 2, P, 2, 16)  # k = 32 kb + 2 r + parity, n = 32 p + 16 tile + column
  n = len(lead)
  order = (*range(n), n + 4, n + 1, n, n + 5, n + 2, n + 6, n + 3)  # P, Kb, pieces, tile, r, column, parity
  return jnp.transpose(w, order).reshape(*lead, P, Kb, pieces, 2, 16, 32)


INT8_SLICES = 3
INT8_BASE = 254  # one int8 slice to the next (kernels.cc's kBase)
INT8_HEADER = 4 * PANEL  # bytes of a packed int8 panel's column scales


def _int8_scale(x, axis: int):
  """The scale of x's int8 slices, one per slice along `axis` (kept as size 1): the power of two that brings the
  largest |x| to at most 127 (NaN where that is inf or NaN). kernels.cc's `split_int8` scales a row alike."""
  largest = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
  _, e = jnp.frexp(largest)
  scale = jnp.where(largest > 0, jnp.ldexp(jnp.float32(1), e - 7), jnp.float32(1))
  scale = jnp.where(largest / scale > 127, 2 * scale, scale)
  return jnp.where(jnp.isfinite(largest), scale, jnp.nan)  # inf or NaN: NaN results, as in float32


def _int8_slices(v):
  """The 3 int8 slices of v = x / its scale (at most 127 in magnitude): x = scale (x0 + x1 / 254 + x2 / 254^2) to
  about 2^-23 of the largest |x| sharing the scale. Each slice is the nearest integer to what the ones before
  left, times 254, so all lie in [-127, 127]."""
  slices = []
  for _ in range(INT8_SLICES):
    r = jnp.round(v)
    slices.append(r.astype(jnp.int8))
    v = (v - r) * INT8_BASE
  return slices


def pack_int8(w_KxN):
  """...xKxN float32 -> ...xPx(128 + 2 x K/64 x 3 x 16 x 64) int8, kernels.cc's int8 AMX layout: per 32-column
  panel the columns' scales (float32 bytes), then per tile of 16 columns and per 64 rows of K (zero-padded to a
  multiple of 64) each int8 slice (`_int8_slices`, a scale per column) as a tile whose row r holds rows 4r..4r+3 of
  K column by column (AMX's quad layout)."""
  *lead, K, N = w_KxN.shape
  P, Kb = -(-N // PANEL), -(-K // 64)
  w = jnp.pad(w_KxN.astype(jnp.float32), [(0, 0)] * len(lead) + [(0, Kb * 64 - K), (0, P * PANEL - N)])
  scale = _int8_scale(w, axis=-2)  # ... x 1 x Np
  n = len(lead)
  # Arranged in float32 (XLA moves 4-byte elements far faster than bytes), then sliced in place:
  # k = 64 kb + 4 r + quad, n = 32 p + 16 tile + column -> P, tile, Kb, r, column, quad.
  v = (w / scale).reshape(*lead, Kb, 16, 4, P, 2, 16)
  v = jnp.transpose(v, (*range(n), n + 3, n + 4, n, n + 1, n + 5, n + 2))
  q = jnp.stack(_int8_slices(v), axis=n + 3).reshape(*lead, P, 2 * Kb * INT8_SLICES * 16 * 64)
  header = jax.lax.bitcast_convert_type(scale.reshape(*lead, P, PANEL), jnp.int8).reshape(*lead, P, INT8_HEADER)
  return jnp.concatenate([header, q], axis=-1)


def pack_pairs(w_Kx2N, packer=pack):
  """The two halves of ...xKx2N (gate and up) packed each, their panels interleaved (gate 0, up 0, gate 1, ...):
  panel j of the gate and of the up projection cover the same columns, so one thread computes both (and
  silu(gate) * up) from one run of memory."""
  N = w_Kx2N.shape[-1] // 2
  axis = w_Kx2N.ndim - 2  # the panels'
  both = jnp.stack([packer(w_Kx2N[..., :N]), packer(w_Kx2N[..., N:])], axis=axis + 1)
  return both.reshape(*both.shape[:axis], -1, *both.shape[axis + 2:])


def decode_weights(cfg: ModelConfig, params, matmul: str = "float32") -> NativeWeights:
  """The model's weights in the native step's layout; build once per sampling run, not per step.

  `matmul` (a `MATMUL_PIECES` key): "float32" packs the matmul weights in float32 for the step's FMA matmuls;
  "bf16x3" and "bf16x6" split them into 2 or 3 bfloat16 pieces (`pack_amx`), "int8x9" into 3 int8 slices
  (`pack_int8`), for its AMX matmuls."""
  fused = xla_step.decode_weights(cfg, params)
  stack = lambda name: jnp.stack([layer[name] for layer in fused["layers"]]).astype(jnp.float32)
  E = fused["layers"][0]["qkv_DxE"].shape[1]
  bias = stack("qkv_bias_E") if cfg.qkv_bias else jnp.zeros((cfg.n_layers, E), jnp.float32)
  f32 = lambda a: a.astype(jnp.float32)
  packer = decode_weights_packer(matmul)
  return NativeWeights(f32(params["embed"]["embedding"]), stack("attn_norm"), packer(stack("qkv_DxE")), bias,
                       packer(stack("o_NHxD")), stack("mlp_norm"), pack_pairs(stack("gate_up_Dx2F"), packer),
                       packer(stack("down_FxD")), f32(params["final_norm"]["scale"]), packer(f32(fused["head_DxV"])))


def decode_step(cfg: ModelConfig, weights: NativeWeights, cache_k, cache_v, tokens_B, positions_B, threads: int = 0,
                target: str = TARGET):
  """Logits (float32 BxV), their `LogitStats` and the caches with each slot's k/v written at its position:
  `step.decode_step`'s contract (a position outside the cache writes nothing and gets garbage logits), plus
  the stats, computed in the same call (XLA's reductions over the logits cost the loop more than this).

  `threads`: at most this many threads work on the call (0: XLA's whole CPU thread pool); a mesh of several
  CPU devices stepping side by side gives each its share of the cores. `target`: a variant's FFI target
  (`load_variant`), for benchmarks.
  """
  if target == TARGET:
    require("the native decode step")
  L = cfg.n_layers
  caches = tuple(cache_k) + tuple(cache_v)
  B = tokens_B.shape[0]
  results = [jax.ShapeDtypeStruct((B, cfg.vocab_size), jnp.float32), jax.ShapeDtypeStruct((B,), jnp.int32),
             jax.ShapeDtypeStruct((B,), jnp.float32), jax.ShapeDtypeStruct((B,), jnp.float32)]
  results += [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches]
  call = jax.ffi.ffi_call(target, results, input_output_aliases={12 + i: 4 + i for i in range(2 * L)})
  out = call(tokens_B.astype(jnp.int32), positions_B.astype(jnp.int32), *weights, *caches,
             eps=np.float32(cfg.rms_norm_eps), theta=np.float32(cfg.rope_theta), n_heads=np.int64(cfg.n_heads),
             n_kv_heads=np.int64(cfg.n_kv_heads), d_ff=np.int64(cfg.d_ff), pieces=np.int64(pieces_of(weights)),
             threads=np.int64(threads))
  return out[0], LogitStats(*out[1:4]), tuple(out[4:4 + L]), tuple(out[4 + L:])


def matmul(x, w, n_cols: int, layer: int = 0, swiglu: bool = False, threads: int = 0):
  """x (...xK, float32) times a weight packed by `pack_amx` (layer `layer` of a stack), on AMX tiles: ...x`n_cols`
  float32. With `swiglu`, `w` holds gate and up panels alternating (`pack_pairs`) and the result is
  silu(x Wgate) * (x Wup). Prefill's matmuls (many rows); needs `amx_available()`."""
  require("the native matmul")
  out = jax.ShapeDtypeStruct((*x.shape[:-1], n_cols), jnp.float32)
  return jax.ffi.ffi_call(MATMUL_TARGET, out)(x.astype(jnp.float32), w, layer=np.int64(layer), n_cols=np.int64(n_cols),
                                                swiglu=bool(swiglu), threads=np.int64(threads))


def prefill_attention(q_PxTxNxH, k_PxTxKxH, v_PxTxKxH, threads: int = 0):
  """Causal grouped-query attention of left-aligned rows over their positions 0..T-1 (float32): what
  `k15.models.transformer.attend` computes with a causal mask, in one call (XLA runs it as many small dots)."""
  require("the native prefill attention")
  out = jax.ShapeDtypeStruct(q_PxTxNxH.shape, jnp.float32)
  f32 = lambda a: a.astype(jnp.float32)
  return jax.ffi.ffi_call(ATTENTION_TARGET, out)(f32(q_PxTxNxH), f32(k_PxTxKxH), f32(v_PxTxKxH),
                                                 threads=np.int64(threads))


def pieces_of(weights: NativeWeights) -> int:
  """The pieces of each operand of the packed weights' matmuls (`decode_weights`): bfloat16 pieces or int8
  slices; 0 for float32."""
  if weights.qkv.dtype == jnp.int8:
    return INT8_SLICES
  return 0 if weights.qkv.dtype == jnp.float32 else weights.qkv.shape[-4]


def amx_available() -> bool:
  """Whether the native step can use AMX tiles here: the build targets a CPU with AMX (bf16) and the kernel
  lets this process use them."""
  return _load() is None and bool(_LIBRARIES[TARGET].K15AmxAvailable())


class BuildError(RuntimeError):
  pass


def _cpu_signature() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((line for line in f if line.startswith("flags")), "")
  except OSError:
    return ""


def _build(compiler: str, cache_dir: pathlib.Path, source: pathlib.Path = SOURCE, defines=()) -> pathlib.Path:
  """The compiled library, from the cache or freshly built (written under a temporary name, then renamed, so
  concurrent processes never load a half-written file). `defines`: preprocessor macros (-D), for variants."""
  flags = (*_FLAGS, *(f"-D{d}" for d in defines))
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
  key = hashlib.sha256("\0".join([source.read_text(), " ".join(flags), version, jax.__version__,
                                  _cpu_signature()]).encode()).hexdigest()[:16]
  lib = cache_dir / f"k15_{source.stem}_{key}.so"
  if lib.exists():
    return lib
  cache_dir.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
  os.close(fd)
  cmd = [compiler, *flags, f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if done.returncode:
    os.unlink(tmp)
    raise BuildError(f"compiling {source.name} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
  os.replace(tmp, lib)
  return lib


def _compiler() -> str:
  return os.environ.get("CXX", "g++")


def _cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("K15_NATIVE_CACHE", pathlib.Path.home() / ".cache" / "k15" / "native"))


def _register(target: str, library: pathlib.Path) -> ctypes.CDLL:
  lib = ctypes.cdll.LoadLibrary(str(library))  # RTLD_LOCAL: variants' symbols do not clash
  jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.K15DecodeStepF32), platform="cpu")
  if target == TARGET:
    jax.ffi.register_ffi_target(MATMUL_TARGET, jax.ffi.pycapsule(lib.K15MatmulAmx), platform="cpu")
    jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(lib.K15PrefillAttention), platform="cpu")
  _LIBRARIES[target] = lib  # keep it loaded
  return lib


def require(what: str = "the native kernels"):
  """Builds the kernels once per process (`_load`); raises RuntimeError saying why `what` cannot run here (no
  C++ compiler, a failed build) when they are unavailable."""
  reason = _load()
  if reason is not None:
    raise RuntimeError(f"{what} is unavailable: {reason}")


@functools.cache
def _load() -> Optional[str]:
  """Builds and registers the FFI target once per process; None on success, else why it is unavailable."""
  if shutil.which(_compiler()) is None:
    return f"no C++ compiler ({_compiler()!r} not found; set $CXX)"
  try:
    _register(TARGET, _build(_compiler(), _cache_dir()))
  except (BuildError, OSError) as e:
    return str(e)
  return None


_LIBRARIES = {}


def load_variant(name: str, source=SOURCE, defines=()) -> str:
  """Builds `source` (a variant of kernels.cc: same arguments and results) with macros `defines` and
  registers it as FFI target "k15_decode_step_<name>"; returns the target, for `decode_step(target=...)`.
  For benchmarks that compare variants in one process; raises BuildError when it does not compile."""
  target = f"{TARGET}_{name}"
  if target not in _LIBRARIES:
    _register(target, build(source, defines))
  return target


def build(source, defines=()) -> pathlib.Path:
  """`source` (C++) built with the native step's flags and macros `defines` into a cached shared library;
  for variants and benchmarks' helpers. Raises BuildError when there is no compiler or it does not compile."""
  if shutil.which(_compiler()) is None:
    raise BuildError(f"no C++ compiler to build {pathlib.Path(source).name} ({_compiler()!r} not found; set $CXX)")
  return _build(_compiler(), _cache_dir(), pathlib.Path(source), tuple(defines))


PHASE_KINDS = ("embed", "qkv", "attention", "o", "mlp norm", "gate_up", "act split", "down", "norm", "head", "stats")


def phase_times(target: str):
  """{phase kind: (running, waiting) seconds summed over threads} and the number of calls since the last
  read, from a variant built with defines=("K15_PHASE_TIMES",); clears them."""
  out = (ctypes.c_double * (2 * len(PHASE_KINDS) + 1))()
  _LIBRARIES[target].K15PhaseTimes(out)
  return {k: (out[2 * i], out[2 * i + 1]) for i, k in enumerate(PHASE_KINDS)}, int(out[-1])


def _unsupported(cfg: ModelConfig, devices) -> Optional[str]:
  """Why the native step does not apply to `cfg` on `devices` (not a CPU, not float32), or None."""
  platforms = {d.platform for d in devices}
  if platforms != {"cpu"}:
    return f"it runs on CPU devices only, not {sorted(platforms)}"
  if cfg.jnp_dtype != jnp.float32:
    return f"it computes in float32 only, not ModelConfig.dtype={cfg.dtype!r}"
  return None


# SamplingConfig.native_matmul -> the pieces of each matmul operand (0: float32 FMAs).
MATMUL_PIECES = {"float32": 0, "bf16x3": 2, "bf16x6": 3, "int8x9": INT8_SLICES}


def decode_weights_packer(matmul: str):
  """The function that packs a ...xKxN weight for the native step's `matmul` (a `MATMUL_PIECES` key)."""
  if matmul not in MATMUL_PIECES:
    raise ValueError(f"unknown native matmul {matmul!r}; expected one of {sorted(MATMUL_PIECES)}")
  return {"float32": pack, "int8x9": pack_int8}.get(matmul, functools.partial(pack_amx, pieces=MATMUL_PIECES[matmul]))


def choose(kernel: str, cfg: ModelConfig, devices, matmul: str = "auto") -> str:
  """The decode kernel that SamplingConfig.decode_kernel `kernel` and native_matmul `matmul` mean here: "xla",
  or "native" followed by the native step's matmuls ("native", "native_bf16x3", ...; `matmul_of`).

  "auto" falls back to XLA quietly where the native step does not apply (off CPU, below float32), with a
  warning where it applies but failed to build. The native step's matmuls: `matmul` "auto" takes int8x9 where
  the CPU has AMX, else float32; an AMX choice on a CPU without AMX warns and takes float32."""
  if kernel == "xla":
    return "xla"
  unsupported = _unsupported(cfg, devices)
  reason = unsupported or _load()
  if reason is None:
    if matmul == "auto":
      matmul = "int8x9" if amx_available() else "float32"
    elif matmul != "float32" and not amx_available():
      _warn_once(f"k15: SamplingConfig.native_matmul={matmul!r} needs a CPU with AMX; using float32 FMAs")
      matmul = "float32"
    return "native" if matmul == "float32" else f"native_{matmul}"
  if kernel == "native":
    raise ValueError(f"SamplingConfig.decode_kernel='native' is unavailable: {reason}")
  if unsupported is None:
    _warn_once(f"k15: decoding with XLA's step; the native CPU step is unavailable: {reason}")
  return "xla"


def matmul_of(kernel: str) -> str:
  """The native step's matmuls (a `MATMUL_PIECES` key) of a `choose` result."""
  return kernel.removeprefix("native").removeprefix("_") or "float32"


@functools.cache
def _warn_once(message: str):
  logging.warning(message)
