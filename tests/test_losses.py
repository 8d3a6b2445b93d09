"""Losses against independent truth: report eq. 3 term by term, hand-worked numbers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from k15.models import ModelConfig, init_params, token_logprobs
from k15.rl import losses

P, G, T, V = 2, 3, 4, 5
TAU = 0.3


def _toy_logp(params, tokens_BxT1):
  """A bigram softmax policy: log p(tok_{t+1} | tok_t) = log_softmax(W[tok_t] + b)[tok_{t+1}]."""
  logits = params["W"][tokens_BxT1[:, :-1]] + params["b"]
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, tokens_BxT1[:, 1:, None], axis=-1)[..., 0]


def _toy_batch():
  rng = np.random.default_rng(0)
  params = {"W": jnp.asarray(rng.normal(size=(V, V)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(V,)), jnp.float32)}
  ref_params = jax.tree.map(lambda x: x + 0.3 * jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
  tokens = jnp.asarray(rng.integers(0, V, size=(P * G, T + 1)), jnp.int32)
  mask = jnp.asarray([[0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1], [0, 1, 1, 1]],
                     jnp.float32)
  rewards = jnp.asarray([1.0, 0.0, 1.2, 0.0, 0.0, 0.7], jnp.float32)
  return params, ref_params, tokens, mask, rewards


def _eq3_direction(params, ref_params, tokens, mask, rewards, log_ratio):
  """Report eq. 3, averaged over prompts, built from one jax.grad per sample and per term."""
  ref_logp = _toy_logp(ref_params, tokens)

  @jax.jit
  def sample_grads(prm, tokens_1xT1, mask_T, ref_T):
    seq_logp = lambda q: jnp.sum(_toy_logp(q, tokens_1xT1)[0] * mask_T)
    delta = lambda q: _toy_logp(q, tokens_1xT1)[0] - ref_T
    if log_ratio == "sequence":
      sq_ratio = lambda q: jnp.sum(delta(q) * mask_T)**2
    else:
      sq_ratio = lambda q: jnp.sum(delta(q)**2 * mask_T)
    return jax.grad(seq_logp)(prm), jax.grad(sq_ratio)(prm)

  r = np.asarray(rewards).reshape(P, G)
  total = jax.tree.map(jnp.zeros_like, params)
  for p in range(P):
    rbar = sum(r[p]) / G
    for j in range(G):
      b = p * G + j
      g_lp, g_sq = sample_grads(params, tokens[b:b + 1], mask[b], ref_logp[b])
      term = jax.tree.map(lambda a, c: a * (r[p, j] - rbar) - TAU / 2 * c, g_lp, g_sq)
      total = jax.tree.map(lambda t, x: t + x / G, total, term)
  return jax.tree.map(lambda t: t / P, total)


def _assert_tree_close(a, b, **kw):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


@pytest.mark.parametrize("log_ratio", ["sequence", "token"])
def test_k15_gradient_form_is_minus_eq3(log_ratio):
  params, ref_params, tokens, mask, rewards = _toy_batch()
  ref_logp = _toy_logp(ref_params, tokens)
  g = _eq3_direction(params, ref_params, tokens, mask, rewards, log_ratio)

  def loss_fn(prm, form):
    return losses.k15_loss(_toy_logp(prm, tokens), ref_logp, mask, rewards, G, TAU, log_ratio=log_ratio,
                           form=form)[0]

  grad_fn = jax.jit(jax.grad(loss_fn), static_argnums=1)
  grad = grad_fn(params, "gradient")
  _assert_tree_close(grad, jax.tree.map(lambda x: -x, g), rtol=1e-5, atol=1e-6)
  grad_sq = grad_fn(params, "squared")
  _assert_tree_close(grad_sq, jax.tree.map(lambda x: -2 * TAU * x, g), rtol=1e-5, atol=1e-6)
  # The tau-term matters here (policy != ref): the REINFORCE gradient alone is different.
  grad_tau0 = jax.jit(jax.grad(
      lambda prm: losses.k15_loss(_toy_logp(prm, tokens), ref_logp, mask, rewards, G, 0.0)[0]))(params)
  assert np.abs(np.asarray(grad["W"] - grad_tau0["W"])).max() > 1e-3


def test_k15_values_by_hand():
  # One prompt, G = 2, one masked token each, so sequence and token log-ratios coincide.
  logp = jnp.asarray([[-1.0, -0.5], [-2.0, -9.0]])
  ref = jnp.asarray([[-1.2, -7.0], [-1.5, -9.0]])
  mask = jnp.asarray([[1.0, 0.0], [1.0, 0.0]])
  rewards = jnp.asarray([1.0, 0.0])
  tau = 0.5
  # A = [0.5, -0.5]; seq logp = [-1, -2]; d = [0.2, -0.5].
  policy = (-0.5 * -1.0 + 0.5 * -2.0) / 2  # -0.25
  kl = (tau / 2 * 0.04 + tau / 2 * 0.25) / 2  # 0.03625
  for log_ratio in ("sequence", "token"):
    loss, m = losses.k15_loss(logp, ref, mask, rewards, 2, tau, log_ratio=log_ratio)
    np.testing.assert_allclose(loss, policy + kl, rtol=1e-6)
    np.testing.assert_allclose(m["policy_term"], policy, rtol=1e-6)
    np.testing.assert_allclose(m["kl_term"], kl, rtol=1e-6)
    sq, _ = losses.k15_loss(logp, ref, mask, rewards, 2, tau, log_ratio=log_ratio, form="squared")
    np.testing.assert_allclose(sq, ((0.5 - tau * 0.2)**2 + (-0.5 - tau * -0.5)**2) / 2, rtol=1e-6)


def test_sequence_and_token_log_ratio_differ_by_cross_terms():
  # Per-token deltas [0.1, 0.2] and [0.3, -0.3]: sequence squares 0.09 and 0.0, token squares 0.05 and 0.18.
  ref = jnp.zeros((2, 2))
  logp = jnp.asarray([[0.1, 0.2], [0.3, -0.3]])
  mask = jnp.ones((2, 2))
  rewards = jnp.zeros(2)  # A = 0: only the tau-term is left
  tau = 2.0
  seq, ms = losses.k15_loss(logp, ref, mask, rewards, 2, tau, log_ratio="sequence")
  tok, mt = losses.k15_loss(logp, ref, mask, rewards, 2, tau, log_ratio="token")
  np.testing.assert_allclose(seq, tau / 2 * (0.09 + 0.0) / 2, rtol=1e-5)
  np.testing.assert_allclose(tok, tau / 2 * (0.05 + 0.18) / 2, rtol=1e-5)
  np.testing.assert_allclose(ms["log_ratio_sq_mean"], 0.045, rtol=1e-5)
  np.testing.assert_allclose(mt["log_ratio_sq_mean"], 0.115, rtol=1e-5)
  # Squared form, A = 0: sequence (tau*d)^2 -> tau^2 * 0.045; token swaps d^2 for q -> tau^2 * 0.115.
  sq_seq, _ = losses.k15_loss(logp, ref, mask, rewards, 2, tau, log_ratio="sequence", form="squared")
  sq_tok, _ = losses.k15_loss(logp, ref, mask, rewards, 2, tau, log_ratio="token", form="squared")
  np.testing.assert_allclose(sq_seq, tau**2 * 0.045, rtol=1e-5)
  np.testing.assert_allclose(sq_tok, tau**2 * 0.115, rtol=1e-5)


def test_logmeanexp_baseline_by_hand():
  rewards = jnp.asarray([1.0, 0.0, 0.0, 0.0])
  tau = 0.5
  b = tau * math.log((math.exp(2.0) + 1.0) / 2)
  np.testing.assert_allclose(losses.group_baseline(rewards, 2, "logmeanexp", tau), [b, b, 0.0, 0.0], rtol=1e-6)
  logp = jnp.asarray([[-1.0], [-2.0], [-3.0], [-4.0]])
  loss, m = losses.k15_loss(logp, logp, jnp.ones((4, 1)), rewards, 2, tau, baseline="logmeanexp")
  np.testing.assert_allclose(loss, -((1 - b) * -1.0 + (0 - b) * -2.0) / 4, rtol=1e-6)
  np.testing.assert_allclose(m["advantage_mean"], (1 - 2 * b) / 4, rtol=1e-6)


def test_k15_rejects_bad_options():
  x = jnp.zeros((4, 2))
  with pytest.raises(ValueError, match="multiple of group_size=3"):
    losses.k15_loss(x, x, x, jnp.zeros(4), 3, 0.1)
  with pytest.raises(ValueError, match="'sequence', 'token'"):
    losses.k15_loss(x, x, x, jnp.zeros(4), 2, 0.1, log_ratio="seq")
  with pytest.raises(ValueError, match="logmeanexp"):
    losses.k15_loss(x, x, x, jnp.zeros(4), 2, 0.1, baseline="max")


def test_tau_term_gradient_with_real_model():
  cfg = ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)
  params = init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 7), 0, 32)
  mask = jnp.asarray([[0, 0, 1, 1, 1, 1]] * 4, jnp.float32)  # two prompt tokens, four response tokens
  rewards = jnp.asarray([1.0, 0.0, 0.0, 1.0])  # G = 2: advantages [0.5, -0.5, -0.5, 0.5]
  adv = np.asarray([0.5, -0.5, -0.5, 0.5])
  tau = 0.5

  @jax.jit
  def grads(prm, ref_logp, rewards, coeffs_B):
    """Token log-probs, the loss gradient and sum_j coeffs_j * grad logp(y_j), the eq. 3 sum with hand coefficients."""
    seq_logp = lambda q: jnp.sum(token_logprobs(cfg, q, tokens) * mask, axis=1)
    loss_fn = lambda q: losses.k15_loss(token_logprobs(cfg, q, tokens), ref_logp, mask, rewards, 2, tau)[0]
    return token_logprobs(cfg, prm, tokens), jax.grad(loss_fn)(prm), jax.vjp(seq_logp, prm)[1](coeffs_B)[0]

  max_abs = lambda tree: max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree))
  no_coeffs = jnp.zeros(4)
  ref_logp, _, _ = grads(params, jnp.zeros_like(mask), rewards, no_coeffs)  # the policy before the step
  # Policy == reference: d_j = 0, so the tau-term (the loss with all advantages 0) has zero gradient
  # (up to float noise between two passes), and the full gradient is the REINFORCE part -(1/B) sum_j A_j grad logp_j.
  assert max_abs(grads(params, ref_logp, jnp.zeros(4), no_coeffs)[1]) < 1e-6
  _, grad_full, expected = grads(params, ref_logp, rewards, jnp.asarray(-adv / 4, jnp.float32))
  _assert_tree_close(grad_full, expected, rtol=2e-4, atol=1e-6)

  opt = optax.sgd(1.0)
  updates, _ = opt.update(grad_full, opt.init(params), params)
  new_params = optax.apply_updates(params, updates)
  # After the step the tau-term does not vanish: by the chain rule its gradient is (tau/B) sum_j d_j grad logp_j.
  logp1, _, _ = grads(new_params, ref_logp, rewards, no_coeffs)
  d = np.asarray(jnp.sum((logp1 - ref_logp) * mask, axis=1))
  assert np.abs(d).min() > 1e-3
  _, grad_tau, expected = grads(new_params, ref_logp, jnp.zeros(4), jnp.asarray(tau / 4 * d, jnp.float32))
  assert max_abs(grad_tau) > 1e-4
  _assert_tree_close(grad_tau, expected, rtol=2e-4, atol=1e-6)


def test_reinforce_by_hand():
  logp = jnp.asarray([[-1.0, -1.0], [-3.0, 0.0], [-0.5, 0.0], [-2.0, 0.0]])
  mask = jnp.asarray([[1, 1], [1, 0], [1, 0], [1, 0]], jnp.float32)
  rewards = jnp.asarray([1.0, 0.0, 0.0, 1.0])  # A = [0.5, -0.5, -0.5, 0.5]
  loss, _ = losses.reinforce_loss(logp, None, mask, rewards, 2)
  np.testing.assert_allclose(loss, -(0.5 * -2.0 - 0.5 * -3.0 - 0.5 * -0.5 + 0.5 * -2.0) / 4, rtol=1e-6)


def test_grpo_clip_by_hand():
  # One prompt, rewards [1, 0]: mean 0.5, population std 0.5, so A = [+1, -1] with std_eps = 0.
  old = jnp.zeros((2, 3))
  logp = jnp.asarray([[0.5, -0.5, 3.0], [0.5, -0.5, 3.0]])  # ratios e^0.5, e^-0.5; the third token is masked
  mask = jnp.asarray([[1, 1, 0], [1, 1, 0]], jnp.float32)
  rewards = jnp.asarray([1.0, 0.0])
  hi, lo = math.exp(0.5), math.exp(-0.5)
  # A=+1: min(hi, 1.2) = 1.2 (clipped), min(lo, 0.8) = lo.  A=-1: min(-hi, -1.2) = -hi, min(-lo, -0.8) = -0.8 (clipped).
  expected = -(1.2 + lo - hi - 0.8) / 4
  fn = lambda lp: losses.grpo_loss(lp, old, mask, rewards, 2, clip_eps=0.2, std_eps=0.0)
  loss, m = fn(logp)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(m["clip_fraction"], 0.5)
  grad = jax.grad(lambda lp: fn(lp)[0])(logp)
  # Clipped and masked tokens get no gradient; the others d(-A*ratio/4)/dlogp = -A*ratio/4.
  np.testing.assert_allclose(grad, [[0.0, -lo / 4, 0.0], [hi / 4, 0.0, 0.0]], rtol=1e-6)


def test_rest_keeps_only_rewarded_samples():
  logp = jnp.asarray([[-1.0, -2.0], [-5.0, -5.0], [-3.0, -7.0], [-6.0, -6.0]])
  mask = jnp.asarray([[1, 1], [1, 1], [1, 0], [1, 1]], jnp.float32)
  rewards = jnp.asarray([1.0, 0.0, 1.2, 0.3])  # rows 0 and 2 pass threshold 0.5
  loss, m = losses.rest_loss(logp, None, mask, rewards, 2)
  np.testing.assert_allclose(loss, (1.0 + 2.0 + 3.0) / 3, rtol=1e-6)
  np.testing.assert_allclose(m["kept_fraction"], 0.5)
  none, _ = losses.rest_loss(logp, None, mask, jnp.zeros(4), 2)
  assert float(none) == 0.0


def test_sft_from_logp_and_logits():
  logp = jnp.asarray([[-1.0, -2.0, -100.0]])
  loss, m = losses.sft_loss(logp, jnp.asarray([[1.0, 1.0, 0.0]]))
  np.testing.assert_allclose(loss, 1.5)
  assert int(m["num_tokens"]) == 2
  # softmax([0, log 3]) = [1/4, 3/4].
  logits = jnp.asarray([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
  loss, _ = losses.sft_loss(logits, jnp.ones((1, 2)), jnp.asarray([[1, 0]]))
  np.testing.assert_allclose(loss, (-math.log(0.75) - math.log(0.25)) / 2, rtol=1e-6)
  with pytest.raises(ValueError, match="targets"):
    losses.sft_loss(logits, jnp.ones((1, 2)))


def test_dpo_by_hand():
  pc, pr = jnp.asarray([-10.0, -5.0]), jnp.asarray([-12.0, -4.0])
  rc, rr = jnp.asarray([-11.0, -5.0]), jnp.asarray([-11.0, -6.0])
  beta = 0.1
  # Margins: 0.1*((1) - (-1)) = 0.2 and 0.1*((0) - (2)) = -0.2; -log sigmoid(x) = log(1 + e^-x).
  expected = (math.log1p(math.exp(-0.2)) + math.log1p(math.exp(0.2))) / 2
  loss, m = losses.dpo_loss(pc, pr, rc, rr, beta)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(m["reward_accuracy"], 0.5)
  # Only the policy terms carry gradient: d/dpc = -beta * sigmoid(-margin) / n.
  g = jax.grad(lambda a, b: losses.dpo_loss(pc, pr, a, b, beta)[0], argnums=(0, 1))(rc, rr)
  assert not np.any(np.asarray(g[0])) and not np.any(np.asarray(g[1]))
  gpc = jax.grad(lambda a: losses.dpo_loss(a, pr, rc, rr, beta)[0])(pc)
  sig = lambda x: 1 / (1 + math.exp(-x))
  np.testing.assert_allclose(gpc, [-beta * sig(-0.2) / 2, -beta * sig(0.2) / 2], rtol=1e-6)


def test_registry_dispatch_and_unknown_name():
  params, ref_params, tokens, mask, rewards = _toy_batch()
  logp, ref = _toy_logp(params, tokens), _toy_logp(ref_params, tokens)
  direct, _ = losses.k15_loss(logp, ref, mask, rewards, G, TAU, log_ratio="token")
  via, _ = losses.policy_loss("k15", logp, ref, mask, rewards, G, tau=TAU, log_ratio="token")
  assert float(direct) == float(via)
  for name in ("reinforce", "grpo", "rest"):
    loss, metrics = losses.policy_loss(name, logp, ref, mask, rewards, G)
    assert np.isfinite(float(loss)) and "loss" in metrics
  with pytest.raises(ValueError, match=r"unknown policy loss 'ppo'.*\['grpo', 'k15', 'reinforce', 'rest'\]"):
    losses.policy_loss("ppo", logp, ref, mask, rewards, G)


@pytest.mark.parametrize("name,options", [("k15", {"tau": TAU}), ("k15", {"tau": TAU, "form": "squared"}),
                                          ("reinforce", {}), ("grpo", {}), ("rest", {"threshold": 0.5})])
def test_weight_zero_groups_change_nothing(name, options):
  # Padding with a whole weight-0 group must give the loss and gradient of the unpadded batch, even when the
  # padded rows hold non-zero log-probs, mask and rewards.
  params, ref_params, tokens, mask, rewards = _toy_batch()
  ref = _toy_logp(ref_params, tokens)
  pad = lambda x, fill: jnp.concatenate([x, jnp.full((G,) + x.shape[1:], fill, x.dtype)])
  weights = jnp.asarray([1.0] * (P * G) + [0.0] * G)

  def both(prm):
    plain = losses.policy_loss(name, _toy_logp(prm, tokens), ref, mask, rewards, G, **options)[0]
    padded = losses.policy_loss(name, pad(_toy_logp(prm, tokens), -0.7), pad(ref, -2.0), pad(mask, 1.0),
                                pad(rewards, 1.0), G, sample_weights_B=weights, **options)[0]
    return plain, padded

  (plain, padded), (g_plain, g_padded) = jax.jit(lambda prm: (both(prm), (
      jax.grad(lambda q: both(q)[0])(prm), jax.grad(lambda q: both(q)[1])(prm))))(params)
  np.testing.assert_allclose(padded, plain, rtol=1e-6)
  _assert_tree_close(g_padded, g_plain, rtol=1e-5, atol=1e-7)
  assert abs(float(plain)) > 1e-3
