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


def pack_rows(lengths_B: Sequence[int], row_len: int):
  """Greedy first-fit decreasing of sequences of lengths_B into rows of row_len tokens: (row_B, offset_B, rows)."""
  row_B, offset_B, used = np.zeros(len(lengths_B), np.int32), np.zeros(len(lengths_B), np.int32), []
  for b in sorted(range(len(lengths_B)), key=lambda i: -lengths_B[i]):
    n = int(lengths_B[b])
    if n > row_len:
      raise ValueError(f"row {b}: {n} tokens do not fit a packed row of {row_len}")
    row = next((r for r, u in enumerate(used) if u + n <= row_len), len(used))
    if row == len(used):
      used.append(0)
    row_B[b], offset_B[b] = row, used[row]
    used[row] += n
  return row_B, offset_B, len(used)


def packed(tokens_BxT, lengths_B, rows: int, pad_id: int):
  """The sequences of tokens_BxT (lengths_B tokens each) packed into `rows` rows of T tokens (`pack_rows`; rows >= what
  it needs). Returns a dict: tokens and segments (each token's sample; -1 on padding) of the packed rows, and for the
  log-probs frame (`token_logprobs` scores tokens[:, 1:]) where each sample's log-prob of token t + 1 lands:
  unpack_rows_BxTm1 and unpack_cols_BxTm1 (past a sample's end: its own last place, outside its mask)."""
  B, T = tokens_BxT.shape
  row_B, offset_B, needed = pack_rows(lengths_B, T)
  if needed > rows:
    raise ValueError(f"{B} sequences need {needed} packed rows of {T} tokens, more than {rows}")
  tokens = np.full((rows, T), pad_id, np.int32)
  segments = np.full((rows, T), -1, np.int32)
  cols = np.minimum(np.arange(T - 1)[None, :], np.maximum(np.asarray(lengths_B)[:, None] - 2, 0)) + offset_B[:, None]
  for b in range(B):
    n, r, o = int(lengths_B[b]), row_B[b], offset_B[b]
    tokens[r, o:o + n], segments[r, o:o + n] = tokens_BxT[b, :n], b
  return {"packed_tokens": tokens, "packed_segments": segments,
          "unpack_rows_BxTm1": np.broadcast_to(row_B[:, None], (B, T - 1)).astype(np.int32),
          "unpack_cols_BxTm1": cols.astype(np.int32)}
