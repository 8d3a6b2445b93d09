"""Repeat detection: a trajectory stops once its newest n-gram has occurred `count` times.

Occurrences are counted over the response only (the prompt may legitimately repeat itself) and may
overlap, so a run of one token is a repeat of every n-gram size. `find_repeat` is the plain-Python
definition; `newest_ngram_count` is the on-device check run after every decode step.
"""
from typing import Optional, Sequence

import jax.numpy as jnp


def find_repeat(response: Sequence[int], ngram: int, count: int) -> Optional[int]:
  """Number of response tokens after which the detector stops the trajectory, or None."""
  seen = {}
  for end in range(ngram, len(response) + 1):
    gram = tuple(response[end - ngram:end])
    seen[gram] = seen.get(gram, 0) + 1
    if seen[gram] >= count:
      return end
  return None


def newest_ngram_count(hist_BxS, start_B, end_B, ngram: int):
  """Occurrences in hist[b, start:end] of the n-gram hist[b, end-n:end] (0 when end - start < n).

  hist_BxS holds each slot's tokens at their absolute positions; start is where the response begins.
  """
  B, S = hist_BxS.shape
  offsets_N = jnp.arange(ngram)
  gram_BxN = jnp.take_along_axis(hist_BxS, jnp.clip(end_B[:, None] - ngram + offsets_N, 0, S - 1), axis=1)
  padded_BxS = jnp.pad(hist_BxS, ((0, 0), (0, ngram)))
  match_BxS = jnp.ones((B, S), bool)
  for k in range(ngram):  # match[j]: the n-gram starting at j equals the newest one
    match_BxS &= padded_BxS[:, k:k + S] == gram_BxN[:, k:k + 1]
  j_S = jnp.arange(S)
  inside_BxS = (j_S >= start_B[:, None]) & (j_S + ngram <= end_B[:, None])
  count_B = jnp.sum(match_BxS & inside_BxS, axis=1, dtype=jnp.int32)
  return jnp.where(end_B - start_B >= ngram, count_B, 0)
