"""Supervised fine-tuning on (prompt, response) token pairs: the long-CoT warm-up (RECIPE.md section 6).

Also used by long2short (shortest rejection sampling) and ReST-style baselines.
"""
from typing import Optional, Sequence

import numpy as np
import optax

from k15 import models
from k15.rl import batching, losses
from k15.rl.metrics import MetricsLogger
from k15.rl.trainer import Trainer


def sft_optimizer(learning_rate: float, steps: int, warmup_steps: int):
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, warmup_steps), max(steps, warmup_steps + 1),
                                                end_value=learning_rate * 0.1)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))


def sft_train(trainer: Trainer, params, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
              steps: int, batch_size: int, learning_rate: float, warmup_steps: int, pad_id: int, seed: int,
              logger: Optional[MetricsLogger] = None, log_every: int = 50):
  """Trains on response tokens (prompt tokens masked out); returns the new params."""
  cfg = trainer.cfg
  seq_len = 8 * -(-max(len(p) + len(r) for p, r in zip(prompts, responses)) // 8)  # one compile, rounded up

  def loss_fn(params, batch):
    logp = models.token_logprobs(cfg, params, batch["tokens"])
    return losses.sft_loss(logp, batch["mask"])

  optimizer = sft_optimizer(learning_rate, steps, warmup_steps)
  step_fn = trainer.make_step(loss_fn, optimizer)
  opt_state = trainer.init_opt_state(optimizer, params)
  rng = np.random.default_rng(seed)
  for step in range(1, steps + 1):
    idx = rng.choice(len(prompts), size=batch_size, replace=len(prompts) < batch_size)
    tokens, mask = batching.pack([prompts[i] for i in idx], [responses[i] for i in idx], seq_len, pad_id)
    params, opt_state, metrics = step_fn(params, opt_state, {"tokens": tokens, "mask": mask})
    if logger is not None and (step % log_every == 0 or step == steps):
      logger.write(step, {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}, show=("loss",))
  return params
