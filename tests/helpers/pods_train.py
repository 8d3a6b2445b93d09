"""experiments.train with a verifier the multi-host tests inject (one process of a launch.local run).

  python tests/helpers/pods_train.py count <log dir> --config=... --workdir=...
      each process logs the items its verifier checks (inner.<process>.jsonl) and the batches it is asked to
      score (outer.<process>.jsonl); the rewards are shared as in experiments.train
  python tests/helpers/pods_train.py disagree --config=... --workdir=...
      every process verifies every item itself (no sharing), and process 1 flips the first reward of each RL batch
"""
import json
import os
import sys
import time

import jax

from experiments import cli, train
from k15.rewards.sandbox import SandboxConfig
from k15.rewards.shared import SharedVerifier
from k15.rewards.verifiers import Verifier
from k15.rl import loop


def _items(texts, examples):
  return [[t, ex["id"]] for t, ex in zip(texts, examples)]


def _log(path, items):
  with open(path, "a") as f:
    f.write(json.dumps(items) + "\n")


def counting(log_dir):
  p = jax.process_index

  class Counting(Verifier):
    def __call__(self, texts, examples):
      _log(os.path.join(log_dir, f"inner.{p()}.jsonl"), _items(texts, examples))
      return super().__call__(texts, examples)

  class Logged(SharedVerifier):
    def __call__(self, texts, examples):
      _log(os.path.join(log_dir, f"outer.{p()}.jsonl"), _items(texts, examples))
      return super().__call__(texts, examples)

  return lambda config, trainer=None, reward="rules": Logged(Counting(
      default_domain=config.reward.default_domain, sandbox_config=SandboxConfig(allow_unisolated=True)))


def disagreeing():
  armed = []  # non-empty while the loop computes an RL batch's rewards

  class Disagreeing(Verifier):
    def __call__(self, texts, examples):
      rewards = super().__call__(texts, examples)
      if armed and jax.process_index() == 1:
        rewards[0] = 1.0 - rewards[0]
        print(f"injected a different reward at {time.time():.3f}", flush=True)
      return rewards

  build_batch = loop.build_batch

  def armed_build_batch(*args, **kwargs):
    armed.append(True)
    try:
      return build_batch(*args, **kwargs)
    finally:
      armed.clear()

  loop.build_batch = armed_build_batch
  return lambda config, trainer=None, reward="rules": Disagreeing(default_domain=config.reward.default_domain)


if __name__ == "__main__":
  mode = sys.argv.pop(1)
  train.make_verifier = counting(sys.argv.pop(1)) if mode == "count" else disagreeing()
  cli.run(train.run, config_help="config", workdir_help="workdir", url_workdir=True)
