"""DPO preference pairs for long2short (report 2.4): prefer the shortest correct response.

For one prompt's group of G responses: the positive is the shortest correct one (lowest index among ties);
the negatives are every wrong response strictly longer than it, and every other correct response at least
long_factor times its length. Pairs are (chosen_idx, rejected_idx) into the group, rejected in index order.
A wrong response no longer than the positive makes no pair: preferring the positive over it would teach
correctness, not brevity.

`dpo_train` then minimizes the DPO loss (k15.rl.losses.dpo_loss) over those pairs, with a frozen reference (the
long-CoT model) whose sequence log-probs are computed once.
"""
from typing import Sequence

import numpy as np

from k15 import models
from k15.config import DPOConfig
from k15.rl import batching, losses, sft
from k15.rl.trainer import in_chunks, train_steps


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


def sequence_logp(model_cfg, params, tokens_BxT, mask_BxTm1):
  """Sum of the masked response-token log-probs per row (the report's sequence log-probability), shape B."""
  return losses.masked_sum(models.token_logprobs(model_cfg, params, tokens_BxT), mask_BxTm1)


def dpo_train(trainer, params, ref_params, prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
              rejected: Sequence[Sequence[int]], cfg: DPOConfig, *, pad_id: int, seed: int, logger=None,
              log_every: int = 25):
  """DPO on (prompt, chosen, rejected) triples; returns the new params (params are donated, ref_params kept).

  Responses are token lists that end with eos. Each step draws cfg.batch_size pairs and scores chosen and
  rejected in one 2*batch_size forward pass.
  """
  n = len(prompts)
  if not n or len(chosen) != n or len(rejected) != n:
    raise ValueError(f"dpo_train needs equally many prompts, chosen and rejected (>0), got "
                     f"{n}, {len(chosen)}, {len(rejected)}")
  batch_size, beta = cfg.batch_size, cfg.beta
  model_cfg = trainer.cfg
  seq_len = 8 * -(-max(len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected)) // 8)
  tokens_c, mask_c = batching.pack(prompts, chosen, seq_len, pad_id)
  tokens_r, mask_r = batching.pack(prompts, rejected, seq_len, pad_id)

  # The reference is frozen: its sequence log-probs once.
  ref_fn = trainer.make_eval(lambda p, b: sequence_logp(model_cfg, p, b["tokens"], b["mask"]))
  ref_c = in_chunks(ref_fn, ref_params, {"tokens": tokens_c, "mask": mask_c}, batch_size)
  ref_r = in_chunks(ref_fn, ref_params, {"tokens": tokens_r, "mask": mask_r}, batch_size)

  def loss_fn(params, batch):
    seq_2B = sequence_logp(model_cfg, params, batch["tokens"], batch["mask"])
    return losses.dpo_loss(seq_2B[:batch_size], seq_2B[batch_size:], batch["ref_c"], batch["ref_r"], beta)

  def batch_fn(idx):
    return {"tokens": np.concatenate([tokens_c[idx], tokens_r[idx]]),
            "mask": np.concatenate([mask_c[idx], mask_r[idx]]), "ref_c": ref_c[idx], "ref_r": ref_r[idx]}

  optimizer = sft.sft_optimizer(cfg.learning_rate, cfg.steps, cfg.warmup_steps)
  return train_steps(trainer, params, loss_fn, optimizer, batch_fn, n, steps=cfg.steps, batch_size=batch_size,
                     seed=seed, logger=logger, log_every=log_every, show=("loss", "reward_accuracy", "margin_mean"))
