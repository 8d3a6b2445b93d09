"""Supervised fine-tuning on (prompt, response) token pairs: the long-CoT warm-up (RECIPE.md section 6).

Also used by long2short (short-CoT SFT, shortest rejection sampling).
"""
from typing import Optional, Sequence

import optax

from k15 import models
from k15.config import SFTConfig
from k15.rl import batching, losses
from k15.rl.trainer import Trainer, train_steps


def sft_optimizer(learning_rate: float, steps: int, warmup_steps: int):
  """AdamW on a warm-up + cosine schedule to lr/10, after global-norm clipping at 1 (SFT and DPO)."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, warmup_steps), max(steps, warmup_steps + 1),
                                                end_value=learning_rate * 0.1)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))


def sft_train(trainer: Trainer, params, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
              cfg: SFTConfig, *, pad_id: int, seed: int, logger=None, log_every: int = 50,
              weights: Optional[Sequence[Sequence[float]]] = None):
  """cfg.steps steps on response tokens (prompt tokens masked out); returns the new params (params are donated).

  weights: a loss weight per response token (default 1); the loss is the weighted mean over the batch's tokens.
  """
  model_cfg = trainer.cfg
  seq_len = 8 * -(-max(len(p) + len(r) for p, r in zip(prompts, responses)) // 8)  # one compile, rounded up

  def loss_fn(params, batch):
    return losses.sft_loss(models.token_logprobs(model_cfg, params, batch["tokens"]), batch["mask"])

  def batch_fn(idx):
    tokens, mask = batching.pack([prompts[i] for i in idx], [responses[i] for i in idx], seq_len, pad_id)
    if weights is not None:  # pack's mask frame: response token j of row b weighs at len(prompt) - 1 + j
      for b, i in enumerate(idx):
        mask[b, len(prompts[i]) - 1:len(prompts[i]) - 1 + len(responses[i])] = weights[i]
    return {"tokens": tokens, "mask": mask}

  optimizer = sft_optimizer(cfg.learning_rate, cfg.steps, cfg.warmup_steps)
  return train_steps(trainer, params, loss_fn, optimizer, batch_fn, len(prompts), steps=cfg.steps,
                     batch_size=cfg.batch_size, seed=seed, logger=logger, log_every=log_every)
