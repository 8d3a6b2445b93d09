"""Math rewards: final-answer extraction, math-verify equivalence against hand labels, the worker pool's timeout
and its recovery from workers that die while starting, and the Verifier's handling of a pool that cannot recover."""
import functools
import time

import numpy as np

import psutil
import pytest

from k15.rewards.math import RewardResult, extract_answer
from k15.rewards import math_pool
from k15.rewards.math_pool import MathVerifierPool
from k15.rewards.verifiers import Verifier

# (response, reference, hand label). Labels are what a grader would give, not what math-verify happens to say.
HAND_LABELLED = [
    # fractions, decimals, LaTeX fractions
    (r"So \boxed{\frac{1}{2}}.", "0.5", 1),
    (r"\boxed{0.5}", r"\frac12", 1),
    ("The answer is 1/2.", r"\dfrac{1}{2}", 1),
    (r"\boxed{\frac{3}{4}}", "0.75", 1),
    (r"\boxed{6/8}", "3/4", 1),
    (r"\boxed{1.5}", r"\frac{3}{2}", 1),
    (r"\boxed{1.50}", "1.5", 1),
    (r"\boxed{\dfrac{7}{2}}", "3.5", 1),
    (r"\boxed{0.333}", r"\frac13", 0),  # a rounded decimal is not the exact third
    (r"\boxed{\frac{1}{2}}", "-0.5", 0),
    # roots and powers
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1),
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}", 1),  # nested braces inside the box
    (r"\boxed{\sqrt{2}}", "2^{1/2}", 1),
    (r"\boxed{4}", r"\sqrt{16}", 1),
    (r"\boxed{2^{10}}", "1024", 1),
    (r"\boxed{\sqrt{3}}", "1.732", 0),
    (r"\boxed{2\pi}", "6.283185307", 1),
    (r"\boxed{\pi}", "3.14", 0),
    # units and percent
    (r"\boxed{5 \text{ cm}}", "5", 1),
    (r"\boxed{5}", r"5\text{ cm}", 1),
    ("The answer is 72 dollars.", "72", 1),
    (r"\boxed{50\%}", "50", 1),
    (r"\boxed{12\%}", "12", 1),
    (r"\boxed{50\%}", "0.5", 1),
    (r"\boxed{51\%}", "50", 0),
    # intervals and sets
    (r"\boxed{[1, 3)}", "[1,3)", 1),
    (r"\boxed{(1,3)}", "[1,3]", 0),
    (r"\boxed{(-\infty, 2]}", r"(-\infty,2]", 1),
    (r"\boxed{(-\infty, 2)}", r"(-\infty,2]", 0),
    (r"\boxed{\{1, 2\}}", r"\{2, 1\}", 1),
    (r"\boxed{\{1, 2\}}", r"\{1, 2, 3\}", 0),
    (r"\boxed{\infty}", r"\infty", 1),
    # negative numbers, integers, thousands separators, GSM8K markers
    (r"\boxed{-3}", "-3", 1),
    (r"\boxed{3}", "-3", 0),
    (r"\boxed{-7}", "7", 0),
    (r"\boxed{0}", "0", 1),
    ("#### 1,000", "1000", 1),
    ("#### 72", "72", 1),
    (r"\boxed{10}", "11", 0),
    (r"\boxed{18}", "She sells 16 - 3 - 4 = 9 eggs for 9 * 2 = 18 dollars.\n#### 18", 1),
    (r"\boxed{17}", "She sells 16 - 3 - 4 = 9 eggs for 9 * 2 = 18 dollars.\n#### 18", 0),
    # expressions and equations
    (r"\boxed{a+b}", "b+a", 1),
    (r"\boxed{3x+2}", "2+3x", 1),
    (r"\boxed{x^2-1}", "(x-1)(x+1)", 1),
    (r"\boxed{x^2+1}", "(x-1)(x+1)", 0),
    (r"\boxed{x = 3}", "3", 1),
    # the last marker wins; no marker or a truncated box scores 0
    (r"The answer is 4. Wait, I slipped: \boxed{5}", "5", 1),
    (r"\boxed{5}. Hmm, no: the answer is 4.", "5", 0),
    ("It is clearly 5, I think", "5", 0),
    (r"\boxed{\frac{1}{2}", "0.5", 0),
    # malformed LaTeX is wrong, even where a number could be read out of it
    (r"\boxed{1 +}", "1", 0),
    (r"\boxed{\left( 1 + \right}", "1", 0),
    (r"\boxed{2^}", "2", 0),
    (r"\boxed{3 \cdot}", "3", 0),
    (r"\boxed{\left( 1 \right)}", "1", 1),  # the well-formed \left ... \right
]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
  mp = pytest.MonkeyPatch()
  mp.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))  # the forkserver's socket goes here
  with MathVerifierPool(num_workers=2, timeout_s=2.0) as p:
    yield p
  mp.undo()


@pytest.mark.parametrize("text, answer", [
    (r"We get \boxed{\frac{1}{\sqrt{2}}} here", r"\frac{1}{\sqrt{2}}"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\boxed {7}", "7"),
    ("The answer is 3.5. Let me check.", "3.5"),
    (r"so the final answer is $\frac{1}{2}$.", r"\frac{1}{2}"),
    ("Answer: 12", "12"),
    ("...\n#### 1,000\n", "1,000"),
    (r"\boxed{1} and then the answer is 2", "2"),
    (r"the answer is 2, or \boxed{3}", "3"),
    ("#### 4\nThe answer is 5", "5"),
    ("The answer is 72 dollars.", "72"),
    (r"\boxed{2 pi}", "2 pi"),  # pi is a number, not a unit
    (r"\boxed{}", None),
    (r"\boxed{unclosed", None),
    ("nothing here", None),
])
def test_extract_answer(text, answer):
  assert extract_answer(text) == answer


def test_hand_labels(pool):
  assert len(HAND_LABELLED) >= 40
  results = pool.score([r for r, _, _ in HAND_LABELLED], [g for _, g, _ in HAND_LABELLED])
  wrong = [(resp, ref, label, res) for (resp, ref, label), res in zip(HAND_LABELLED, results)
           if res.reward != label]
  assert not wrong, wrong
  for (_, _, label), res in zip(HAND_LABELLED, results):
    assert (res.reason == "correct") == (label == 1), res


def test_reasons(pool):
  # A lone backslash is the rare answer math-verify keeps nothing of (it falls back to the raw string otherwise).
  results = pool.score(["no marker", r"\boxed{5}", "The answer is \\", r"\boxed{5}"], ["5", "4", "3", "\\"])
  assert results[0] == RewardResult(0.0, "no final answer")
  assert results[1] == RewardResult(0.0, "wrong answer '5'")
  assert results[2] == RewardResult(0.0, "unparsable answer " + repr("\\"))
  assert results[3] == RewardResult(0.0, "unparsable reference " + repr("\\"))


def test_slow_item_times_out_and_pool_keeps_serving(pool):
  # 9^(9^9) has 370 million digits: sympy computes it in C, deaf to signals, for minutes.
  slow = r"\boxed{9^{9^{9}}}"
  before = {w.process.pid for w in pool._workers}  # pylint: disable=protected-access
  restarts = pool.restarts
  t0 = time.monotonic()
  results = pool.score([slow, r"\boxed{2}", "#### 3"], ["5", "2", "3"])
  elapsed = time.monotonic() - t0
  assert results[0] == RewardResult(0.0, "timeout after 2 s")
  assert [r.reward for r in results[1:]] == [1.0, 1.0]  # the other worker served the rest meanwhile
  assert elapsed < 2.0 + 1.5
  assert pool.restarts == restarts + 1
  after = {w.process.pid for w in pool._workers}  # pylint: disable=protected-access
  killed = before - after
  assert len(killed) == 1 and not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                      for p in killed)
  # The replacement starts and the pool keeps scoring, several rounds on.
  for _ in range(3):
    assert [r.reward for r in pool.score([r"\boxed{\frac{2}{4}}"] * 4, ["0.5"] * 4)] == [1.0] * 4


def test_close_stops_workers(tmp_path, monkeypatch):
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  p = MathVerifierPool(num_workers=1, timeout_s=5.0)
  assert p.score([r"\boxed{1}"], ["1"])[0].reward == 1.0
  pids = [w.process.pid for w in p._workers]  # pylint: disable=protected-access
  p.close()
  assert not any(psutil.pid_exists(pid) for pid in pids)
  with pytest.raises(RuntimeError, match="closed"):
    p.score(["x"], ["x"])
  with pytest.raises(ValueError, match="2 responses but 1 references"):
    MathVerifierPool.score(p, ["a", "b"], ["a"])


def test_worker_killed_while_starting_is_replaced(tmp_path, monkeypatch):
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  with MathVerifierPool(num_workers=1, timeout_s=5.0) as p:
    w = p._workers[0]  # pylint: disable=protected-access
    w.process.kill()  # it is still importing sympy: a second or more
    w.process.join(5)
    with pytest.raises(EOFError):  # else it had said "ready": not a death during start-up
      w.conn.recv()
    assert p.score([r"\boxed{\frac{1}{2}}", r"\boxed{3}"], ["0.5", "4"]) == [
        RewardResult(1.0, "correct"), RewardResult(0.0, "wrong answer '3'")]
    assert p.restarts == 1


# Worker processes that can never start: 1 MB of address space above their size at start does not hold sympy.
_UNSTARTABLE = functools.partial(MathVerifierPool, num_workers=1, memory_limit_mb=1, max_start_failures=2)


def test_workers_that_cannot_start_fail_after_bounded_retries(tmp_path, monkeypatch):
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  with _UNSTARTABLE() as p:
    with pytest.raises(RuntimeError, match="failed to start 3 times in a row; the last one: .*exit code 1"):
      p.score([r"\boxed{1}"], ["1"])
    assert p.restarts == 2


def test_verifier_failure_scores_zero_and_is_counted(tmp_path, monkeypatch):
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  monkeypatch.setattr(math_pool, "MathVerifierPool", _UNSTARTABLE)
  examples = [{"domain": "math", "answer": "1"}, {"domain": "arith", "answer": "7"}, {"domain": "math", "answer": "2"}]
  with Verifier() as verifier:
    for calls in (1, 2):  # the failed pool is dropped; the next call starts a fresh one, which fails alike
      rewards = verifier([r"\boxed{1}", "Answer: 7", r"\boxed{2}"], examples)
      np.testing.assert_array_equal(rewards, [0, 1, 0])  # the arith item is scored as usual
      assert verifier.failures == 2 * calls
      [(reason, count)] = [(r, c) for r, c in verifier.reasons.items() if r.startswith("verifier failure")]
      assert count == 2 * calls and "failed to start 3 times in a row" in reason, reason
