"""The local launcher runs the main job's multi-host code path: 2 processes x 4 CPU devices give the same RL
metrics as 1 process x 8 devices."""
import json
import os
import subprocess
import sys

import pytest

from k15.rl import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The synthetic task at its smallest: no warm-up (random params), 2 RL iterations with partial rollouts, and a
# length penalty from the first iteration so that rewards, advantages and gradients are not all zero.
FLAGS = [
    "--config=experiments/configs/arith.py:smoke", "--config.model.n_layers=1", "--config.sft.steps=0",
    "--config.data.n_train=64", "--config.data.n_eval=4", "--config.eval.max_response_len=8",
    "--config.eval.sampled_temperature=0", "--config.rl.iterations=2", "--config.rl.prompts_per_iteration=4",
    "--config.rl.max_response_len=32", "--config.rl.token_budget=16", "--config.sampling.num_slots=16",
    "--config.rl.length_penalty_weight=0.5", "--config.rl.length_penalty_warmup=0", "--config.checkpoint.every=100",
]


def _launch(num_processes, devices, workdir, command=None):
  command = command or [sys.executable, "-m", "experiments.train", *FLAGS, f"--workdir={workdir}"]
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "K15_NUM_PROCESSES")}
  return subprocess.Popen([sys.executable, "-m", "launch.local", f"--num_processes={num_processes}",
                           f"--devices_per_process={devices}", "--", *command],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def test_two_processes_match_one_process(tmp_path, untimed):
  one_dir, two_dir = str(tmp_path / "1x8"), str(tmp_path / "2x4")
  procs = [_launch(1, 8, one_dir), _launch(2, 4, two_dir)]  # concurrently: most of the time is compilation
  logs = [p.communicate(timeout=900)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]
  two_log = logs[1]
  assert "[1] " in two_log and two_log.count("wall time") == 2, two_log[-2000:]  # both processes ran to the end

  one = metrics_lib.read_jsonl(os.path.join(one_dir, "rl.jsonl"))
  two = metrics_lib.read_jsonl(os.path.join(two_dir, "rl.jsonl"))
  assert [r["step"] for r in one] == [1, 2] and [r["step"] for r in two] == [1, 2]  # only process 0 writes
  trained = [r for r in two if r.get("groups_trained")]
  assert trained and all(r["loss/grad_norm"] > 0 for r in trained)  # the comparison covers real updates
  for a, b in zip(one, two):
    assert set(a) == set(b), a["step"]
    assert untimed(b) == pytest.approx(untimed(a), rel=1e-5, abs=1e-6), a["step"]

  summaries = []
  for d in (one_dir, two_dir):
    with open(os.path.join(d, "summary.json")) as f:
      summaries.append(_flat({k: v for k, v in json.load(f).items() if k != "wall_time_s"}))
  assert "k1.5 RL/accuracy" in summaries[1] and summaries[1] == pytest.approx(summaries[0])  # held-out evaluations
  for name in ("final/model.safetensors", "checkpoints/2", "data/spm.model"):  # written once, by process 0
    assert os.path.exists(os.path.join(two_dir, name)), name


def test_params_placed_from_one_process_and_gathered_back(tmp_path):
  """Trainer.place_params from process-local arrays and from a HF checkpoint (config.model.hf_path), and
  sharding.to_host / make_eval across two processes."""
  import jax  # pylint: disable=g-import-not-at-top
  from k15 import models  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(REPO, "tests", "helpers"))
  import place_worker  # pylint: disable=g-import-not-at-top
  models.save_hf(str(tmp_path / "hf"), place_worker.CFG, models.init_params(place_worker.CFG, jax.random.PRNGKey(3)))
  proc = _launch(2, 4, None, [sys.executable, os.path.join("tests", "helpers", "place_worker.py"),
                              str(tmp_path / "hf")])
  log = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, log[-4000:]
  assert "[0] process 0: placed and gathered OK" in log and "[1] process 1: placed and gathered OK" in log
