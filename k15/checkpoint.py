"""Orbax checkpoints of a run: device state (params, optimizer) and host state (everything else).

Host state is what makes a resumed run continue exactly: the iteration, RNG, replay buffer of partial
rollouts, per-prompt success statistics and the data position. It is stored as JSON (numpy arrays
become lists) so a researcher can read it.
"""
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


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


class Checkpointer:
  """Saves and restores (device_state, host_state) per RL iteration under workdir/checkpoints."""

  def __init__(self, directory: str, keep: int = 2):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, device_state: Any, host_state: dict):
    self.manager.save(step, args=ocp.args.Composite(
        device=ocp.args.StandardSave(device_state), host=ocp.args.JsonSave(_to_json(host_state))))
    self.manager.wait_until_finished()

  def restore(self, step: int, device_state_like: Any):
    """device_state_like: a pytree of arrays or ShapeDtypeStructs (with shardings) to restore into."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), device_state_like)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        device=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()))
    # Orbax returns NamedTuples (optax states) as plain tuples: put the leaves back into the given structure.
    device_state = jax.tree.unflatten(jax.tree.structure(device_state_like), jax.tree.leaves(restored["device"]))
    return device_state, _from_json(restored["host"])

  def close(self):
    self.manager.close()
