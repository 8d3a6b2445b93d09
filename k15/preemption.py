"""Preemption: on SIGTERM every process stops after the same RL iteration, saves a checkpoint and exits 0.

Spot and preemptible TPU VMs (and maintenance events) get SIGTERM shortly before they go away. In a multi-process
run jax's preemption service (started by jax.distributed.initialize) catches SIGTERM on any host, and
`multihost_utils.reached_preemption_sync_point` agrees on the step to stop at: the step after the highest one any
process had reached when the notice spread, so a notice stops the run at the end of the current or the next
iteration. On a single process a SIGTERM handler sets a flag that stops the run at the end of the current iteration.
"""
import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):
  """Raised once a preempted run's checkpoint is saved; the entry points exit 0 (a rerun resumes)."""


class PreemptionWatch:
  """`reached(step)`: whether the run should stop after `step`; every process must call it once per step, with the
  same steps in the same order. Use as a context manager (the single-process SIGTERM handler lives inside it)."""

  def __init__(self):
    self._notice = False
    self._previous = None

  def __enter__(self) -> "PreemptionWatch":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():  # handlers: main only
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame):
    del signum, frame
    print("k15: SIGTERM: stopping after this iteration's checkpoint", flush=True)
    self._notice = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._notice
