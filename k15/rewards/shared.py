"""Rewards computed once across the processes of a multi-host run, and the same on every process.

Of a batch's items that rules score (arith, math-verify, the code sandbox: host-side work), process p of P verifies
the p-th, (p + P)-th, ...; the rewards (and the count of verifier failures) are all-gathered, so every process applies
the same rewards and each such item is verified once, not once per host. Hosts that verified alone could disagree (a
math-verify timeout on one host and not another) and then drift apart. Items a judge scores (a reward model,
k15/rewards/reward_model.py) are device work on the run's mesh: every process scores all of them in the same calls,
as every process takes part in each computation on the mesh.
"""
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils


class SharedVerifier:
  """A k15.rewards.verifiers.Verifier (or anything called the same way, with `failures`, `judge_failures` and
  `judge_time_s`, and optionally `judged(example)`) whose rule-scored items are split across processes; every process
  must call it with the same batch."""

  def __init__(self, verifier):
    self.verifier = verifier
    self.failures = 0  # responses scored 0 because their verifier failed, over every call and every process

  @property
  def judge_failures(self) -> int:
    """The verifier's judges' failures (the same on every process: each scores every judged item)."""
    return self.verifier.judge_failures

  @property
  def judge_time_s(self) -> float:
    return self.verifier.judge_time_s

  def __call__(self, texts: Sequence[str], examples: Sequence[Mapping]) -> np.ndarray:
    if len(texts) != len(examples):
      raise ValueError(f"{len(texts)} responses but {len(examples)} examples")
    P, p, n = jax.process_count(), jax.process_index(), len(texts)
    if P == 1:
      before = self.verifier.failures
      rewards = np.asarray(self.verifier(texts, examples), np.float32)
      self.failures += self.verifier.failures - before
      return rewards
    judged = getattr(self.verifier, "judged", lambda example: False)
    on_mesh = [i for i, ex in enumerate(examples) if judged(ex)]
    ruled = [i for i, ex in enumerate(examples) if not judged(ex)]
    rewards = np.zeros(n, np.float32)
    if on_mesh:  # every process, all of them: a judge's computations span the mesh
      rewards[on_mesh] = self.verifier([texts[i] for i in on_mesh], [examples[i] for i in on_mesh])
    mine = ruled[p::P]
    per = -(-len(ruled) // P)
    row = np.zeros(per + 2, np.float32)  # this process's rewards (padded), its failure count, whether it raised
    error = None
    before = self.verifier.failures
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
    for q in range(P):
      theirs = ruled[q::P]
      rewards[theirs] = rows[q, :len(theirs)]
    self.failures += int(rows[:, per].sum())
    return rewards

  def close(self) -> None:
    self.verifier.close()

  def __enter__(self) -> "SharedVerifier":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
