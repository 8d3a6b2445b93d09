"""Host-side state compared across processes (k15.rl.agreement), shared rewards (on one process, and on two
simulated by threads) and the preemption watch on one process; real multi-process runs are in test_launch_local.py."""
import os
import signal
import threading
import types

import numpy as np
import pytest

from k15 import preemption
from k15.rewards import shared
from k15.rewards.shared import SharedVerifier
from k15.rl import agreement


def test_digest_sees_every_leaf_and_nothing_else():
  state = {"success": np.array([0.5, 0.25]), "trajectories": [{"tokens": [1, 2, 3], "reason": None}], "n": 3}
  same = {"n": 3, "trajectories": [{"reason": None, "tokens": [1, 2, 3]}], "success": np.array([0.5, 0.25])}
  assert agreement.digest(state) == agreement.digest(same)  # key order does not matter
  for changed in ({**state, "n": 4}, {**state, "success": np.array([0.5, 0.26])},
                  {**state, "success": np.array([0.5, 0.25], np.float32)},  # same values, another dtype
                  {**state, "trajectories": [{"tokens": [1, 2, 4], "reason": None}]}):
    assert agreement.digest(changed) != agreement.digest(state)


def test_disagreements_name_the_fields_and_processes():
  names = ["prompts", "rewards", "rng"]
  rows = [[agreement.digest(v) for v in ("p", np.ones(3), "r")],
          [agreement.digest(v) for v in ("p", np.ones(3), "r")],
          [agreement.digest(v) for v in ("p", np.array([1.0, 0.0, 1.0]), "r")]]
  gathered = np.frombuffer(b"".join(b"".join(r) for r in rows), np.uint8).reshape(3, 3, 8)
  assert agreement.disagreements(gathered, names) == [("rewards", [2])]
  assert agreement.disagreements(gathered[:2], names) == []


def test_one_process_verifies_everything_and_counts_failures():
  class Fake:
    failures, judge_failures, judge_time_s = 0, 0, 0.0

    def __call__(self, texts, examples):
      self.failures += 1  # one failure per call
      return np.array([len(t) for t in texts], np.float32)

  shared = SharedVerifier(Fake())
  np.testing.assert_array_equal(shared(["a", "bbb"], [{}, {}]), [1.0, 3.0])
  shared(["cc"], [{}])
  assert shared.failures == 2


def test_sigterm_on_one_process_stops_after_the_current_step():
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionWatch() as watch:
    assert not watch.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)  # handled: the test process goes on
    assert watch.reached(2)
  assert signal.getsignal(signal.SIGTERM) is previous  # the handler lives only inside the block


class _RulesAndJudge:
  """A verifier per process: "arith" items by a rule (exact match; the text "fail" is a verifier failure, scored 0
  and counted), "math" items by a judge (the text's length mod 3 / 2). Records the items of each call."""

  judge_failures, judge_time_s = 0, 0.0  # SharedVerifier reads them: this stand-in judge takes no time and never fails

  def __init__(self):
    self.failures, self.calls = 0, []

  def judged(self, ex):
    return ex["domain"] == "math"

  def __call__(self, texts, examples):
    self.calls.append([ex["id"] for ex in examples])
    if any(ex["id"] == "boom" for ex in examples):
      raise ValueError("a bad example")
    self.failures += texts.count("fail")
    return np.array([len(t) % 3 / 2 if self.judged(ex) else float(t == ex["answer"])
                     for t, ex in zip(texts, examples)], np.float32)


def _as_two_processes(monkeypatch, fn):
  """[fn(0), fn(1)] run in two threads that k15.rewards.shared sees as processes 0 and 1 of 2 (its all-gather
  exchanges their rows); an exception is returned in place of a result."""
  local, barrier, slots = threading.local(), threading.Barrier(2, timeout=30), [None, None]

  def allgather(x):
    slots[local.p] = np.asarray(x)
    barrier.wait()
    out = np.stack(slots)
    barrier.wait()
    return out

  monkeypatch.setattr(shared, "jax", types.SimpleNamespace(process_count=lambda: 2, process_index=lambda: local.p))
  monkeypatch.setattr(shared, "multihost_utils", types.SimpleNamespace(process_allgather=allgather))
  results = [None, None]

  def run(p):
    local.p = p
    try:
      results[p] = fn(p)
    except Exception as e:  # pylint: disable=broad-except
      results[p] = e

  threads = [threading.Thread(target=run, args=(p,)) for p in (0, 1)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  return results


def test_two_processes_split_the_rules_and_both_run_the_judge(monkeypatch):
  examples = [{"id": f"a{i}", "domain": "arith", "answer": str(i)} for i in range(5)]
  examples[2:2] = [{"id": f"m{i}", "domain": "math"} for i in range(3)]
  texts = ["0", "x", "ab", "abcd", "abc", "fail", "3", "fail"]  # a0 a1 m0 m1 m2 a2 a3 a4
  truth = [1, 0, 1, 0.5, 0, 0, 1, 0]
  verifiers = [_RulesAndJudge(), _RulesAndJudge()]
  sharers = [SharedVerifier(v) for v in verifiers]
  out = _as_two_processes(monkeypatch, lambda p: sharers[p](texts, examples))
  for rewards in out:
    np.testing.assert_array_equal(rewards, truth)
  judged_calls = [[c for c in v.calls if c[0].startswith("m")] for v in verifiers]
  assert judged_calls == [[["m0", "m1", "m2"]]] * 2  # every process scores every judged item, in one call
  rule_calls = [[i for c in v.calls if not c[0].startswith("m") for i in c] for v in verifiers]
  assert all(rule_calls) and sorted(rule_calls[0] + rule_calls[1]) == [f"a{i}" for i in range(5)]  # each once
  assert [s.failures for s in sharers] == [2, 2]  # both processes count both failures

  examples[0] = {"id": "boom", "domain": "arith", "answer": "0"}  # a0 is process 0's: its verifier raises
  out = _as_two_processes(monkeypatch, lambda p: sharers[p](texts, examples))
  assert isinstance(out[0], ValueError) and "a bad example" in str(out[0])
  assert isinstance(out[1], RuntimeError) and "failed on process(es) [0]" in str(out[1])  # not a hang
  with pytest.raises(ValueError, match="3 responses but 2 examples"):
    sharers[0](["a", "b", "c"], examples[:2])


def test_the_verifier_names_the_items_a_judge_scores():
  from k15.rewards.verifiers import Verifier, methods_by_domain  # pylint: disable=g-import-not-at-top
  v = Verifier(judges={"cot_rm": object()}, by_domain=methods_by_domain("mix", {"math": "cot_rm"}))
  assert [v.judged(ex) for ex in ({"domain": "math"}, {"domain": "code"}, {})] == [True, False, False]
  assert not Verifier().judged({"domain": "math"})  # the rules everywhere by default
