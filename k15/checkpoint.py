"""What a run keeps on disk: orbax checkpoints, stage directories and Hugging Face exports, never a broken one.

Orbax checkpoints hold device state (params, optimizer) and host state (everything else). Host state is what makes
a resumed run continue exactly: the iteration, RNG, replay buffer of partial rollouts, per-prompt success statistics
and the data position. It is stored as JSON (numpy arrays become lists) so a researcher can read it.

Nothing non-finite is saved (`assert_finite`); a stage's output directory (the task data, the warm-up and final
models) is written under a temporary name and renamed once complete (`stage_dir`); load errors name the file.
"""
import contextlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from k15 import storage

log = logging.getLogger(__name__)

COMPLETE = ".complete"  # the marker a stage directory gets last, just before its rename


class CheckpointError(ValueError):
  """A checkpoint, export or stage output that cannot be used; the message names the file."""


def _to_json(x):
  if isinstance(x, dict):
    return {str(k): _to_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_json(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)):
    return {"__ndarray__": np.asarray(x).tolist(), "dtype": str(np.asarray(x).dtype)}
  if isinstance(x, np.generic):
    return x.item()
  return x


def _from_json(x):
  if isinstance(x, dict):
    if "__ndarray__" in x:
      return np.asarray(x["__ndarray__"], dtype=x["dtype"])
    return {k: _from_json(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_from_json(v) for v in x]
  return x


@jax.jit
def _finite_leaves(tree):
  return [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]


def assert_finite(tree, what: str):
  """Raises CheckpointError naming the leaves of `tree` (params, optimizer state) that hold NaN or inf."""
  leaves = [x for x in jax.tree_util.tree_leaves_with_path(tree) if jnp.issubdtype(x[1].dtype, jnp.inexact)]
  finite = jax.device_get(_finite_leaves([x for _, x in leaves]))
  bad = [jax.tree_util.keystr(path) for (path, _), ok in zip(leaves, finite) if not ok]
  if bad:
    raise CheckpointError(f"{what}: non-finite values in {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}")


def is_complete(path: str) -> bool:
  """Whether `path` is a stage directory that was written to the end."""
  return storage.exists(storage.join(path, COMPLETE))


@contextlib.contextmanager
def stage_dir(path: str):
  """Yields a local temporary directory to write a stage's output into; it becomes `path` (replacing an incomplete
  one) with its completion marker only when the block ends without an error. Locally by a rename; in a bucket (no
  atomic rename) by uploading the files, the marker last."""
  if storage.is_url(path):
    tmp = tempfile.mkdtemp(prefix="k15-stage-")
    try:
      yield tmp
      storage.rmtree(path)
      storage.upload(tmp, path)
      storage.write_bytes(storage.join(path, COMPLETE), b"")
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    return
  tmp = path.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  yield tmp
  with open(os.path.join(tmp, COMPLETE), "w"):
    pass
  shutil.rmtree(path, ignore_errors=True)
  os.replace(tmp, path)


def save_hf(path: str, cfg, params):
  """A Hugging Face export written whole or not at all (stage_dir), of finite params only."""
  from k15 import models  # pylint: disable=g-import-not-at-top
  assert_finite(params, path)
  with stage_dir(path) as tmp:
    models.save_hf(tmp, cfg, params)


def load_hf(path: str, dtype: str = "float32"):
  """(ModelConfig, params) of a Hugging Face checkpoint directory (local or in a bucket), as k15.models.load_hf,
  with every error naming the file (a truncated config.json or safetensors file) and non-finite values refused."""
  if storage.is_url(path):
    with storage.local_copy(path) as local:
      try:
        return load_hf(local, dtype)
      except CheckpointError as e:
        raise CheckpointError(str(e).replace(local, path)) from None
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  from k15 import models  # pylint: disable=g-import-not-at-top
  config_path = os.path.join(path, "config.json")
  try:
    with open(config_path) as f:
      json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{config_path}: cannot read the checkpoint's config ({e})") from None
  files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
  for fname in files:
    try:
      with safe_open(fname, framework="numpy") as f:
        f.keys()
    except Exception as e:  # pylint: disable=broad-except  # safetensors raises its own error types
      raise CheckpointError(f"{fname}: not a readable safetensors file ({e}); truncated or corrupt?") from None
  try:
    cfg, params = models.load_hf(path, dtype=dtype)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{path} ({', '.join(map(os.path.basename, files))}): {type(e).__name__}: {e}") from None
  assert_finite(params, f"{path} ({', '.join(map(os.path.basename, files))})")
  return cfg, params


class Checkpointer:
  """Saves and restores (device_state, host_state) per RL iteration: the latest `keep` in `directory`, and the best
  by held-out accuracy in `directory`/best (when an iteration was evaluated)."""

  def __init__(self, directory: str, keep: int = 2):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    options = lambda **kw: ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False, **kw)
    self.directory = storage.abspath(directory)
    self.manager = ocp.CheckpointManager(self.directory, options=options(max_to_keep=keep))
    self.best = ocp.CheckpointManager(
        storage.join(self.directory, "best"),
        options=options(max_to_keep=1, best_fn=lambda m: m["eval_accuracy"], best_mode="max",
                        keep_checkpoints_without_metrics=False))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list:
    return sorted(self.manager.all_steps())

  def save(self, step: int, device_state: Any, host_state: dict, eval_accuracy: Optional[float] = None):
    """Saves finite state only (CheckpointError otherwise); with eval_accuracy, also as the best if it is."""
    assert_finite(device_state, f"{self.directory}/{step}")
    args = ocp.args.Composite(device=ocp.args.StandardSave(device_state), host=ocp.args.JsonSave(_to_json(host_state)))
    self.manager.save(step, args=args)
    self.manager.wait_until_finished()
    if eval_accuracy is not None:
      self.best.save(step, args=args, metrics={"eval_accuracy": float(eval_accuracy)})
      self.best.wait_until_finished()

  def restore(self, step: int, device_state_like: Any):
    """device_state_like: a pytree of arrays or ShapeDtypeStructs (with shardings) to restore into."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), device_state_like)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          device=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()))
      host = _from_json(restored["host"])
    except Exception as e:  # pylint: disable=broad-except  # orbax, tensorstore and json raise their own types
      raise CheckpointError(f"{self.directory}/{step}: cannot restore ({type(e).__name__}: {e})") from None
    # Orbax returns NamedTuples (optax states) as plain tuples: put the leaves back into the given structure.
    device_state = jax.tree.unflatten(jax.tree.structure(device_state_like), jax.tree.leaves(restored["device"]))
    return device_state, host

  def restore_latest(self, device_state_like: Any):
    """(step, device_state, host_state) of the newest checkpoint that restores, newest first: a corrupt one is
    skipped with a warning naming it. None when there is no checkpoint; CheckpointError when none restores."""
    steps = self.all_steps()
    for step in reversed(steps):
      try:
        return (step,) + self.restore(step, device_state_like)
      except CheckpointError as e:
        log.warning("%s; trying the previous checkpoint", e)
        print(f"WARNING: {e}; trying the previous checkpoint", flush=True)
    if steps:
      raise CheckpointError(f"{self.directory}: none of the checkpoints {steps} restores")
    return None

  def close(self):
    self.manager.close()
    self.best.close()
