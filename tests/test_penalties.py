"""Length and repeat penalties against hand-worked numbers."""
import numpy as np
import pytest

from k15.rewards import penalties


def test_recipe_example():
  np.testing.assert_allclose(penalties.length_penalty([100, 200, 300], [1, 0, 1]), [0.5, 0.0, -0.5])


def test_equal_lengths_give_zeros():
  np.testing.assert_array_equal(penalties.length_penalty([50, 50, 50], [1, 0, 1]), [0.0, 0.0, 0.0])


def test_wrong_short_answer_is_not_rewarded():
  # lambda = [0.5, -0.5]: the short wrong answer gets min(0, 0.5) = 0, the long correct one -0.5.
  np.testing.assert_allclose(penalties.length_penalty([100, 300], [0, 1]), [0.0, -0.5])


def test_four_samples_by_hand():
  # min 100, max 300: lambda = 0.5 - [0, 50, 100, 200]/200 = [0.5, 0.25, 0.0, -0.5].
  np.testing.assert_allclose(penalties.length_penalty([100, 150, 200, 300], [1, 1, 0, 0]),
                             [0.5, 0.25, 0.0, -0.5])
  # All wrong: only the non-positive part survives.
  np.testing.assert_allclose(penalties.length_penalty([10, 20, 30], [False, False, False]), [0.0, 0.0, -0.5])


def test_groups_are_independent():
  lengths = [[100, 200, 300], [7, 7, 7], [40, 10, 20]]
  correct = [[1, 0, 1], [1, 1, 1], [1, 1, 0]]
  # Third group: min 10, max 40 -> lambda = [-0.5, 0.5, 0.5 - 10/30]; the last is wrong but positive -> 0.
  np.testing.assert_allclose(penalties.length_penalty(lengths, correct),
                             [[0.5, 0.0, -0.5], [0.0, 0.0, 0.0], [-0.5, 0.5, 0.0]], rtol=1e-6)


def test_weight_warmup():
  assert [penalties.length_penalty_weight(i, 3, 0.2) for i in range(5)] == [0.0, 0.0, 0.0, 0.2, 0.2]
  assert penalties.length_penalty_weight(0, 0, 0.2) == 0.2


def test_repeat_penalty():
  reasons = [["eos", "repeat"], ["budget", "repeat"]]
  np.testing.assert_array_equal(penalties.repeat_penalty(reasons, 0.5), [[0.0, -0.5], [0.0, -0.5]])
  # Either sign in a config means a penalty, never a bonus.
  np.testing.assert_array_equal(penalties.repeat_penalty(reasons, -0.5), [[0.0, -0.5], [0.0, -0.5]])
  np.testing.assert_array_equal(penalties.repeat_penalty(["repeat", "eos"], 0.0), [0.0, 0.0])


def test_total_rewards_by_hand():
  r = [[1, 0, 1], [0, 0, 0]]
  lengths = [[100, 200, 300], [10, 20, 30]]
  reasons = [["eos", "eos", "eos"], ["eos", "repeat", "max_length"]]
  total, length, repeat = penalties.total_rewards(r, lengths, reasons, length_weight=0.2, repeat_penalty_value=0.5)
  # Length rewards [[0.5, 0, -0.5], [0, 0, -0.5]] times 0.2, then -0.5 on the repeat sample.
  np.testing.assert_allclose(length, [[0.1, 0.0, -0.1], [0.0, 0.0, -0.1]], rtol=1e-6)
  np.testing.assert_array_equal(repeat, [[0, 0, 0], [0, -0.5, 0]])
  np.testing.assert_allclose(total, [[1.1, 0.0, 0.9], [0.0, -0.5, -0.1]], rtol=1e-6)
  eos = [["eos"] * 3] * 2
  unchanged = penalties.total_rewards(r, lengths, eos, length_weight=0.0, repeat_penalty_value=0.5).total
  np.testing.assert_array_equal(unchanged, r)  # w = 0, no repeat stop: the verifier rewards
  with pytest.raises(ValueError, match="shape"):
    penalties.total_rewards(r, lengths, ["eos"] * 6, length_weight=0.0, repeat_penalty_value=0.5)
