"""DPO preference pairs for long2short (report 2.4): prefer the shortest correct response.

For one prompt's group of G responses: the positive is the shortest correct one (lowest index among ties);
the negatives are every wrong response strictly longer than it, and every other correct response at least
long_factor times its length. Pairs are (chosen_idx, rejected_idx) into the group, rejected in index order.
A wrong response no longer than the positive makes no pair: preferring the positive over it would teach
correctness, not brevity.
"""
import numpy as np


def build_dpo_pairs(lengths_G, correct_G, long_factor: float = 1.5) -> list[tuple[int, int]]:
  """(chosen, rejected) index pairs for one group; [] when no response is correct."""
  lengths = np.asarray(lengths_G)
  correct = np.asarray(correct_G) == 1
  if lengths.shape != correct.shape or lengths.ndim != 1:
    raise ValueError(f"lengths {lengths.shape} and correct {correct.shape} must be the same 1-D shape")
  if not correct.any():
    return []
  correct_idx = np.flatnonzero(correct)
  pos = int(correct_idx[np.argmin(lengths[correct_idx])])  # argmin returns the first of ties
  pos_len = lengths[pos]
  rejected = (~correct & (lengths > pos_len)) | (correct & (lengths >= long_factor * pos_len))
  rejected[pos] = False
  return [(pos, int(j)) for j in np.flatnonzero(rejected)]


def build_dpo_pairs_batch(lengths_PxG, correct_PxG, long_factor: float = 1.5) -> list[tuple[int, int]]:
  """Pairs for every prompt of a batch, as flat indices into B = P*G (groups contiguous)."""
  lengths, correct = np.asarray(lengths_PxG), np.asarray(correct_PxG)
  G = lengths.shape[1]
  return [(p * G + c, p * G + r) for p in range(lengths.shape[0])
          for c, r in build_dpo_pairs(lengths[p], correct[p], long_factor)]
