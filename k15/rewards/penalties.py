"""Reward shaping on the host: the k1.5 length penalty (RECIPE.md section 2) and the repeat penalty.

Arrays are numpy, shaped [..., G]: the last axis is one prompt's group of G samples (PxG for a batch, or a single
group of G). Rewards are computed after the verifiers, before the batch goes to the device.
"""
from typing import NamedTuple, Sequence

import numpy as np

REPEAT = "repeat"  # the finish reason of a trajectory stopped by the repeat detector


def length_penalty(lengths_PxG, correct_PxG) -> np.ndarray:
  """len_reward per sample: lambda if correct else min(0, lambda), lambda = 0.5 - (len - min)/(max - min).

  min and max run over each prompt's group (the last axis); a group whose lengths are all equal gets zeros.
  `correct` is the verifier reward: a sample counts as correct when it equals 1 (True for booleans).
  """
  lengths = np.asarray(lengths_PxG, np.float64)
  correct = np.asarray(correct_PxG) == 1
  if lengths.shape != correct.shape:
    raise ValueError(f"lengths shape {lengths.shape} != correct shape {correct.shape}")
  lo = lengths.min(axis=-1, keepdims=True)
  span = lengths.max(axis=-1, keepdims=True) - lo
  # Where span == 0 divide by 1: the numerator is 0 there too, and the group is zeroed below anyway.
  lam = 0.5 - (lengths - lo) / np.where(span > 0, span, 1.0)
  len_reward = np.where(correct, lam, np.minimum(0.0, lam))
  return np.where(span > 0, len_reward, 0.0).astype(np.float32)


def length_penalty_weight(iteration: int, warmup_iterations: int, weight: float) -> float:
  """w for `iteration` (0-based): 0 for the first `warmup_iterations` iterations, then `weight`."""
  return 0.0 if iteration < warmup_iterations else float(weight)


def repeat_penalty(finish_reasons: Sequence, penalty: float) -> np.ndarray:
  """-|penalty| on samples that ended with reason "repeat", 0 elsewhere; same shape as finish_reasons.

  The result is ADDED to the reward. The sign of `penalty` is ignored, so a config may write the penalty as
  0.5 or as -0.5: a repeat stop is never rewarded.
  """
  reasons = np.asarray(finish_reasons, dtype=object)
  return np.where(reasons == REPEAT, -abs(float(penalty)), 0.0).astype(np.float32)


class Rewards(NamedTuple):
  """The total reward of each sample and its shaping terms, all float32 of the verifier rewards' shape."""
  total: np.ndarray  # verifier + length + repeat
  length: np.ndarray  # w * len_reward
  repeat: np.ndarray  # -|repeat penalty| on "repeat" stops


def total_rewards(verifier_rewards_PxG, lengths_PxG, finish_reasons_PxG, *, length_weight: float,
                  repeat_penalty_value: float) -> Rewards:
  """r + w * len_reward - |repeat_penalty_value| * [finished by "repeat"].

  length_weight is w for this iteration (see `length_penalty_weight`); correctness for the length penalty is
  verifier reward == 1.
  """
  r = np.asarray(verifier_rewards_PxG, np.float32)
  length = np.float32(length_weight) * length_penalty(lengths_PxG, r)
  repeat = repeat_penalty(finish_reasons_PxG, repeat_penalty_value)
  if repeat.shape != r.shape:
    raise ValueError(f"finish_reasons shape {repeat.shape} != rewards shape {r.shape}")
  return Rewards(r + length + repeat, length, repeat)
