"""Token sequences to fixed-shape training arrays.

A sequence is prompt + response. `token_logprobs` scores tokens[:, 1:], so masks live in that shifted frame:
mask_BxTm1[b, t] weights the log-prob of tokens[b, t + 1].
"""
from typing import Sequence

import numpy as np


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], seq_len: int, pad_id: int,
         loss_from: Sequence[int] = None):
  """tokens_BxT and mask_BxTm1 over response tokens (from response index loss_from[b] on, default 0).

  A sequence longer than seq_len is an error naming the row, never silently truncated.
  """
  B = len(prompts)
  tokens = np.full((B, seq_len), pad_id, np.int32)
  mask = np.zeros((B, seq_len - 1), np.float32)
  for b, (p, r) in enumerate(zip(prompts, responses)):
    n = len(p) + len(r)
    if n > seq_len:
      raise ValueError(f"row {b}: prompt ({len(p)}) + response ({len(r)}) = {n} tokens > seq_len={seq_len}")
    if len(p) == 0:
      raise ValueError(f"row {b}: empty prompt")
    tokens[b, :n] = np.concatenate([np.asarray(p, np.int32), np.asarray(r, np.int32)])
    start = len(p) + (0 if loss_from is None else loss_from[b])
    mask[b, start - 1:n - 1] = 1.0
  return tokens, mask
