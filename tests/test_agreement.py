"""Host-side state compared across processes (k15.rl.agreement), shared rewards and the preemption watch on one
process; the multi-process behaviour is in test_launch_local.py."""
import os
import signal

import numpy as np

from k15 import preemption
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
    failures = 0

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
