"""Host-side state that every process must hold alike, compared once per RL iteration.

Every process runs the same host code (prompt sampling, replay buffer, success statistics, RNG) and so dispatches
the same device programs. If one host's state drifts (a reward computed differently there, say), its prompts, and
then its shapes, differ from the others' next iteration, and the collectives wait forever. Instead each process
digests each field (8 bytes of a SHA-256), the digests are all-gathered, and a mismatch raises HostDisagreement
naming the iteration and the fields, on every process at once.
"""
import hashlib

import jax
import numpy as np
from jax.experimental import multihost_utils


class HostDisagreement(RuntimeError):
  """The processes of a run hold different host-side state; the message names the iteration and the fields."""


def _update(h, x):
  if isinstance(x, dict):
    h.update(b"{%d" % len(x))
    for k in sorted(x, key=str):
      _update(h, str(k))
      _update(h, x[k])
  elif isinstance(x, (list, tuple)) and x and all(isinstance(v, (int, float)) for v in x):
    _update(h, np.asarray(x))  # token lists: one buffer, not a Python loop
  elif isinstance(x, (list, tuple)):
    h.update(b"[%d" % len(x))
    for v in x:
      _update(h, v)
  elif isinstance(x, (np.ndarray, np.generic)):
    x = np.ascontiguousarray(x)
    h.update(f"{x.dtype.str}{x.shape}".encode())
    h.update(x.tobytes())
  else:
    h.update(repr(x).encode())


def digest(value) -> bytes:
  """8 bytes that change when any leaf of `value` (nested dicts, lists, arrays, scalars) changes."""
  h = hashlib.sha256()
  _update(h, value)
  return h.digest()[:8]


def disagreements(digests_PxFx8: np.ndarray, names) -> list:
  """(field, processes that differ from process 0) for each field whose digests are not all alike."""
  out = []
  for f, name in enumerate(names):
    differ = [p for p in range(digests_PxFx8.shape[0]) if (digests_PxFx8[p, f] != digests_PxFx8[0, f]).any()]
    if differ:
      out.append((name, differ))
  return out


def check(iteration: int, fields: dict) -> None:
  """Raises HostDisagreement when the processes' `fields` ({name: value}) differ; a no-op on one process."""
  if jax.process_count() == 1:
    return
  local = np.frombuffer(b"".join(digest(v) for v in fields.values()), np.uint8).reshape(len(fields), 8)
  gathered = np.asarray(multihost_utils.process_allgather(local.astype(np.int32)))  # P x F x 8
  bad = disagreements(gathered, list(fields))
  if bad:
    named = "; ".join(f"{name} (process {', '.join(map(str, procs))} differs from process 0)" for name, procs in bad)
    raise HostDisagreement(f"iteration {iteration}: the processes disagree on {named}. Their next steps would "
                           "dispatch different work and hang; stopped instead. Host-side code must be "
                           "deterministic and see the same inputs on every host.")
