"""Which prompts an iteration trains on: curriculum pools and prioritized sampling (RECIPE.md section 3).

Prompts are identified by their index 0..N-1 in the prompt set; N-suffixed arrays are indexed by it. The
curriculum picks the pool for an iteration from difficulty labels; prioritization picks within the pool with
P(i) proportional to (1 - s_i) + floor, s_i the prompt's running success rate. Everything is numpy on the host
and deterministic given the seed, so a resumed run draws the same prompts.
"""
import dataclasses
from typing import Any, Mapping, Optional, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class CurriculumStage:
  """A stage is active for iterations below `until_iteration` (and at or above the previous stage's)."""
  until_iteration: Optional[int]  # None: forever (only the last stage)
  difficulties: Optional[tuple] = None  # difficulty labels in the pool; None: every prompt


def stages_from_config(entries: Sequence[Any]) -> list[CurriculumStage]:
  """Stages from config entries: (until, labels) pairs, mappings {"until_iteration": .., "difficulties": [..]} or
  CurriculumStages.

  Stages must be in order of increasing until_iteration; only the last may be None. After the last stage ends
  it stays active.
  """
  stages = []
  for e in entries:
    if isinstance(e, CurriculumStage):
      until, labels = e.until_iteration, e.difficulties
    else:
      until, labels = (e["until_iteration"], e["difficulties"]) if isinstance(e, Mapping) else tuple(e)
    stages.append(CurriculumStage(None if until is None else int(until),
                                  None if labels is None else tuple(labels)))
  for i, s in enumerate(stages):
    if s.until_iteration is None and i != len(stages) - 1:
      raise ValueError(f"curriculum stage {i} has until_iteration=None but is not the last stage")
    if i and s.until_iteration is not None and s.until_iteration <= stages[i - 1].until_iteration:
      raise ValueError(f"curriculum stage {i}: until_iteration={s.until_iteration} must exceed the previous "
                       f"stage's {stages[i - 1].until_iteration}")
  return stages


def active_stage(stages: Sequence[CurriculumStage], iteration: int) -> int:
  """Index of the stage active at `iteration`; the last stage once every stage has ended."""
  for i, s in enumerate(stages):
    if s.until_iteration is None or iteration < s.until_iteration:
      return i
  return len(stages) - 1


def curriculum_pool(stages: Optional[Sequence[CurriculumStage]], difficulty_N, num_prompts: int,
                    iteration: int) -> np.ndarray:
  """Sorted indices of the prompts in the pool at `iteration`; every prompt when there is no curriculum."""
  if not stages:
    return np.arange(num_prompts)
  stage = stages[active_stage(stages, iteration)]
  if stage.difficulties is None:
    return np.arange(num_prompts)
  if difficulty_N is None:
    raise ValueError(f"curriculum stage {stage} filters by difficulty but the prompts have no difficulty labels")
  pool = np.flatnonzero(np.isin(np.asarray(difficulty_N), list(stage.difficulties)))
  if not pool.size:
    raise ValueError(f"curriculum stage {stage} selects no prompt")
  return pool


class PromptStats:
  """Per-prompt success rate s_i as an EMA: s <- decay * s + (1 - decay) * (fraction of the group correct).

  `initial` is the value before any observation: 0.0 treats unseen prompts as unsolved (top priority).
  """

  def __init__(self, num_prompts: int, decay: float = 0.9, initial: float = 0.0):
    if not 0.0 <= decay < 1.0:
      raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    self.decay = decay
    self.success_N = np.full(num_prompts, float(initial), np.float64)
    self.observed_N = np.zeros(num_prompts, np.int64)  # number of updates per prompt

  def update(self, indices, success_rates):
    """One observation per entry, applied in order (a prompt listed twice is updated twice)."""
    indices, rates = np.asarray(indices, np.int64).reshape(-1), np.asarray(success_rates, np.float64).reshape(-1)
    if indices.shape != rates.shape:
      raise ValueError(f"{indices.size} indices but {rates.size} success rates")
    if np.any((rates < 0) | (rates > 1)):
      raise ValueError(f"success rates must lie in [0, 1], got {rates}")
    for i, x in zip(indices, rates):
      self.success_N[i] = self.decay * self.success_N[i] + (1.0 - self.decay) * x
      self.observed_N[i] += 1

  def state_dict(self) -> dict:
    return {"success": self.success_N.copy(), "observed": self.observed_N.copy()}

  def load_state_dict(self, state: Mapping):
    success, observed = np.asarray(state["success"], np.float64), np.asarray(state["observed"], np.int64)
    if success.shape != self.success_N.shape or observed.shape != self.observed_N.shape:
      raise ValueError(f"stats for {success.shape} prompts cannot load into stats for {self.success_N.shape}")
    self.success_N, self.observed_N = success.copy(), observed.copy()


def sampling_probs(pool_indices, stats, floor: float = 0.0) -> np.ndarray:
  """P(i) over the pool, proportional to (1 - s_i) + floor; uniform if every weight is 0.

  `stats` is a PromptStats or an array of success rates indexed by prompt.
  """
  if floor < 0:
    raise ValueError(f"priority floor must be >= 0, got {floor}")
  s_N = stats.success_N if isinstance(stats, PromptStats) else np.asarray(stats, np.float64)
  w = np.clip(1.0 - s_N[np.asarray(pool_indices)], 0.0, None) + floor
  total = w.sum()
  return w / total if total > 0 else np.full(w.shape, 1.0 / w.size)


def _draw(rng: np.random.Generator, items, probs, m: int) -> np.ndarray:
  """m distinct items, drawn one at a time with probability proportional to `probs` among those left.

  Zero-probability items come only after every positive one is drawn (numpy refuses to draw them at all).
  """
  positive = probs > 0
  n_pos = int(positive.sum())
  if m <= n_pos:
    return rng.choice(items, size=m, replace=False, p=probs)
  first = rng.choice(items[positive], size=n_pos, replace=False, p=probs[positive] / probs[positive].sum())
  return np.concatenate([first, rng.choice(items[~positive], size=m - n_pos, replace=False)])


class PromptSampler:
  """Curriculum (the pool) + prioritization (within the pool), without replacement within an iteration.

  Several `sample` calls in one iteration (e.g. refilling sampler slots) never repeat a prompt until the whole
  pool has been drawn; then a new pass starts. The draw of call c in iteration i uses
  np.random.default_rng([seed, i, c]), so it depends only on the seed, the counters and the stats.
  """

  def __init__(self, num_prompts: Optional[int] = None, *, seed: int, difficulties=None,
               stages: Optional[Sequence[CurriculumStage]] = None, prioritized: bool = True, floor: float = 0.01,
               ema_decay: float = 0.9, initial_success: float = 0.0):
    """num_prompts defaults to len(difficulties); difficulties: one label per prompt (needed by a curriculum)."""
    self.difficulty_N = None if difficulties is None else np.asarray(difficulties)
    if num_prompts is None:
      if self.difficulty_N is None:
        raise ValueError("PromptSampler needs num_prompts or difficulties")
      num_prompts = len(self.difficulty_N)
    if self.difficulty_N is not None and self.difficulty_N.shape != (num_prompts,):
      raise ValueError(f"difficulty labels have shape {self.difficulty_N.shape}, expected ({num_prompts},)")
    self.num_prompts = num_prompts
    self.stages = list(stages) if stages else None  # None: curriculum off, every prompt is in the pool
    self.prioritized = prioritized  # False: uniform within the pool
    self.floor = floor
    self.stats = PromptStats(num_prompts, ema_decay, initial_success)
    self.seed = int(seed)
    self.times_sampled_N = np.zeros(num_prompts, np.int64)
    self._iteration = -1  # the iteration the drawn-set below belongs to
    self._drawn_N = np.zeros(num_prompts, bool)
    self._calls = 0  # sample() calls so far in self._iteration

  def pool(self, iteration: int) -> np.ndarray:
    return curriculum_pool(self.stages, self.difficulty_N, self.num_prompts, iteration)

  def probs(self, pool_indices) -> np.ndarray:
    if not self.prioritized:
      return np.full(len(pool_indices), 1.0 / len(pool_indices))
    return sampling_probs(pool_indices, self.stats, self.floor)

  def sample(self, n: int, iteration: int) -> np.ndarray:
    """n prompt indices for `iteration` (int64)."""
    if iteration != self._iteration:
      self._iteration, self._calls = iteration, 0
      self._drawn_N[:] = False
    rng = np.random.default_rng([self.seed, iteration, self._calls])
    pool = self.pool(iteration)
    out = []
    while len(out) < n:
      left = pool[~self._drawn_N[pool]]
      if not left.size:  # the pool is exhausted: start a new pass
        self._drawn_N[pool] = False
        left = pool
      picked = _draw(rng, left, self.probs(left), min(n - len(out), left.size))
      self._drawn_N[picked] = True
      out.extend(picked.tolist())
    self._calls += 1
    out = np.asarray(out, np.int64)
    np.add.at(self.times_sampled_N, out, 1)
    return out

  def update(self, indices, success_rates):
    """Feeds back each prompt's fraction of correct samples this iteration."""
    self.stats.update(indices, success_rates)

  def state_dict(self) -> dict:
    """Plain numpy arrays and ints (for the checkpoint's host state)."""
    return {**self.stats.state_dict(), "times_sampled": self.times_sampled_N.copy(), "seed": self.seed,
            "iteration": self._iteration, "drawn": self._drawn_N.copy(), "calls": self._calls}

  def load_state_dict(self, state: Mapping):
    self.stats.load_state_dict(state)
    drawn = np.asarray(state["drawn"], bool)
    if drawn.shape != (self.num_prompts,):
      raise ValueError(f"sampler state for {drawn.shape} prompts cannot load into a sampler of {self.num_prompts}")
    self.times_sampled_N = np.asarray(state["times_sampled"], np.int64).copy()
    self.seed, self._iteration, self._calls = int(state["seed"]), int(state["iteration"]), int(state["calls"])
    self._drawn_N = drawn.copy()
