"""Model merging and DPO pair construction against hand-worked numbers."""
import jax.numpy as jnp
import numpy as np
import pytest

from k15.long2short import dpo, merge


def _tree(x, y):
  return {"layer": {"w": jnp.asarray(x, jnp.float32)}, "b": jnp.asarray(y, jnp.float32)}


def test_merge_by_hand():
  a, b = _tree([[1.0, 2.0], [3.0, 4.0]], [10.0]), _tree([[3.0, 0.0], [1.0, -4.0]], [0.0])
  half = merge.merge_params(a, b)
  np.testing.assert_allclose(half["layer"]["w"], [[2.0, 1.0], [2.0, 0.0]])
  np.testing.assert_allclose(half["b"], [5.0])
  m = merge.merge_params(a, b, (0.3, 0.7))
  # 0.3*1 + 0.7*3 = 2.4, 0.3*2 = 0.6, 0.3*3 + 0.7*1 = 1.6, 0.3*4 - 0.7*4 = -1.6; 0.3*10 = 3.
  np.testing.assert_allclose(m["layer"]["w"], [[2.4, 0.6], [1.6, -1.6]], rtol=1e-6)
  np.testing.assert_allclose(m["b"], [3.0], rtol=1e-6)


def test_merge_keeps_bfloat16():
  a = {"w": jnp.asarray([1.0, 2.0], jnp.bfloat16)}
  b = {"w": jnp.asarray([2.0, 4.0], jnp.bfloat16)}
  out = merge.merge_params(a, b)
  assert out["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out["w"], np.float32), [1.5, 3.0])


def test_merge_errors_name_the_leaf():
  a = _tree([[1.0, 2.0]], [1.0])
  with pytest.raises(ValueError, match=r"\['layer'\]\['w'\].*float32\[1, 2\].*float32\[2, 1\]"):
    merge.merge_params(a, _tree([[1.0], [2.0]], [1.0]))
  with pytest.raises(ValueError, match=r"\['b'\].*bfloat16"):
    merge.merge_params(a, {"layer": a["layer"], "b": a["b"].astype(jnp.bfloat16)})
  with pytest.raises(ValueError, match=r"only in a: \['b'\]; only in b: none"):
    merge.merge_params(a, {"layer": a["layer"]})
  with pytest.raises(ValueError, match="sum to 1"):
    merge.merge_params(a, a, (0.5, 0.6))


def test_dpo_pairs_cover_every_rule():
  #           0    1    2    3    4    5    6    7    8
  lengths = [120, 100, 100, 150, 140, 90, 100, 101, 300]
  correct = [1,   1,   1,   1,   1,   0,  0,   0,   0]
  # Positive: the shortest correct, 100, at index 1 (index 2 ties and loses to the lower index).
  # Correct: 0 (1.2x) no, 2 (1.0x tie) no, 3 (exactly 1.5x) yes, 4 (1.4x) no.
  # Wrong: 5 (shorter) no, 6 (equal length) no, 7 (one token longer) yes, 8 yes.
  assert dpo.build_dpo_pairs(lengths, correct) == [(1, 3), (1, 7), (1, 8)]
  assert dpo.build_dpo_pairs(lengths, correct, long_factor=1.2) == [(1, 0), (1, 3), (1, 4), (1, 7), (1, 8)]


def test_dpo_no_correct_or_nothing_to_reject():
  assert dpo.build_dpo_pairs([10, 20, 30], [0, 0, 0]) == []
  assert dpo.build_dpo_pairs([30, 20, 10], [1, 0, 0]) == []  # every wrong answer is shorter


def test_dpo_batch_flat_indices():
  pairs = dpo.build_dpo_pairs_batch([[10, 20, 15], [50, 40, 60]], [[1, 0, 1], [0, 1, 1]])
  # Group 0: positive 0; 1 is wrong and longer, 2 is correct at 1.5x. Group 1: positive 1 (-> 4); 0 wrong and
  # longer (-> 3); 2 correct at 1.5x (-> 5).
  assert pairs == [(0, 1), (0, 2), (4, 3), (4, 5)]
