"""The local launcher runs the main job's multi-host code path: 2 processes x 4 CPU devices give the same RL
metrics as 1 process x 8 devices, each reward is verified by one process, hosts that disagree stop the run naming
the iteration and the field, and a SIGTERM stops the run with a checkpoint that a rerun resumes exactly."""
import collections
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from k15.rl import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join("tests", "helpers", "pods_train.py")

# The synthetic task at its smallest: no warm-up (random params), 4 RL iterations with partial rollouts, and a
# length penalty from the first iteration so that rewards, advantages and gradients are not all zero.
FLAGS = [
    "--config=experiments/configs/arith.py:smoke", "--config.model.n_layers=1", "--config.sft.steps=0",
    "--config.data.n_train=64", "--config.data.n_eval=4", "--config.eval.max_response_len=8",
    "--config.eval.sampled_temperature=0", "--config.rl.iterations=4", "--config.rl.prompts_per_iteration=4",
    "--config.rl.max_response_len=32", "--config.rl.token_budget=16", "--config.sampling.num_slots=16",
    "--config.rl.length_penalty_weight=0.5", "--config.rl.length_penalty_warmup=0", "--config.checkpoint.every=100",
]
TWO_SLICES = ["--config.mesh.dcn_data=2"]  # on 2 processes: each process's devices are one slice of a hybrid mesh


def _launch(num_processes, devices, workdir, command=None):
  command = command or [sys.executable, "-m", "experiments.train", *FLAGS, f"--workdir={workdir}"]
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "K15_NUM_PROCESSES")}
  return subprocess.Popen([sys.executable, "-m", "launch.local", f"--num_processes={num_processes}",
                           f"--devices_per_process={devices}", "--", *command],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)  # its own process group: _output kills the whole run on a timeout


def _output(proc, timeout):
  """The launcher's output once it exits. A run that outlives `timeout` (a hang, or a very loaded machine) is
  killed with its processes (jax's preemption service keeps them alive through SIGTERM), and the test fails."""
  try:
    return proc.communicate(timeout=timeout)[0]
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    log = proc.communicate()[0]
    pytest.fail(f"{' '.join(proc.args[:8])} ... still running after {timeout} s; killed. Its output:\n{log[-4000:]}")


def _counted(workdir, log_dir):
  os.makedirs(log_dir, exist_ok=True)
  return [sys.executable, HELPER, "count", log_dir, *FLAGS, *TWO_SLICES, f"--workdir={workdir}"]


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
  """1 process x 8 devices (experiments.train), and 2 processes x 4 devices on two slices with counting verifiers,
  run concurrently (most of the time is compilation)."""
  root = tmp_path_factory.mktemp("reference_runs")
  dirs = {"1x8": str(root / "1x8"), "2x4": str(root / "2x4"), "counts": str(root / "counts")}
  procs = [_launch(1, 8, dirs["1x8"]), _launch(2, 4, None, _counted(dirs["2x4"], dirs["counts"]))]
  try:
    logs = [_output(p, 900) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:  # the other run, when one timed out
        os.killpg(p.pid, signal.SIGKILL)
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]
  return dirs, logs[1]


def test_two_processes_match_one_process(reference_runs, untimed):
  dirs, two_log = reference_runs
  one_dir, two_dir = dirs["1x8"], dirs["2x4"]
  assert "[1] " in two_log and two_log.count("wall time") == 2, two_log[-2000:]  # both processes ran to the end
  assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in two_log  # 'data' spans both slices

  one = metrics_lib.read_jsonl(os.path.join(one_dir, "rl.jsonl"))
  two = metrics_lib.read_jsonl(os.path.join(two_dir, "rl.jsonl"))
  assert [r["step"] for r in one] == [1, 2, 3, 4] and [r["step"] for r in two] == [1, 2, 3, 4]  # process 0 writes
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
  for name in ("final/model.safetensors", "checkpoints/4", "data/spm.model"):  # written once, by process 0
    assert os.path.exists(os.path.join(two_dir, name)), name


def _calls(path):
  with open(path) as f:
    return [[tuple(item) for item in json.loads(line)] for line in f]


def test_each_reward_is_verified_by_exactly_one_process(reference_runs):
  """Every batch the run scores (RL rewards and held-out evaluations) is split: the items the two processes'
  verifiers check add up to the batch, each item once."""
  dirs, _ = reference_runs
  outer = [_calls(os.path.join(dirs["counts"], f"outer.{p}.jsonl")) for p in (0, 1)]
  inner = [_calls(os.path.join(dirs["counts"], f"inner.{p}.jsonl")) for p in (0, 1)]
  assert outer[0] == outer[1] and len(outer[0]) >= 5  # the same batches on both: evaluations and RL iterations
  assert len(inner[0]) == len(inner[1]) == len(outer[0])
  for batch, mine, theirs in zip(outer[0], inner[0], inner[1]):
    assert mine and theirs  # both processes did work
    assert collections.Counter(mine) + collections.Counter(theirs) == collections.Counter(batch)


def test_hosts_that_disagree_on_rewards_stop_within_seconds(tmp_path):
  """Every process verifies every item itself and process 1 scores one item of an RL batch differently: the run
  stops with an error naming the iteration and the rewards, instead of drifting apart and hanging."""
  proc = _launch(2, 4, None, [sys.executable, HELPER, "disagree", *FLAGS, f"--workdir={tmp_path / 'run'}"])
  log = _output(proc, 600)
  stopped = time.time()
  assert proc.returncode != 0, log[-4000:]
  injected = [float(t) for t in re.findall(r"injected a different reward at ([0-9.]+)", log)]
  assert injected, log[-4000:]
  assert stopped - injected[0] < 60, (stopped - injected[0], log[-4000:])
  error = re.search(r"HostDisagreement: iteration (\d+): the processes disagree on ([^.]*)", log)
  assert error, log[-4000:]
  assert "rewards (process 1 differs from process 0)" in error.group(2)
  rows = metrics_lib.read_jsonl(str(tmp_path / "run" / "rl.jsonl"))
  assert [r["step"] for r in rows] == list(range(1, int(error.group(1))))  # the bad iteration was not logged


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes_exactly(reference_runs, tmp_path, untimed):
  """SIGTERM to the launcher (both processes) during RL: every process stops after the same iteration, saves it
  and exits 0; the rerun resumes there, and its metrics equal the uninterrupted run's."""
  dirs, _ = reference_runs
  workdir, counts = str(tmp_path / "run"), str(tmp_path / "counts")
  proc = _launch(2, 4, None, _counted(workdir, counts))
  lines = []
  for line in proc.stdout:  # until process 0 has logged RL iteration 1
    lines.append(line)
    if line.startswith("[0] [rl 1/4"):
      proc.send_signal(signal.SIGTERM)
      break
  log = "".join(lines) + _output(proc, 600)
  assert proc.returncode == 0, log[-4000:]
  stop = re.findall(r"preempted: stopped after RL iteration (\d+)", log)
  assert len(stop) == 2 and stop[0] == stop[1], log[-4000:]  # both processes, the same iteration
  stopped_at = int(stop[0])
  assert 1 <= stopped_at < 4 and os.path.isdir(os.path.join(workdir, "checkpoints", str(stopped_at)))
  assert not os.path.exists(os.path.join(workdir, "final"))  # RL did not finish

  proc = _launch(2, 4, None, _counted(workdir, counts))
  log = _output(proc, 600)
  assert proc.returncode == 0, log[-4000:]
  assert f"resumed RL from iteration {stopped_at}" in log
  resumed = metrics_lib.read_jsonl(os.path.join(workdir, "rl.jsonl"))
  uninterrupted = metrics_lib.read_jsonl(os.path.join(dirs["2x4"], "rl.jsonl"))
  assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted] == [1, 2, 3, 4]
  for a, b in zip(resumed, uninterrupted):
    assert untimed(a) == pytest.approx(untimed(b), rel=1e-5, abs=1e-6), a["step"]


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
  log = _output(proc, 900)
  assert proc.returncode == 0, log[-4000:]
  assert "[0] process 0: placed and gathered OK" in log and "[1] process 1: placed and gathered OK" in log
