"""Temperature / top-k / top-p draw from the right distribution: empirical frequencies against the hand-computed one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from k15 import sampling
from k15.sampling.select import first_argmax

LOGITS_V = np.random.RandomState(0).randn(12).astype(np.float32) * 1.5
DRAWS = 40_000


def expected_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
  """The tempered, truncated, renormalized distribution, computed directly from its definition."""
  z = logits.astype(np.float64) / temperature
  order = np.argsort(-z, kind="stable")
  keep = np.zeros(len(z), bool)
  keep[order[:top_k] if top_k else order] = True
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  if top_p < 1.0:
    mass = 0.0
    for i in order:  # most likely first; keep until the kept mass reaches top_p
      if not keep[i]:
        continue
      if mass >= top_p:
        keep[i] = False
      mass += p[i]
    p = np.where(keep, p, 0.0)
    p /= p.sum()
  return p


def draw(scfg, n=DRAWS, seed=0):
  keys = jax.random.split(jax.random.key(seed), n)
  logits = jnp.broadcast_to(jnp.asarray(LOGITS_V), (n, len(LOGITS_V)))
  tokens = jax.jit(sampling.select_tokens, static_argnums=2)(logits, keys, scfg)
  return np.bincount(np.asarray(tokens), minlength=len(LOGITS_V))


def chi2_pvalue(counts, probs):
  support = probs > 0
  return stats.chisquare(counts[support], probs[support] * counts.sum()).pvalue


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.6, 0, 1.0), (1.5, 4, 1.0), (1.0, 0, 0.7), (0.8, 6, 0.8)])
def test_sampled_frequencies_match_the_truncated_tempered_distribution(temperature, top_k, top_p):
  scfg = sampling.SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
  probs = expected_probs(LOGITS_V, temperature, top_k, top_p)
  counts = draw(scfg)
  assert counts[probs == 0].sum() == 0, "a truncated token was sampled"
  assert chi2_pvalue(counts, probs) > 1e-3
  assert 0.5 * np.abs(counts / DRAWS - probs).sum() < 0.015  # total variation
  # The test can tell the difference: the plain softmax does not fit these draws.
  assert chi2_pvalue(counts, expected_probs(LOGITS_V)) < 1e-6 or (counts[expected_probs(LOGITS_V) > 0] == 0).any()


def test_expected_probs_agree_with_transformers_warpers():
  """The hand-computed reference against transformers' logits warpers (a peer definition of top-k / top-p)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  for temperature, top_k, top_p in [(1.5, 4, 1.0), (1.0, 0, 0.7), (0.8, 6, 0.8)]:
    scores = torch.tensor(LOGITS_V)[None] / temperature
    if top_k:
      scores = transformers.TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
      scores = transformers.TopPLogitsWarper(top_p)(None, scores)
    hf = torch.softmax(scores, -1)[0].double().numpy()
    np.testing.assert_allclose(expected_probs(LOGITS_V, temperature, top_k, top_p), hf, atol=1e-6)


def test_greedy_is_argmax_and_draws_depend_on_the_key():
  logits = jnp.asarray(np.random.RandomState(1).randn(5, 12), jnp.float32)
  keys = jax.random.split(jax.random.key(0), 5)
  greedy = sampling.select_tokens(logits, keys, sampling.SamplingConfig(greedy=True))
  np.testing.assert_array_equal(greedy, np.argmax(logits, -1))
  assert not np.array_equal(draw(sampling.SamplingConfig(), 64, seed=0), draw(sampling.SamplingConfig(), 64, seed=1))


def test_first_argmax_is_numpys_argmax():
  """The two-reduction argmax the sampler uses: numpy's index, ties (the first wins) and an all -inf row included."""
  x = np.random.RandomState(1).randn(64, 1000).astype(np.float32)
  x[3, [700, 9, 500]] = x[3].max() + 1
  x[5] = -np.inf
  np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), np.argmax(x, axis=-1))


def test_plain_temperature_draws_are_jax_categoricals():
  """Temperature sampling takes jax.random.categorical's own Gumbel draws: the same tokens for the same keys."""
  keys = jax.random.split(jax.random.key(3), 256)
  logits = jax.random.normal(jax.random.key(4), (256, 300)) * 3
  tokens = sampling.select_tokens(logits, keys, sampling.SamplingConfig(temperature=1.0))
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(jax.vmap(jax.random.categorical)(keys, logits)))
