"""The sampling loop against peers: transformers' greedy generate, the model's full forward, an uninterrupted run."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from k15 import models, sampling  # noqa: E402

PROMPTS = [[5, 17, 3], [60, 2, 44, 9, 31, 70, 12], [8], [90, 91, 92, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
NEW = 32
GREEDY = sampling.SamplingConfig(greedy=True, max_new_tokens=NEW, chunk_size=7, max_length=64, page_size=8)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  """A random tiny Qwen2 (attention bias, GQA, tied embeddings) saved by transformers, loaded by k15."""
  torch.manual_seed(0)
  hf_cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                    tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6)
  model = transformers.Qwen2ForCausalLM(hf_cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      # Large random weights (norm scales around 1) so greedy outputs are varied, not one token forever.
      p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.3)
  path = str(tmp_path_factory.mktemp("qwen2"))
  model.save_pretrained(path)
  cfg, params = models.load_hf(path)
  return model, cfg, params


# The sampler backends under test: the model's own paged passes, and the native CPU plug-in with float32 FMAs and,
# on AMX tiles with float32's accuracy, bfloat16 pieces (6 products) or int8 slices (9).
BACKENDS = {"model": None, "native": "float32", "amx": "bf16x6", "int8": "int8x9"}


def _backend(name):
  if BACKENDS[name] is None:
    return sampling.ModelBackend()
  from k15.sampling import native  # pylint: disable=g-import-not-at-top
  return native.NativeBackend(BACKENDS[name])


def _require(kernel, request):
  if kernel != "model":
    request.getfixturevalue("needs_native_step")
  if kernel in ("amx", "int8"):
    request.getfixturevalue("needs_amx")


@pytest.fixture(scope="module", params=list(BACKENDS))
def kernel(request):
  """The sampler backend under test (a key of BACKENDS)."""
  _require(request.param, request)
  return request.param


@pytest.fixture(scope="module")
def greedy_run(hf_model, kernel):
  _, cfg, params = hf_model
  return sampling.generate(cfg, params, PROMPTS, GREEDY, jax.random.key(0), num_slots=2, backend=_backend(kernel))


_token_logprobs = jax.jit(models.token_logprobs, static_argnums=0)


def full_logprobs(cfg, params, trajectories):
  """token_logprobs of a full forward over each prompt + response (right-padded: causal, so exact)."""
  tokens = np.zeros((len(trajectories), 64), np.int32)
  for row, t in enumerate(trajectories):
    tokens[row, :len(t.tokens)] = t.tokens
  lp = np.asarray(_token_logprobs(cfg, params, tokens))
  return [lp[row, len(t.prompt_tokens) - 1:len(t.tokens) - 1] for row, t in enumerate(trajectories)]


def _perturbed(params, seed=1, scale=0.3):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_greedy_matches_transformers(hf_model, greedy_run):
  model, _, _ = hf_model
  for prompt, traj in zip(PROMPTS, greedy_run):
    with torch.no_grad():
      ids = torch.tensor([prompt])
      out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                           min_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    expected = out[0, len(prompt):].numpy()
    assert len(set(expected.tolist())) >= 6, "degenerate reference: the test would prove little"
    np.testing.assert_array_equal(traj.response_tokens, expected)
    assert traj.finish_reason == "max_length"
    np.testing.assert_array_equal(traj.prompt_tokens, prompt)


def test_logprobs_match_full_forward(hf_model, greedy_run, kernel):
  _, cfg, params = hf_model
  sampled_cfg = sampling.SamplingConfig(temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=NEW, chunk_size=7,
                                        max_length=64, page_size=8)
  sampled = sampling.generate(cfg, params, PROMPTS, sampled_cfg, jax.random.key(1), num_slots=2,
                              backend=_backend(kernel))
  for run in (greedy_run, sampled):
    for traj, expected in zip(run, full_logprobs(cfg, params, run)):
      # log pi of the raw policy: not the tempered, truncated distribution the token was drawn from
      np.testing.assert_allclose(traj.logprobs, expected, atol=1e-4)
  assert any((t.logprobs < np.log(0.5)).any() for t in sampled)  # really sampled, not argmax


def test_bf16x3_logprobs_are_within_its_bound(hf_model, needs_amx):
  """native_matmul="bf16x3" (16 bits of each matmul operand, 3 products on AMX tiles): its log-probs stay
  within 1.5e-3 of a float32 full forward on this model (up to 1.2e-4 greedy and 5.0e-4 sampled measured), and
  differ from it by more than float32's own rounding (so the test shows the 16-bit path really ran)."""
  _, cfg, params = hf_model
  from k15.sampling import native  # pylint: disable=g-import-not-at-top
  sampled = dataclasses.replace(GREEDY, greedy=False, temperature=0.7, top_k=5)
  deviations = []
  for scfg, key in [(GREEDY, 0), (sampled, 1)]:
    run = sampling.generate(cfg, params, PROMPTS, scfg, jax.random.key(key), num_slots=2,
                            backend=native.NativeBackend("bf16x3"))
    deviations += [np.abs(t.logprobs - e).max() for t, e in zip(run, full_logprobs(cfg, params, run))]
  assert 2e-5 < max(deviations) < 1.5e-3


def test_chunk_size_and_slot_count_do_not_change_results(hf_model, greedy_run, kernel):
  _, cfg, params = hf_model
  backend = _backend(kernel)
  for chunk, num_slots, page_size in [(1, 2, 8), (64, 1, 8), (7, 2, 5)]:
    scfg = sampling.SamplingConfig(greedy=True, max_new_tokens=NEW, chunk_size=chunk, max_length=64,
                                   page_size=page_size)
    run = sampling.generate(cfg, params, PROMPTS, scfg, jax.random.key(0), num_slots=num_slots, backend=backend)
    for a, b in zip(run, greedy_run):
      np.testing.assert_array_equal(a.response_tokens, b.response_tokens)
      np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
  # Sampled runs too: each trajectory's randomness is keyed by (prompt id, sample index, position).
  scfg = sampling.SamplingConfig(temperature=1.0, max_new_tokens=12, chunk_size=5, max_length=64, page_size=8)
  a = sampling.generate(cfg, params, PROMPTS, scfg, jax.random.key(7), num_slots=2, backend=backend)
  b = sampling.generate(cfg, params, PROMPTS, dataclasses.replace(scfg, chunk_size=3), jax.random.key(7), num_slots=1,
                        backend=backend)
  c = sampling.generate(cfg, params, PROMPTS, scfg, jax.random.key(8), num_slots=2, backend=backend)
  assert all(np.array_equal(x.response_tokens, y.response_tokens) for x, y in zip(a, b))
  assert not all(np.array_equal(x.response_tokens, y.response_tokens) for x, y in zip(a, c))


def _run_iterations(engine, params_per_iteration, requests, budget):
  """Runs iterations until the buffer is empty; returns finished trajectories by (prompt id, sample) and stats."""
  buffer, finished, all_stats = sampling.ReplayBuffer(), {}, []
  for it, params in enumerate(params_per_iteration):
    done, stats = engine.run(params, requests if it == 0 else [], buffer, it, budget, jax.random.key(0))
    all_stats.append(stats)
    finished.update({(t.prompt_id, t.sample_index): t for t in done})
    if not len(buffer):
      break
  assert not len(buffer)
  return finished, all_stats


def test_partial_rollouts_resume_equals_uninterrupted(hf_model, greedy_run, kernel):
  _, cfg, params = hf_model
  engine = sampling.RolloutEngine(cfg, GREEDY, num_slots=2, backend=_backend(kernel))
  requests = [sampling.Request(i, p, num_samples=2) for i, p in enumerate(PROMPTS)]
  finished, stats = _run_iterations(engine, [params] * 5, requests, budget=10)
  assert len(finished) == 2 * len(PROMPTS)
  assert [s.to_buffer for s in stats] == [8, 8, 8, 0] and [s.resumed for s in stats] == [0, 8, 8, 8]
  for (pid, _), traj in finished.items():
    ref = greedy_run[pid]
    np.testing.assert_array_equal(traj.response_tokens, ref.response_tokens)
    np.testing.assert_allclose(traj.logprobs, ref.logprobs, atol=1e-4)
    assert traj.segments == [(0, 0, 10), (1, 10, 20), (2, 20, 30), (3, 30, 32)]
    assert traj.finish_reason == "max_length"
  for s in stats:
    assert s.useful_tokens == 10 * 8 or s.useful_tokens == 2 * 8
    assert s.slot_utilization == pytest.approx(s.useful_tokens / (2 * s.decode_steps))


def test_resumed_tokens_come_from_the_new_params(hf_model, greedy_run, kernel):
  _, cfg, params = hf_model
  new_params = _perturbed(params)
  engine = sampling.RolloutEngine(cfg, GREEDY, num_slots=2, backend=_backend(kernel))
  requests = [sampling.Request(i, p) for i, p in enumerate(PROMPTS)]
  finished, _ = _run_iterations(engine, [params] + [new_params] * 3, requests, budget=10)
  # The new params' greedy continuation of prompt + the old params' first 10 tokens.
  prefixes = [list(p) + greedy_run[i].response_tokens[:10].tolist() for i, p in enumerate(PROMPTS)]
  cont_cfg = dataclasses.replace(GREEDY, max_new_tokens=NEW - 10)
  expected = sampling.generate(cfg, new_params, prefixes, cont_cfg, jax.random.key(0), num_slots=2,
                               backend=_backend(kernel))
  trajs = [finished[(i, 0)] for i in range(len(PROMPTS))]
  old_lps, new_lps = full_logprobs(cfg, params, trajs), full_logprobs(cfg, new_params, trajs)
  for i, traj in enumerate(trajs):
    np.testing.assert_array_equal(traj.response_tokens[:10], greedy_run[i].response_tokens[:10])
    np.testing.assert_array_equal(traj.response_tokens[10:], expected[i].response_tokens)
    assert not np.array_equal(traj.response_tokens[10:], greedy_run[i].response_tokens[10:])
    # Each segment's log-probs are under the params that generated it.
    np.testing.assert_allclose(traj.logprobs[:10], old_lps[i][:10], atol=1e-4)
    np.testing.assert_allclose(traj.logprobs[10:], new_lps[i][10:], atol=1e-4)
    assert traj.segments == [(0, 0, 10), (1, 10, 20), (2, 20, 30), (3, 30, NEW)]


def test_replay_buffer_state_dict_round_trip(hf_model):
  _, cfg, params = hf_model
  engine = sampling.RolloutEngine(cfg, GREEDY, num_slots=2)
  buffer = sampling.ReplayBuffer()
  requests = [sampling.Request(i, p, max_new_tokens=20 + i) for i, p in enumerate(PROMPTS)]
  engine.run(params, requests, buffer, 0, 6, jax.random.key(0))
  engine.run(params, [], buffer, 1, 5, jax.random.key(0))  # two segments each
  state = buffer.state_dict()
  assert all(isinstance(v, np.ndarray) for v in state.values())
  restored = sampling.ReplayBuffer.from_state_dict({k: v.copy() for k, v in state.items()})
  assert len(restored) == len(buffer) == len(PROMPTS)
  for a, b in zip(buffer, restored):
    assert (a.prompt_id, a.sample_index, a.max_new_tokens) == (b.prompt_id, b.sample_index, b.max_new_tokens)
    for field in ("prompt_tokens", "response_tokens", "logprobs", "token_iterations"):
      np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert b.segments == [(0, 0, 6), (1, 6, 11)]
  # Resuming from the restored buffer continues exactly like the original would.
  done_a, _ = engine.run(params, [], buffer, 2, None, jax.random.key(0))
  done_b, _ = engine.run(params, [], restored, 2, None, jax.random.key(0))
  for a, b in zip(sorted(done_a, key=lambda t: t.prompt_id), sorted(done_b, key=lambda t: t.prompt_id)):
    np.testing.assert_array_equal(a.response_tokens, b.response_tokens)
    assert len(a.response_tokens) == 20 + a.prompt_id
  assert len(sampling.ReplayBuffer.from_state_dict(sampling.ReplayBuffer().state_dict())) == 0


def test_finish_reasons(hf_model, greedy_run):
  _, cfg, params = hf_model
  ref = greedy_run[1].response_tokens
  stop = int(ref[5])
  first = int(np.argmax(ref == stop))
  eos = sampling.generate(cfg, params, [PROMPTS[1]], dataclasses.replace(GREEDY, stop_ids=(stop,)), jax.random.key(0),
                        num_slots=2)
  assert eos[0].finish_reason == "eos"
  np.testing.assert_array_equal(eos[0].response_tokens, ref[:first + 1])  # the stop token is kept
  # The cache is full: prompt + response == max_length.
  full = sampling.generate(cfg, params, [PROMPTS[1]], dataclasses.replace(GREEDY, max_length=20), jax.random.key(0),
                         num_slots=2)
  assert full[0].finish_reason == "max_length" and len(full[0].tokens) == 20
  np.testing.assert_array_equal(full[0].response_tokens, ref[:20 - len(PROMPTS[1])])
  # A per-iteration budget without a buffer: returned as "budget".
  engine = sampling.RolloutEngine(cfg, GREEDY, num_slots=2)
  done, stats = engine.run(params, [sampling.Request(1, PROMPTS[1])], None, 0, 9, jax.random.key(0))
  assert done[0].finish_reason == "budget" and len(done[0].response_tokens) == 9
  assert stats.finished == {"budget": 1}


def test_buffered_partials_are_served_before_new_prompts(hf_model):
  _, cfg, params = hf_model
  engine = sampling.RolloutEngine(cfg, GREEDY, num_slots=1)
  buffer = sampling.ReplayBuffer()
  engine.run(params, [sampling.Request(0, PROMPTS[0])], buffer, 0, 4, jax.random.key(0))
  done, stats = engine.run(params, [sampling.Request(1, PROMPTS[1]), sampling.Request(2, PROMPTS[2])], buffer, 1,
                           None, jax.random.key(0))
  assert [t.prompt_id for t in done] == [0, 1, 2] and stats.resumed == 1
  assert stats.useful_tokens == sum(len(t.response_tokens) for t in done) - 4
  assert stats.slot_utilization == pytest.approx(1.0)  # one slot, always busy until the last token


def test_a_small_page_pool_preempts_and_resumes_alike(hf_model, greedy_run, kernel):
  """A cache of too few pages for every slot at once: a slot that cannot grow gives its pages back and its
  trajectory waits for pages, then resumes in the same run from its tokens so far (encoded again). The results
  equal the run with pages for all, and every page is free at the end."""
  _, cfg, params = hf_model
  scfg = dataclasses.replace(GREEDY, num_pages=9)  # 2 slots at up to 46 positions need 12 pages of 8
  engine = sampling.RolloutEngine(cfg, scfg, num_slots=2, backend=_backend(kernel))
  done, stats = engine.run(params, [sampling.Request(i, p) for i, p in enumerate(PROMPTS)], None, 0, None,
                           jax.random.key(0))
  assert stats.preempted > 0
  for traj in done:
    ref = greedy_run[traj.prompt_id]
    np.testing.assert_array_equal(traj.response_tokens, ref.response_tokens)
    np.testing.assert_allclose(traj.logprobs, ref.logprobs, atol=1e-4)
    assert traj.segments == [(0, 0, NEW)]  # preemption does not split a segment
  assert engine.pages.free_pages(0) == 9 and not engine.pages.held_B.any()


def test_too_few_pages_for_one_slot_is_an_error(hf_model):
  _, cfg, _ = hf_model
  with pytest.raises(ValueError, match="num_pages=4 .* fewer than one slot may need \\(8\\)"):
    sampling.RolloutEngine(cfg, dataclasses.replace(GREEDY, num_pages=4), num_slots=2)
