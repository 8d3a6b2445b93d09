"""One interface over the task verifiers, for the RL loop and evaluation.

`verifier(texts, examples) -> rewards` scores decoded responses against their examples (the dicts the loop
samples prompts from). Which verifier checks an example is chosen by its "domain" field, so one mixture can
hold arithmetic, math and code prompts:
  arith  the synthetic task's exact integer check (in-process: a regex, no model output is executed)
  math   math-verify equivalence in a MathVerifierPool (per-item timeout)
  code   the candidate program against the example's test cases in the sandbox (never in-process)
Pools start lazily on first use and stop with `close()`.
"""
from typing import Mapping, Sequence

import numpy as np

from k15.rewards.arith import arith_reward

DOMAINS = ("arith", "math", "code")


class Verifier:
  """Dispatches each (text, example) to its domain's verifier; `close()` stops the pools it started."""

  def __init__(self, default_domain: str = "arith", math_timeout_s: float = 5.0, math_workers: int = 1):
    if default_domain not in DOMAINS:
      raise ValueError(f"unknown reward domain {default_domain!r}; valid: {DOMAINS}")
    self.default_domain = default_domain
    self._math_timeout_s, self._math_workers = math_timeout_s, math_workers
    self._math = None
    self._code = None
    self.reasons: dict = {}  # reason -> count over every call, for metrics and debugging

  def _domain(self, ex: Mapping) -> str:
    domain = ex.get("domain") or self.default_domain
    if domain not in DOMAINS:
      raise ValueError(f"example {ex.get('id', '?')!r} has domain {domain!r}; valid: {DOMAINS}")
    return domain

  def __call__(self, texts: Sequence[str], examples: Sequence[Mapping]) -> np.ndarray:
    if len(texts) != len(examples):
      raise ValueError(f"{len(texts)} responses but {len(examples)} examples")
    rewards = np.zeros(len(texts), np.float32)
    by_domain: dict = {}
    for i, ex in enumerate(examples):
      by_domain.setdefault(self._domain(ex), []).append(i)
    for domain, idx in by_domain.items():
      results = getattr(self, f"_score_{domain}")([texts[i] for i in idx], [examples[i] for i in idx])
      for i, (reward, reason) in zip(idx, results):
        rewards[i] = reward
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
    return rewards

  def _score_arith(self, texts, examples):
    return [(r, "correct" if r else "wrong or no answer")
            for r in (arith_reward(t, ex["answer"]) for t, ex in zip(texts, examples))]

  def _score_math(self, texts, examples):
    if self._math is None:
      from k15.rewards.math_pool import MathVerifierPool  # pylint: disable=g-import-not-at-top
      self._math = MathVerifierPool(num_workers=self._math_workers, timeout_s=self._math_timeout_s)
    return [(r.reward, r.reason) for r in self._math.score(texts, [ex["answer"] for ex in examples])]

  def _score_code(self, texts, examples):
    if self._code is None:
      from k15.rewards.code import CodeVerifier  # pylint: disable=g-import-not-at-top
      self._code = CodeVerifier()
    return [(r.reward, r.reason) for r in self._code.score(texts, [ex["test_cases"] for ex in examples])]

  def close(self) -> None:
    for pool in (self._math, self._code):
      if pool is not None:
        pool.close()
    self._math = self._code = None

  def __enter__(self) -> "Verifier":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def make_verifier(config) -> Verifier:
  """The verifier of an experiment config (config.rl.reward: the domain of examples that carry none)."""
  rl = config.rl
  return Verifier(default_domain=rl.get("reward", "arith"), math_timeout_s=rl.get("math_timeout_s", 5.0),
                  math_workers=rl.get("math_workers", 1))

