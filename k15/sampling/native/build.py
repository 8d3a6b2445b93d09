"""Compiling kernels.cc (or a variant of it) for this machine, caching the library, and loading it.

A library is built by the system C++ compiler ($CXX, default g++) for this CPU and cached in $K15_NATIVE_CACHE
(default ~/.cache/k15/native), keyed by the source, the flags, the compiler, jax and the CPU. The cache directory
is the user's alone (mode 0700), and a library is loaded only when its bytes still have the SHA-256 recorded
beside it when it was built, in a file only its owner may write: a library changed after its build is rebuilt,
never loaded.
"""
import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import stat
import subprocess
import tempfile
from typing import Optional

import jax

SOURCE = pathlib.Path(__file__).with_name("kernels.cc")
TARGET = "k15_paged_step_f32"
ATTENTION_TARGET = "k15_paged_attention_f32"  # kernels.cc's paged attention alone (`native.paged_attention`)
FLAGS = ("-O3", "-march=native", "-std=gnu++17", "-shared", "-fPIC", "-Wno-return-type")


class BuildError(RuntimeError):
  pass


def _cpu_signature() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((line for line in f if line.startswith("flags")), "")
  except OSError:
    return ""


def _digest(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _private(path: pathlib.Path) -> bool:
  """Owned by this user and writable by no one else."""
  st = path.stat()
  return st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _verified(lib: pathlib.Path) -> bool:
  """The cached library is intact: its recorded digest matches, and neither file is writable by others."""
  record = lib.with_suffix(".sha256")
  try:
    return _private(lib) and _private(record) and record.read_text().strip() == _digest(lib)
  except OSError:
    return False


def _write_private(path: pathlib.Path, data: bytes):
  fd, tmp = tempfile.mkstemp(dir=path.parent)
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def compile_cached(compiler: str, cache_dir: pathlib.Path, source: pathlib.Path = SOURCE, defines=()) -> pathlib.Path:
  """The compiled library, from the cache when intact (`_verified`), else freshly built (written under a
  temporary name, then renamed, so concurrent processes never load a half-written file). `defines`: preprocessor
  macros (-D), for variants."""
  flags = (*FLAGS, *(f"-D{d}" for d in defines))
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
  key = hashlib.sha256("\0".join([source.read_text(), " ".join(flags), version, jax.__version__,
                                  _cpu_signature()]).encode()).hexdigest()[:16]
  lib = cache_dir / f"k15_{source.stem}_{key}.so"
  if lib.exists() and _verified(lib):
    return lib
  cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
  if not _private(cache_dir):
    raise BuildError(f"the kernel cache {cache_dir} is writable by other users; set $K15_NATIVE_CACHE to a private "
                     "directory")
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
  os.close(fd)
  cmd = [compiler, *flags, f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if done.returncode:
    os.unlink(tmp)
    raise BuildError(f"compiling {source.name} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
  os.chmod(tmp, 0o500)
  _write_private(lib.with_suffix(".sha256"), _digest(pathlib.Path(tmp)).encode())
  os.replace(tmp, lib)
  return lib


def compiler() -> str:
  return os.environ.get("CXX", "g++")


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("K15_NATIVE_CACHE", pathlib.Path.home() / ".cache" / "k15" / "native"))


def build(source=SOURCE, defines=()) -> pathlib.Path:
  """`source` (C++) built with the kernels' flags and macros `defines` into a cached shared library. Raises
  BuildError when there is no compiler or it does not compile."""
  if shutil.which(compiler()) is None:
    raise BuildError(f"no C++ compiler to build {pathlib.Path(source).name} ({compiler()!r} not found; set $CXX)")
  return compile_cached(compiler(), cache_dir(), pathlib.Path(source), tuple(defines))


_LIBRARIES = {}  # FFI target -> its loaded library (kept loaded)


def register(target: str, library: pathlib.Path) -> ctypes.CDLL:
  """Loads `library` and registers its paged step as FFI target `target` (a variant of kernels.cc: same arguments
  and results under another name)."""
  lib = ctypes.cdll.LoadLibrary(str(library))  # RTLD_LOCAL: variants' symbols do not clash
  jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.K15PagedStepF32), platform="cpu")
  _LIBRARIES[target] = lib
  return lib


@functools.cache
def load() -> Optional[str]:
  """Builds and registers kernels.cc once per process; None on success, else why it is unavailable."""
  try:
    lib = register(TARGET, build())
    jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(lib.K15PagedAttentionF32), platform="cpu")
  except (BuildError, OSError) as e:
    return str(e)
  return None


def require(what: str = "the native kernels"):
  """Raises RuntimeError saying why `what` cannot run here (no C++ compiler, a failed build) when kernels.cc is
  unavailable."""
  reason = load()
  if reason is not None:
    raise RuntimeError(f"{what} is unavailable: {reason}")


def vector_bytes() -> int:
  """The bytes of the vectors the kernels compute on here: 64 with AVX-512, 32 with AVX, 16 otherwise; 0 when they
  do not build."""
  return _LIBRARIES[TARGET].K15VectorBytes() if load() is None else 0


def amx_available() -> bool:
  """Whether the kernels can use AMX tiles here: the build targets a CPU with AMX (bf16) and the kernel lets this
  process use them."""
  return load() is None and bool(_LIBRARIES[TARGET].K15AmxAvailable())
