"""Rewards computed once across the processes of a multi-host run, and the same on every process.

Process p of P verifies items p, p + P, p + 2P, ... of a batch; the rewards (and the count of verifier failures)
are all-gathered, so every process applies the same rewards and each item is verified once, not once per host.
Hosts that verified alone could disagree (a math-verify timeout on one host and not another) and then drift apart.
"""
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils


class SharedVerifier:
  """A k15.rewards.verifiers.Verifier (or anything called the same way, with a `failures` count) whose items are
  split across processes; every process must call it with the same batch."""

  def __init__(self, verifier):
    self.verifier = verifier
    self.failures = 0  # responses scored 0 because their verifier failed, over every call and every process

  def __call__(self, texts: Sequence[str], examples: Sequence[Mapping]) -> np.ndarray:
    if len(texts) != len(examples):
      raise ValueError(f"{len(texts)} responses but {len(examples)} examples")
    P, p, n = jax.process_count(), jax.process_index(), len(texts)
    before = self.verifier.failures
    if P == 1:
      rewards = np.asarray(self.verifier(texts, examples), np.float32)
      self.failures += self.verifier.failures - before
      return rewards
    mine = range(p, n, P)
    per = -(-n // P)
    row = np.zeros(per + 2, np.float32)  # this process's rewards (padded), its failure count, whether it raised
    error = None
    try:
      if mine:
        row[:len(mine)] = self.verifier([texts[i] for i in mine], [examples[i] for i in mine])
    except Exception as e:  # pylint: disable=broad-except  # raised below on every process, not only here
      error, row[per + 1] = e, 1
    row[per] = self.verifier.failures - before
    rows = np.asarray(multihost_utils.process_allgather(row))  # P x (per + 2)
    if error is not None:
      raise error
    if rows[:, per + 1].any():
      raise RuntimeError(f"verifying rewards failed on process(es) {np.flatnonzero(rows[:, per + 1]).tolist()}; "
                         "see their logs")
    rewards = np.empty(n, np.float32)
    for q in range(P):
      rewards[q::P] = rows[q, :len(range(q, n, P))]
    self.failures += int(rows[:, per].sum())
    return rewards

  def close(self) -> None:
    self.verifier.close()

  def __enter__(self) -> "SharedVerifier":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
