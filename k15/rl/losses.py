"""Policy losses over per-token arrays: the k1.5 mirror-descent loss and its ablations.

Shapes: B, T as in k15.models.config; in k15.rl, P is prompts and G the group size (samples per prompt, the
report's k; not the attention G). B = P * G and the G samples of each prompt are CONTIGUOUS: rows p*G .. p*G+G-1
belong to prompt p.

Inputs shared by the policy losses:
  logp_BxT      log-probs of the response tokens under the policy being trained (differentiated).
  ref_logp_BxT  log-probs under pi_i, the policy that sampled them (the iteration's reference); a constant.
  mask_BxT      1 on tokens that count (response tokens of the current segment), 0 elsewhere.
  rewards_B     total reward per sample (verifier + length penalty + repeat penalty); a constant.
  sample_weights_B  optional per-sample weights (default all 1): a sample's share of the mean over samples. Meant
                for padding a batch with whole weight-0 groups; group baselines ignore it.

Every loss is minimized and returns (scalar loss, metrics dict of scalars).
"""
from typing import Callable

import jax
import jax.numpy as jnp

_sg = jax.lax.stop_gradient


def masked_sum(x_BxT, mask_BxT):
  """sum_t mask*x per row: with per-token log-probs, the sequence log-probability of the masked tokens.

  where, not multiply alone: -inf log-probs on padding would turn 0 * -inf into nan.
  """
  return jnp.sum(jnp.where(mask_BxT > 0, x_BxT * mask_BxT, 0.0), axis=-1)


def _weights(sample_weights_B, rewards_B):
  if sample_weights_B is None:
    return jnp.ones(rewards_B.shape, jnp.float32)
  return _sg(jnp.asarray(sample_weights_B, jnp.float32))


def _wmean(x_B, w_B):
  # Every weight 0 (an all-padding batch) gives 0, not nan.
  return jnp.sum(w_B * x_B) / jnp.maximum(jnp.sum(w_B), 1e-12)


def _groups(x_B, group_size):
  (B,) = x_B.shape
  if group_size <= 0 or B % group_size:
    raise ValueError(f"batch size {B} is not a multiple of group_size={group_size}")
  return x_B.reshape(B // group_size, group_size)


def group_baseline(rewards_B, group_size, kind="mean", tau=1.0):
  """Per-sample estimate of tau*log Z of its prompt's group, shape B.

  "mean": the group's mean reward (the report's default). "logmeanexp": tau*log(mean_j exp(r_j/tau)), the
  Monte-Carlo estimate of tau*log Z for pi* = pi_i*exp(r/tau)/Z.
  """
  r_PxG = _groups(rewards_B, group_size)
  if kind == "mean":
    b_P = jnp.mean(r_PxG, axis=1)
  elif kind == "logmeanexp":
    b_P = tau * (jax.nn.logsumexp(r_PxG / tau, axis=1) - jnp.log(group_size))
  else:
    raise ValueError(f"unknown baseline {kind!r}; valid: 'mean', 'logmeanexp'")
  return jnp.repeat(b_P, group_size)


def k15_loss(logp_BxT, ref_logp_BxT, mask_BxT, rewards_B, group_size, tau, *,
             log_ratio="sequence", baseline="mean", form="gradient", sample_weights_B=None):
  """The k1.5 online-mirror-descent loss (RECIPE.md section 1, report eq. 3).

  With logp_j the masked sequence log-prob of sample j, d_j = logp_j - logp_i(y_j) its log-ratio to the reference,
  A_j = stop_grad(r_j - b_j) and b_j the group baseline (`group_baseline`):

    form="gradient":  mean_j [ -A_j * logp_j + (tau/2) * q_j ]
    form="squared":   mean_j [ (A_j - tau*d_j)^2 + tau^2 * (q_j - d_j^2) ]

  where the mean runs over all B samples (= mean over prompts of (1/G) sum over the group; weighted by
  sample_weights_B when given) and q_j is the squared log-ratio:
    log_ratio="sequence":  q_j = (sum_t mask*(logp_t - ref_t))^2 = d_j^2        (the report)
    log_ratio="token":     q_j = sum_t mask*(logp_t - ref_t)^2                  (public reimplementations)
  The two agree when a sample has one masked token; otherwise the sequence square also carries the cross terms
  2*sum_{s<t} delta_s*delta_t, so a sample whose per-token ratios cancel has q_j = 0 in the sequence form only.
  In the squared form with log_ratio="sequence" the correction term is exactly 0, leaving the report's surrogate
  (r_j - b_j - tau*d_j)^2; with "token" it swaps d_j^2 for q_j so both forms share one direction.

  Sign and normalization: with g = mean over prompts of the report's per-prompt
    g_p = (1/G) sum_j [ grad logp_j * A_j - (tau/2) * grad q_j ],
  grad(loss) = -g for form="gradient" and grad(loss) = -2*tau*g for form="squared". At the first step of an
  iteration (policy == reference) d_j = 0, so the tau-term has zero gradient.
  """
  if log_ratio not in ("sequence", "token"):
    raise ValueError(f"unknown log_ratio {log_ratio!r}; valid: 'sequence', 'token'")
  if form not in ("gradient", "squared"):
    raise ValueError(f"unknown form {form!r}; valid: 'gradient', 'squared'")
  rewards_B = _sg(rewards_B.astype(jnp.float32))
  w_B = _weights(sample_weights_B, rewards_B)
  ref_logp_BxT = _sg(ref_logp_BxT)
  seq_logp_B = masked_sum(logp_BxT, mask_BxT)
  delta_BxT = logp_BxT - ref_logp_BxT
  d_B = masked_sum(delta_BxT, mask_BxT)
  q_B = d_B**2 if log_ratio == "sequence" else masked_sum(delta_BxT**2, mask_BxT)
  b_B = group_baseline(rewards_B, group_size, baseline, tau)
  adv_B = _sg(rewards_B - b_B)

  policy_term = _wmean(-adv_B * seq_logp_B, w_B)
  kl_term = _wmean(0.5 * tau * q_B, w_B)
  if form == "gradient":
    loss = policy_term + kl_term
  else:
    loss = _wmean((adv_B - tau * d_B)**2 + tau**2 * (q_B - d_B**2), w_B)
  metrics = {
      "loss": loss,
      "policy_term": policy_term,  # mean -A*logp
      "kl_term": kl_term,  # mean (tau/2)*q
      "log_ratio_mean": _wmean(d_B, w_B),
      "log_ratio_sq_mean": _wmean(q_B, w_B),
      "advantage_mean": _wmean(adv_B, w_B),
      "advantage_abs_mean": _wmean(jnp.abs(adv_B), w_B),
      "baseline_mean": _wmean(b_B, w_B),
      "reward_mean": _wmean(rewards_B, w_B),
      "seq_logp_mean": _wmean(seq_logp_B, w_B),
      "num_tokens": jnp.sum((mask_BxT > 0) & (w_B[:, None] > 0)),
  }
  return loss, metrics


def reinforce_loss(logp_BxT, ref_logp_BxT, mask_BxT, rewards_B, group_size, *, sample_weights_B=None):
  """REINFORCE with the group-mean baseline: mean_j -(r_j - rbar) * logp_j (sequence log-probs).

  The k1.5 loss with tau = 0; ref_logp_BxT is unused (kept for the uniform signature).
  """
  del ref_logp_BxT
  seq_logp_B = masked_sum(logp_BxT, mask_BxT)
  rewards_B = _sg(rewards_B.astype(jnp.float32))
  w_B = _weights(sample_weights_B, rewards_B)
  adv_B = _sg(rewards_B - group_baseline(rewards_B, group_size))
  loss = _wmean(-adv_B * seq_logp_B, w_B)
  return loss, {"loss": loss, "advantage_abs_mean": _wmean(jnp.abs(adv_B), w_B),
                "reward_mean": _wmean(rewards_B, w_B), "seq_logp_mean": _wmean(seq_logp_B, w_B)}


def grpo_loss(logp_BxT, old_logp_BxT, mask_BxT, rewards_B, group_size, *, clip_eps=0.2, std_eps=1e-6,
              sample_weights_B=None):
  """GRPO: PPO-clip on group-normalized advantages, no KL term (beta = 0); old_logp is the sampler's (pi_i).

  A_j = (r_j - mean_G r) / (std_G r + std_eps), std the population std (ddof=0; TRL uses ddof=1).
  Per token: ratio = exp(logp - old_logp), objective min(ratio*A, clip(ratio, 1-eps, 1+eps)*A).
  loss = -(sum of the objective over masked tokens) / (number of masked tokens in the batch); with
  sample_weights_B, each token counts with its sample's weight in both sums.
  """
  rewards_B = _sg(rewards_B.astype(jnp.float32))
  mask_BxT = mask_BxT * _weights(sample_weights_B, rewards_B)[:, None]
  r_PxG = _groups(rewards_B, group_size)
  adv_PxG = (r_PxG - r_PxG.mean(axis=1, keepdims=True)) / (r_PxG.std(axis=1, keepdims=True) + std_eps)
  adv_Bx1 = adv_PxG.reshape(-1, 1)
  ratio_BxT = jnp.exp(logp_BxT - _sg(old_logp_BxT))
  clipped_BxT = jnp.clip(ratio_BxT, 1.0 - clip_eps, 1.0 + clip_eps)
  obj_BxT = jnp.minimum(ratio_BxT * adv_Bx1, clipped_BxT * adv_Bx1)
  n_tokens = jnp.maximum(jnp.sum(mask_BxT), 1e-12)
  loss = -jnp.sum(masked_sum(obj_BxT, mask_BxT)) / n_tokens
  # A token is clipped when the clipped branch is the smaller one (its gradient is then zero).
  is_clipped_BxT = (clipped_BxT * adv_Bx1 < ratio_BxT * adv_Bx1).astype(jnp.float32)
  return loss, {
      "loss": loss,
      "clip_fraction": jnp.sum(masked_sum(is_clipped_BxT, mask_BxT)) / n_tokens,
      "ratio_mean": jnp.sum(masked_sum(ratio_BxT, mask_BxT)) / n_tokens,
      "advantage_abs_mean": jnp.mean(jnp.abs(adv_PxG)),
      "reward_mean": jnp.mean(rewards_B),  # unweighted, like the group statistics
  }


def sft_loss(logp_or_logits, mask_BxT, targets_BxT=None):
  """Mean negative log-likelihood over the masked tokens of the batch.

  Takes per-token log-probs (BxT) or logits (BxTxV, then targets_BxT is required). A fractional mask weights
  its tokens in both sums.
  """
  if logp_or_logits.ndim == 3:
    if targets_BxT is None:
      raise ValueError("sft_loss got logits (BxTxV) but no targets_BxT")
    logp = jax.nn.log_softmax(logp_or_logits.astype(jnp.float32), axis=-1)
    logp_BxT = jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]
  else:
    logp_BxT = logp_or_logits
  loss = -jnp.sum(masked_sum(logp_BxT, mask_BxT)) / jnp.maximum(jnp.sum(mask_BxT), 1e-12)
  return loss, {"loss": loss, "num_tokens": jnp.sum(mask_BxT > 0)}


def rest_loss(logp_BxT, ref_logp_BxT, mask_BxT, rewards_B, group_size, *, threshold=0.5, sample_weights_B=None):
  """ReST / rejection-sampling fine-tuning: SFT on the samples with reward > threshold.

  The default 0.5 keeps exactly the correct samples for {0,1} rewards, and still does with the length penalty
  on while its weight is < 1. Token-mean NLL over the kept samples (tokens weighted by sample_weights_B);
  0 when none is kept.
  """
  del ref_logp_BxT
  _groups(rewards_B, group_size)  # validates the layout only; selection is per sample
  w_B = _weights(sample_weights_B, rewards_B)
  keep_B = (_sg(rewards_B) > threshold).astype(jnp.float32)
  loss, metrics = sft_loss(logp_BxT, mask_BxT * (keep_B * w_B)[:, None])
  metrics["kept_fraction"] = _wmean(keep_B, w_B)
  return loss, metrics


def dpo_loss(policy_chosen_logp_B, policy_rejected_logp_B, ref_chosen_logp_B, ref_rejected_logp_B, beta):
  """DPO over sequence log-probs: mean_b -log sigmoid(beta * ((pc - rc) - (pr - rr))).

  The reference log-probs are constants (the long-CoT model in long2short).
  """
  chosen_B = policy_chosen_logp_B - _sg(ref_chosen_logp_B)
  rejected_B = policy_rejected_logp_B - _sg(ref_rejected_logp_B)
  margin_B = beta * (chosen_B - rejected_B)
  loss = -jnp.mean(jax.nn.log_sigmoid(margin_B))
  return loss, {
      "loss": loss,
      "reward_accuracy": jnp.mean((margin_B > 0).astype(jnp.float32)),
      "margin_mean": jnp.mean(margin_B),
      "chosen_reward_mean": jnp.mean(beta * chosen_B),
      "rejected_reward_mean": jnp.mean(beta * rejected_B),
  }


# Config name -> loss with the uniform signature (logp_BxT, ref_logp_BxT, mask_BxT, rewards_B, group_size, **options).
POLICY_LOSSES: dict[str, Callable] = {
    "k15": k15_loss,
    "reinforce": reinforce_loss,
    "grpo": grpo_loss,
    "rest": rest_loss,
}


def get_policy_loss(name: str) -> Callable:
  """The policy loss registered under `name`; a ValueError lists the valid names."""
  try:
    return POLICY_LOSSES[name]
  except KeyError:
    raise ValueError(f"unknown policy loss {name!r}; valid: {sorted(POLICY_LOSSES)}") from None


def policy_loss(name, logp_BxT, ref_logp_BxT, mask_BxT, rewards_B, group_size, **options):
  """Dispatches to the loss named in the config, e.g. policy_loss("k15", ..., tau=0.1)."""
  return get_policy_loss(name)(logp_BxT, ref_logp_BxT, mask_BxT, rewards_B, group_size, **options)
