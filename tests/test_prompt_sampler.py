"""Curriculum pools, priority probabilities, EMA stats and sampler determinism, against hand-worked numbers."""
import numpy as np
import pytest

from k15.rl import prompt_sampler as ps

LABELS = np.asarray(["easy", "hard", "medium", "hard", "easy", "hard"])
STAGES = ps.stages_from_config([
    {"until_iteration": 2, "difficulties": None},
    (5, ["medium", "hard"]),
    {"until_iteration": None, "difficulties": ["hard"]},
])


def test_probs_by_hand():
  s = np.asarray([0.0, 0.5, 0.75, 1.0, 0.9])
  # Weights 1 - s over the pool [0, 1, 3]: [1, 0.5, 0] / 1.5.
  np.testing.assert_allclose(ps.sampling_probs([0, 1, 3], s, 0.0), [2 / 3, 1 / 3, 0.0])
  # With floor 0.1: [1.1, 0.6, 0.1] / 1.8.
  np.testing.assert_allclose(ps.sampling_probs([0, 1, 3], s, 0.1), [1.1 / 1.8, 0.6 / 1.8, 0.1 / 1.8])
  # All solved and no floor: uniform rather than 0/0.
  np.testing.assert_allclose(ps.sampling_probs([3, 3], s, 0.0), [0.5, 0.5])
  stats = ps.PromptStats(5)
  stats.success_N[:] = s
  np.testing.assert_allclose(ps.sampling_probs(np.arange(5), stats), [1, 0.5, 0.25, 0, 0.1] / np.float64(1.85))


def test_ema_by_hand():
  stats = ps.PromptStats(3, decay=0.8, initial=0.5)
  stats.update([0, 2], [1.0, 0.0])
  np.testing.assert_allclose(stats.success_N, [0.8 * 0.5 + 0.2, 0.5, 0.8 * 0.5])  # [0.6, 0.5, 0.4]
  stats.update([0, 0], [0.25, 1.0])  # applied in order: 0.8*0.6 + 0.05 = 0.53, then 0.8*0.53 + 0.2 = 0.624
  np.testing.assert_allclose(stats.success_N, [0.624, 0.5, 0.4])
  np.testing.assert_array_equal(stats.observed_N, [3, 0, 1])
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    stats.update([1], [1.5])


def test_curriculum_pools_by_stage():
  pool = lambda it: ps.curriculum_pool(STAGES, LABELS, 6, it).tolist()
  assert pool(0) == pool(1) == [0, 1, 2, 3, 4, 5]
  assert pool(2) == pool(4) == [1, 2, 3, 5]
  assert pool(5) == pool(1000) == [1, 3, 5]
  assert ps.curriculum_pool(None, None, 4, 7).tolist() == [0, 1, 2, 3]
  # A finite last stage stays active after it ends.
  assert ps.active_stage(ps.stages_from_config([(3, None), (6, ["easy"])]), 10) == 1
  with pytest.raises(ValueError, match="must exceed"):
    ps.stages_from_config([(5, None), (5, ["hard"])])
  with pytest.raises(ValueError, match="not the last"):
    ps.stages_from_config([(None, None), (5, ["hard"])])
  with pytest.raises(ValueError, match="selects no prompt"):
    ps.curriculum_pool(ps.stages_from_config([(None, ["trivial"])]), LABELS, 6, 0)


def test_sampler_draws_from_the_stage_pool_without_replacement():
  sampler = ps.PromptSampler(seed=0, difficulties=LABELS, stages=STAGES)  # 6 prompts, from the labels
  first = sampler.sample(4, iteration=0)
  second = sampler.sample(2, iteration=0)  # a second call in the same iteration: the two prompts not drawn yet
  assert sorted(first.tolist() + second.tolist()) == list(range(6))
  third = sampler.sample(3, iteration=0)  # the pool is exhausted: a new pass, still no repeats within the call
  assert len(set(third.tolist())) == 3
  assert set(sampler.sample(4, iteration=3).tolist()) == {1, 2, 3, 5}
  assert set(sampler.sample(3, iteration=7).tolist()) == {1, 3, 5}
  np.testing.assert_array_equal(sampler.times_sampled_N.sum(), 4 + 2 + 3 + 4 + 3)


def test_same_seed_same_prompts_and_different_seed_differs():
  def run(seed):
    sampler = ps.PromptSampler(50, seed=seed, floor=0.05)
    out = []
    for it in range(5):
      idx = sampler.sample(8, iteration=it)
      sampler.update(idx, (idx % 3) / 2.0 % 1.0)
      out.append(idx)
    return np.stack(out)
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.array_equal(run(1), run(2))


def test_state_round_trip_resumes_exactly():
  a = ps.PromptSampler(20, seed=3, floor=0.01, ema_decay=0.7)
  for it in range(3):
    idx = a.sample(5, iteration=it)
    a.update(idx, (idx % 2).astype(float))
  a.sample(4, iteration=3)  # mid-iteration: part of iteration 3 is already drawn
  state = a.state_dict()
  assert all(isinstance(v, (np.ndarray, int)) for v in state.values())
  b = ps.PromptSampler(20, seed=99, floor=0.01, ema_decay=0.7)
  b.load_state_dict({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in state.items()})
  for k, v in state.items():
    np.testing.assert_array_equal(b.state_dict()[k], v)
  np.testing.assert_array_equal(a.sample(6, iteration=3), b.sample(6, iteration=3))
  np.testing.assert_array_equal(a.sample(6, iteration=4), b.sample(6, iteration=4))
  with pytest.raises(ValueError, match="cannot load"):
    ps.PromptSampler(21, seed=0).load_state_dict(state)


def test_sampling_frequencies_follow_priorities():
  sampler = ps.PromptSampler(5, seed=0, floor=0.0)
  sampler.stats.success_N[:] = [0.0, 0.5, 0.75, 1.0, 0.9]
  expected = np.asarray([1.0, 0.5, 0.25, 0.0, 0.1]) / 1.85
  n = 4000
  counts = np.bincount(np.concatenate([sampler.sample(1, iteration=it) for it in range(n)]), minlength=5)
  assert counts[3] == 0  # solved and no floor: never drawn
  nz = expected > 0
  chi2 = np.sum((counts[nz] - n * expected[nz])**2 / (n * expected[nz]))
  assert chi2 < 16.3  # chi-square with 3 degrees of freedom: p = 0.001
  # Priority off: uniform over the pool regardless of the stats.
  uniform = ps.PromptSampler(5, seed=0, prioritized=False)
  uniform.stats.success_N[:] = [0.0, 0.5, 0.75, 1.0, 0.9]
  counts = np.bincount(np.concatenate([uniform.sample(1, iteration=it) for it in range(n)]), minlength=5)
  assert np.sum((counts - n / 5)**2 / (n / 5)) < 18.5  # 4 degrees of freedom: p = 0.001


def test_zero_weight_prompts_come_last():
  sampler = ps.PromptSampler(4, seed=0, floor=0.0)
  sampler.stats.success_N[:] = [1.0, 0.0, 1.0, 0.5]
  for it in range(20):
    assert set(sampler.sample(3, iteration=it)[:2].tolist()) == {1, 3}


def test_integer_levels_and_no_curriculum():
  levels = np.asarray([1, 2, 3, 4, 2, 4])
  sampler = ps.PromptSampler(seed=0, difficulties=levels, stages=[ps.CurriculumStage(2, (1, 2)),
                                                                  ps.CurriculumStage(10**9, (4,))])
  assert set(sampler.sample(3, iteration=1).tolist()) == {0, 1, 4}
  assert set(sampler.sample(2, iteration=2).tolist()) == {3, 5}
  assert sorted(ps.PromptSampler(seed=0, difficulties=levels, stages=[]).sample(6, iteration=0)) == list(range(6))
  with pytest.raises(ValueError, match="num_prompts or difficulties"):
    ps.PromptSampler(seed=0)
