"""Statistics over seeds: a metric's mean with its 95% interval, and paired differences between two variants.

Each value is one seed's result (a run's final held-out accuracy, say), never the iterations or samples of one run,
which are not independent of each other. With the 5-10 seeds a CPU sweep affords, the interval is Student's t: a
bootstrap over 5 values has 126 distinct resamples and its percentile interval is too narrow. Two variants run with
the same seeds share their data and warm-up, so their difference is taken seed by seed (a paired t interval), which
removes the spread that the seeds cause in both.
"""
import dataclasses
import math
from typing import Mapping, Sequence, Union

import numpy as np
from scipy import stats

Values = Union[Sequence[float], Mapping[int, float]]


@dataclasses.dataclass(frozen=True)
class Interval:
  """The mean of n values and its two-sided interval (low = high = nan for a single value)."""
  mean: float
  low: float
  high: float
  n: int


def t_interval(values: Values, level: float = 0.95) -> Interval:
  """Mean and Student-t interval of independent values (one per seed; a mapping seed -> value is fine)."""
  x = np.asarray(list(values.values()) if isinstance(values, Mapping) else values, np.float64)
  if x.ndim != 1 or not x.size:
    raise ValueError(f"expected a non-empty list of values, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"values must be finite, got {x.tolist()}")
  if not 0 < level < 1:
    raise ValueError(f"level must be in (0, 1), got {level}")
  mean = float(x.mean())
  if x.size == 1:
    return Interval(mean, math.nan, math.nan, 1)
  half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
  return Interval(mean, mean - half, mean + half, int(x.size))


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> Interval:
  """The mean over seeds of a[seed] - b[seed] and its paired t interval; a and b must hold the same seeds."""
  if set(a) != set(b):
    raise ValueError(f"a paired difference needs the same seeds on both sides, got {sorted(a)} and {sorted(b)}")
  return t_interval([a[s] - b[s] for s in sorted(a)], level)
