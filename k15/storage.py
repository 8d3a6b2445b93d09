"""A run's files on a local disk or in a bucket (gs://...), through etils epath.

Every file of a workdir (configs, metrics, plots, data files, Hugging Face exports; orbax checkpoints take the path
as it is) goes through these functions, so a workdir may be a local path or a URL such as gs://bucket/run without
a mount. Local paths behave as plain file I/O: a file written here is written whole (a temporary file, then a
rename). In a bucket an object is written whole when it is closed, and a directory is complete when its marker
file is (k15.checkpoint.stage_dir). Libraries that need a local file (SentencePiece, safetensors) get a local copy
(`local_copy`) or write into a local directory that is uploaded (`upload`).
"""
import contextlib
import os
import posixpath
import shutil
import tempfile
from typing import Iterator

from etils import epath


def is_url(path) -> bool:
  """Whether `path` names a file system by scheme (gs://bucket/run), not a local path."""
  return "://" in os.fspath(path)


def join(path, *parts) -> str:
  return (posixpath.join if is_url(path) else os.path.join)(os.fspath(path), *parts)


def abspath(path) -> str:
  return os.fspath(path) if is_url(path) else os.path.abspath(path)


def exists(path) -> bool:
  return epath.Path(path).exists()


def makedirs(path) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def rmtree(path) -> None:
  """Removes a directory tree (or a file); nothing to remove is fine."""
  p = epath.Path(path)
  if p.is_dir():
    p.rmtree()
  elif p.exists():
    p.unlink()


def listdir(path) -> list:
  return sorted(p.name for p in epath.Path(path).iterdir())


def open(path, mode: str = "r"):  # pylint: disable=redefined-builtin
  return epath.Path(path).open(mode)


def read_bytes(path) -> bytes:
  return epath.Path(path).read_bytes()


def read_text(path) -> str:
  return epath.Path(path).read_text()


def write_bytes(path, data: bytes) -> None:
  """Writes the file whole: a reader sees the old content or the new, never a part."""
  path = os.fspath(path)
  if is_url(path):
    parent = epath.Path(path).parent
    parent.mkdir(parents=True, exist_ok=True)
    epath.Path(path).write_bytes(data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode())


def upload(local_dir: str, dest) -> None:
  """Copies the files under local_dir into dest (a local path or a URL), overwriting files of the same name."""
  for root, _, files in os.walk(local_dir):
    rel = os.path.relpath(root, local_dir)
    target = dest if rel == "." else join(dest, *rel.split(os.sep))
    makedirs(target)
    for name in sorted(files):
      epath.Path(os.path.join(root, name)).copy(epath.Path(join(target, name)), overwrite=True)


@contextlib.contextmanager
def local_copy(path) -> Iterator[str]:
  """A local directory with the files of directory `path`: the path itself when local, else a temporary copy
  (removed at the end of the block)."""
  if not is_url(path):
    yield os.fspath(path)
    return
  tmp = tempfile.mkdtemp(prefix="k15-copy-")
  try:
    src = epath.Path(path)
    for root, _, files in src.walk():
      local = os.path.join(tmp, *root.relative_to(src).parts)
      os.makedirs(local, exist_ok=True)
      for name in files:
        (root / name).copy(epath.Path(os.path.join(local, name)), overwrite=True)
    yield tmp
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
