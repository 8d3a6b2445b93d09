"""One interface over the task verifiers, for the RL loop and evaluation.

`verifier(texts, examples) -> rewards` scores decoded responses against their examples (the dicts the loop
samples prompts from). Which verifier checks an example is chosen by its "domain" field, so one mixture can
hold arithmetic, math and code prompts:
  arith  the synthetic task's exact integer check (in-process: a regex, no model output is executed)
  math   math-verify equivalence in a MathVerifierPool (per-item timeout)
  code   the candidate program against the example's test cases in the sandbox (never in-process)
Pools start lazily on first use and stop with `close()`.

Model-based rewards (k15/rewards/reward_model.py) sit behind the same call: `judges` names the judges (cot_rm,
value_rm) and `by_domain` maps a domain to one of them or to "rules" (its verifier above; the default). A judge
that cannot find a single valid verdict scores 0 with the reason and counts in `judge_failures`; `judge_time_s`
is the wall time spent in judges (the RL loop reports its share of each iteration).

A verifier failure (a math pool whose workers cannot start, a sandbox error) does not stop training: the
affected responses get reward 0 with the reason "verifier failure: ...", `failures` counts them for the metrics,
and the failed pool is closed so the next call starts a fresh one. Bad examples (a missing "answer" or
"test_cases" field, an unknown domain) and a sandbox that refuses to run without isolation still raise.
"""
import logging
from typing import Mapping, Optional, Sequence

import numpy as np

from k15.rewards.arith import arith_reward
from k15.rewards.sandbox import SandboxConfig

log = logging.getLogger(__name__)

DOMAINS = ("arith", "math", "code")
REWARDS = ("rules", "cot_rm", "value_rm", "mix")  # config.rl.reward: what scores the RL responses
METHODS = ("rules", "cot_rm", "value_rm")  # what scores one domain


def methods_by_domain(reward: str, mix: Mapping[str, str]) -> dict:
  """{domain: method} of config.rl.reward: rules everywhere, one judge everywhere, or the mix's mapping (domains
  it leaves out use the rules)."""
  if reward not in REWARDS:
    raise ValueError(f"unknown reward {reward!r}; valid: {REWARDS}")
  if reward == "mix":
    bad = {d: m for d, m in mix.items() if d not in DOMAINS or m not in METHODS}
    if bad:
      raise ValueError(f"reward mix {dict(mix)}: {bad} not (domain of {DOMAINS}: method of {METHODS})")
    return {d: mix.get(d, "rules") for d in DOMAINS}
  return {d: reward for d in DOMAINS}


class Verifier:
  """Dispatches each (text, example) to its domain's verifier; `close()` stops the pools it started."""

  def __init__(self, default_domain: str = "arith", math_timeout_s: float = 5.0, math_workers: int = 1,
               sandbox_config: SandboxConfig = SandboxConfig(), judges: Optional[Mapping] = None,
               by_domain: Optional[Mapping[str, str]] = None):
    """sandbox_config: the limits and isolation of code rewards' sandbox. judges: {"cot_rm" | "value_rm": a judge
    (reward_model.CoTJudge, ValueJudge)}; by_domain: {domain: "rules" or a judge's name} (methods_by_domain)."""
    if default_domain not in DOMAINS:
      raise ValueError(f"unknown reward domain {default_domain!r}; valid: {DOMAINS}")
    self._judges = dict(judges or {})
    self._methods = {d: "rules" for d in DOMAINS}
    self._methods.update(by_domain or {})
    for domain, method in self._methods.items():
      if method != "rules" and method not in self._judges:
        raise ValueError(f"domain {domain!r} is scored by {method!r}, but the verifier has no such judge "
                         f"(judges: {sorted(self._judges)})")
    self.default_domain = default_domain
    self._math_timeout_s, self._math_workers = math_timeout_s, math_workers
    self._sandbox_config = sandbox_config
    self._pools: dict = {}  # domain -> its pool (math, code), started on first use
    self.reasons: dict = {}  # reason -> count over every call, for metrics and debugging
    self.failures = 0  # responses scored 0 because their verifier failed, over every call

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
      results = self._score_domain(domain, [texts[i] for i in idx], [examples[i] for i in idx])
      for i, (reward, reason) in zip(idx, results):
        rewards[i] = reward
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
    return rewards

  def judged(self, ex: Mapping) -> bool:
    """Whether a judge (a reward model on the mesh), not a rule, scores example `ex`."""
    return self._methods[self._domain(ex)] != "rules"

  @property
  def judge_failures(self) -> int:
    """Responses a judge scored 0 for want of a single valid verdict, over every call."""
    return sum(j.failures for j in self._judges.values())

  @property
  def judge_time_s(self) -> float:
    """Wall time spent in judges, over every call."""
    return sum(j.time_s for j in self._judges.values())

  def _score_domain(self, domain, texts, examples) -> list:
    """[(reward, reason)] of one domain's items; a failure of its pool scores them 0 (module docstring)."""
    if self._methods[domain] != "rules":
      return [(r.reward, r.reason) for r in self._judges[self._methods[domain]].score(texts, examples)]
    if domain == "arith":
      return [(r, "correct" if r else "wrong or no answer")
              for r in (arith_reward(t, ex["answer"]) for t, ex in zip(texts, examples))]
    targets = [ex["answer"] if domain == "math" else ex["test_cases"] for ex in examples]
    if domain not in self._pools:  # outside the try: a sandbox that refuses to run here is a configuration error
      self._pools[domain] = self._start_pool(domain)
    try:
      results = self._pools[domain].score(texts, targets)
    except Exception as e:  # pylint: disable=broad-except  # a broken pool costs these rewards, not the run
      log.warning("%s verifier failed on %d responses; scored 0, pool restarted on next use: %s",
                  domain, len(texts), e)
      self._pools.pop(domain).close()
      self.failures += len(texts)
      return [(0.0, f"verifier failure: {type(e).__name__}: {str(e)[:200]}")] * len(texts)
    return [(r.reward, r.reason) for r in results]

  def _start_pool(self, domain):
    if domain == "math":
      from k15.rewards.math_pool import MathVerifierPool  # pylint: disable=g-import-not-at-top
      return MathVerifierPool(num_workers=self._math_workers, timeout_s=self._math_timeout_s)
    from k15.rewards.code import CodeVerifier  # pylint: disable=g-import-not-at-top
    return CodeVerifier(self._sandbox_config)

  def close(self) -> None:
    for pool in self._pools.values():
      pool.close()
    self._pools = {}
    for judge in self._judges.values():
      judge.close()

  def __enter__(self) -> "Verifier":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
