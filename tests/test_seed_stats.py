"""The statistics over seeds against hand-worked cases and scipy's own tests."""
import math

import numpy as np
import pytest
from scipy import stats

from experiments import seed_stats


def test_t_interval_of_a_hand_worked_case():
  # 1..5: mean 3, sample sd sqrt(2.5), t(0.975, 4 df) = 2.776445; half-width 2.776445 * sqrt(2.5) / sqrt(5)
  iv = seed_stats.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
  assert iv.n == 5 and iv.mean == 3.0
  assert iv.low == pytest.approx(3 - 1.963243, abs=1e-6) and iv.high == pytest.approx(3 + 1.963243, abs=1e-6)
  # Two values: the interval is mean +- t(0.975, 1 df) * |a - b| / 2, t = 12.706205.
  iv = seed_stats.t_interval({7: 0.70, 8: 0.80})
  assert iv.mean == pytest.approx(0.75) and iv.high - iv.mean == pytest.approx(12.706205 * 0.05, rel=1e-6)


def test_t_interval_matches_scipy():
  x = np.random.default_rng(0).normal(0.7, 0.05, size=7)
  iv = seed_stats.t_interval(x, level=0.9)
  low, high = stats.t.interval(0.9, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
  assert (iv.low, iv.high) == pytest.approx((low, high), rel=1e-12)


def test_paired_difference_is_the_paired_t_test():
  a = {0: 0.76, 1: 0.70, 2: 0.81, 3: 0.66, 4: 0.74}
  b = {4: 0.73, 3: 0.62, 2: 0.80, 1: 0.66, 0: 0.71}  # paired by seed, not by position
  iv = seed_stats.paired_difference(a, b)
  ci = stats.ttest_rel([a[s] for s in range(5)], [b[s] for s in range(5)]).confidence_interval(0.95)
  assert iv.mean == pytest.approx(0.03) and (iv.low, iv.high) == pytest.approx((ci.low, ci.high), rel=1e-9)
  assert iv.low > 0  # each seed gains 1-4 points: paired, the gain is clear ...
  unpaired = stats.ttest_ind(list(a.values()), list(b.values())).confidence_interval(0.95)
  assert unpaired.low < 0  # ... though the seeds' own spread hides it when the two sides are taken apart


def test_single_values_and_bad_input():
  iv = seed_stats.t_interval([0.5])
  assert iv.mean == 0.5 and math.isnan(iv.low) and math.isnan(iv.high)
  with pytest.raises(ValueError, match="same seeds"):
    seed_stats.paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 2: 2.0})
  with pytest.raises(ValueError, match="finite"):
    seed_stats.t_interval([1.0, float("nan")])
  with pytest.raises(ValueError, match="non-empty"):
    seed_stats.t_interval([])
