"""config.rl fields shared by every experiment config."""


def k15_loss() -> dict:
  """config.rl's loss and optimizer fields that every job shares: the k1.5 loss as RECIPE.md section 1 has it."""
  return dict(
      adam_eps=1e-8,
      max_grad_norm=1.0,  # global-norm clipping before the optimizer
      reset_optimizer=True,  # fresh optimizer state at each iteration start
      loss="k15",  # k15 | reinforce | grpo | rest
      tau=0.1,  # KL weight towards the start-of-iteration policy
      log_ratio="sequence",  # sequence (the report) | token (public reimplementations)
      baseline="mean",  # mean | logmeanexp
      form="gradient",  # gradient (eq. 3) | squared (the surrogate)
      mask_old_segments=True,  # older partial-rollout segments are context only
  )
