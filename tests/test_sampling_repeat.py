"""Repeat detection: the on-device n-gram counter against the plain definition, and a looping model stopped by it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k15 import models, sampling
from k15.sampling.repeat import find_repeat, newest_ngram_count


def test_find_repeat_by_hand():
  assert find_repeat([1, 2, 1, 2, 1, 2], 2, 3) == 6  # (1,2) at ends 2, 4, 6
  assert find_repeat([7, 7, 7, 7], 2, 3) == 4  # overlapping occurrences count
  assert find_repeat([1, 2, 3, 4, 5], 1, 2) is None
  assert find_repeat([1, 2], 3, 1) is None


@pytest.mark.parametrize("ngram,count", [(1, 4), (2, 3), (3, 2), (4, 3)])
def test_device_counter_matches_definition(ngram, count):
  rng = np.random.RandomState(ngram)
  B, S = 48, 40
  vocab = rng.choice([2, 3, 8, 64], (B, 1))  # small vocabularies repeat, large ones mostly not
  hist = (rng.randint(0, 1 << 20, (B, S)) % vocab).astype(np.int32)
  starts = rng.randint(0, 6, B).astype(np.int32)  # the prompt's n-grams must not count
  counts_fn = jax.jit(jax.vmap(lambda end: newest_ngram_count(jnp.asarray(hist), jnp.asarray(starts),
                                                              jnp.full((B,), end), ngram)))
  counts_ExB = np.asarray(counts_fn(jnp.arange(1, S + 1)))
  stopped = 0
  for b in range(B):
    hits = np.nonzero(counts_ExB[:, b] >= count)[0]
    device_stop = hits[0] + 1 - starts[b] if len(hits) else None  # response tokens when the detector fires
    assert device_stop == find_repeat(hist[b, starts[b]:].tolist(), ngram, count)
    stopped += device_stop is not None
  assert 0 < stopped < B  # both outcomes occur, so the comparison means something


def _looping_model():
  """Greedy maps token t to CYCLE[t]: no attention or MLP output, orthogonal embeddings, permuted lm_head."""
  cfg = models.ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.1, a.shape), a.dtype), models.abstract_params(cfg))
  embed = np.linalg.qr(rng.randn(32, 32))[0][:16] * 4.0
  nxt = np.ones(16, np.int64)  # every token leads into the loop 1 -> 2 -> 3 -> 1
  nxt[[1, 2, 3]] = [2, 3, 1]
  lm_head = np.zeros((32, 16), np.float32)
  for t in range(16):
    lm_head[:, nxt[t]] += embed[t]
  params["embed"]["embedding"] = jnp.asarray(embed, jnp.float32)
  params["lm_head"]["kernel"] = jnp.asarray(lm_head)
  params["final_norm"]["scale"] = jnp.ones_like(params["final_norm"]["scale"])
  params["layers"]["attn"]["o_kernel"] = jnp.zeros_like(params["layers"]["attn"]["o_kernel"])
  params["layers"]["mlp"]["down"]["kernel"] = jnp.zeros_like(params["layers"]["mlp"]["down"]["kernel"])
  return cfg, params


def test_looping_trajectory_ends_with_repeat():
  cfg, params = _looping_model()
  prompt = [5, 1, 2, 3, 1, 2, 3, 9]  # the loop already appears in the prompt: it must not count
  scfg = sampling.SamplingConfig(greedy=True, max_new_tokens=30, chunk_size=4, max_length=64, repeat_ngram=3,
                                 repeat_count=3)
  looped = sampling.generate(cfg, params, [prompt], scfg, jax.random.key(0))[0]
  assert looped.finish_reason == "repeat"
  np.testing.assert_array_equal(looped.response_tokens, [1, 2, 3] * 3)  # the rigged loop, as built
  assert find_repeat([1, 2, 3] * 10, 3, 3) == 9  # where the definition stops it (max_new_tokens is 30)
