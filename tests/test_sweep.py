"""The seeds runner at smoke size (2 seeds x 2 variants x 2 iterations): resume after a kill, the report's means and
intervals against values worked by hand from the runs' own files, and its flags' errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments import sweep
from experiments.configs import arith
from k15 import config as config_lib
from k15.rl.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARITH = os.path.join(REPO, "experiments", "configs", "arith.py")
T_975_1DF = 12.706204736  # Student's t, 97.5% quantile, 1 degree of freedom: two seeds
VARIANTS = ["k15", "full_rollouts"]
# Tiny runs: responses of at most 32 tokens with a budget of 16, so partial rollouts cut some and full ones none.
SMOKE = ["--config.rl.iterations=2", "--config.eval.every=1", "--config.sft.steps=2", "--config.sft.warmup_steps=1",
         "--config.eval.sampled_temperature=0.0", "--config.rl.max_response_len=32", "--config.rl.token_budget=16",
         "--config.eval.max_response_len=32", "--config.data.n_train=200", "--config.data.n_eval=8",
         "--config.rl.prompts_per_iteration=4", "--config.rl.samples_per_prompt=2", "--config.sampling.num_slots=8"]


def _command(workdir, *extra):
  return [sys.executable, "-m", "experiments.sweep", f"--config={ARITH}:smoke", f"--workdir={workdir}", "--seeds=2",
          f"--variants={','.join(VARIANTS)}", "--report=smoke", *SMOKE, *extra]


def _env():
  return dict(os.environ, XLA_FLAGS="",  # one CPU device: the 8 fake devices of conftest only slow a tiny model down
              PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  """The sweep killed once its first run has finished, then run again to the end: (workdir, first run's
  result.json text and mtime before the second command, the second command's output)."""
  workdir = str(tmp_path_factory.mktemp("sweep"))
  log_path = os.path.join(workdir, "killed.log")
  first = os.path.join(workdir, "seed_0", "variants", "k15", "result.json")
  with open(log_path, "w") as log:
    proc = subprocess.Popen(_command(workdir), cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 600
    while not os.path.exists(first):
      if proc.poll() is not None or time.time() > deadline:
        proc.kill()
        pytest.fail(f"the sweep stopped before its first run finished:\n{open(log_path).read()[-3000:]}")
      time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  assert not os.path.exists(os.path.join(workdir, "smoke.json")), "killed before the report"
  with open(first) as f:
    first_text = f.read()
  first_mtime = os.stat(first).st_mtime_ns
  done = subprocess.run(_command(workdir), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir, first_text, first_mtime, done.stdout


def _result(workdir, seed, variant):
  with open(os.path.join(workdir, f"seed_{seed}", "variants", variant, "result.json")) as f:
    return json.load(f)


def _rows(workdir, seed, variant):
  return read_jsonl(os.path.join(workdir, f"seed_{seed}", "variants", variant, "rl.jsonl"))


def test_resume_after_a_kill(swept):
  workdir, first_text, first_mtime, _ = swept
  first = os.path.join(workdir, "seed_0", "variants", "k15", "result.json")
  with open(first) as f:
    assert f.read() == first_text and os.stat(first).st_mtime_ns == first_mtime, "a finished run was redone"
  for seed in (0, 1):
    for v in VARIANTS:
      assert [r["step"] for r in _rows(workdir, seed, v)] == [1, 2], (seed, v)  # each iteration once
      assert _result(workdir, seed, v)["iterations"] == 2
  # Seeds differ in data and initialisation: their warm-ups answer differently.
  warmups = [json.load(open(os.path.join(workdir, f"seed_{s}", "warmup_eval.json"))) for s in (0, 1)]
  assert warmups[0]["mean_tokens"] != warmups[1]["mean_tokens"]
  # Full rollouts never cut a sample; partial ones (budget 16 of 32) do.
  assert all(r["to_buffer"] == 0 and r["resumed"] == 0 for s in (0, 1) for r in _rows(workdir, s, "full_rollouts"))
  assert sum(r["to_buffer"] for s in (0, 1) for r in _rows(workdir, s, "k15")) > 0


def _hand_interval(a, b):
  """Mean and 95% interval of two values: mean +- t(0.975, 1) * |a - b| / 2."""
  half = T_975_1DF * abs(a - b) / 2
  return (a + b) / 2, (a + b) / 2 - half, (a + b) / 2 + half


def test_report_means_and_intervals_by_hand(swept):
  workdir, _, _, stdout = swept
  with open(os.path.join(workdir, "smoke.json")) as f:
    report = json.load(f)
  assert report["seeds"] == [0, 1] and report["reference"] == "k15"
  tokens = {v: [_result(workdir, s, v)["eval"]["mean_tokens"] for s in (0, 1)] for v in VARIANTS}
  for v in VARIANTS:
    got = report["final"][v]["mean_tokens"]
    assert (got["mean"], got["low"], got["high"]) == pytest.approx(_hand_interval(*tokens[v]), rel=1e-6)
  diff = [tokens["full_rollouts"][s] - tokens["k15"][s] for s in (0, 1)]  # paired: seed by seed
  got = report["differences"]["full_rollouts"]["mean_tokens"]
  assert (got["mean"], got["low"], got["high"]) == pytest.approx(_hand_interval(*diff), rel=1e-6)
  # Samples trained on: groups that completed, times 2 samples each, summed over the run's iterations.
  samples = [2 * sum(r.get("groups_trained", 0) for r in _rows(workdir, s, "k15")) for s in (0, 1)]
  got = report["final"]["k15"]["samples_seen"]
  assert (got["mean"], got["low"], got["high"]) == pytest.approx(_hand_interval(*samples), rel=1e-6)
  # Held-out accuracy at the evaluated iterations 0 (the warm-up), 1 and 2, from the runs' metrics.
  for step in (1, 2):
    acc = [next(r["eval_accuracy"] for r in _rows(workdir, s, "full_rollouts") if r["step"] == step) for s in (0, 1)]
    got = report["at_iteration"]["full_rollouts"][str(step)]
    assert (got["mean"], got["low"], got["high"]) == pytest.approx(_hand_interval(*acc), rel=1e-6, abs=1e-12)
  assert list(report["at_iteration"]["k15"]) == ["0", "1", "2"]
  # The markdown table shows the same numbers.
  with open(os.path.join(workdir, "smoke.md")) as f:
    table = f.read()
  mean, low, high = _hand_interval(*tokens["k15"])
  assert f"| {mean:.1f} [{low:.1f}, {high:.1f}] |" in table
  assert "| full_rollouts - k15 |" in table and table in stdout
  with open(os.path.join(workdir, "smoke.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_flags_are_named():
  config = config_lib.from_config_dict(arith.get_config("smoke"))
  ok = dict(seeds=2, variants=["k15", "rest"], report="r", seed_offset=0, reference="")
  assert sweep.check_args(config, **ok) == ("rl", [0, 1], "k15")
  assert sweep.check_args(config, **dict(ok, seed_offset=5, seeds=3))[1] == [5, 6, 7]
  for bad, message in ((dict(variants=["k15", "ppo"]), "--variants: unknown \\['ppo'\\]"),
                       (dict(variants=["k15", "rl_long"]), "--variants: RL variants \\['k15'\\] and long2short"),
                       (dict(variants=["merge", "long"]), "config.long2short.variants: 'merge' is built from"),
                       (dict(seeds=0), "--seeds must be >= 1"),
                       (dict(report="a/b"), "--report='a/b'"),
                       (dict(reference="grpo"), "--reference='grpo' is not one of --variants")):
    with pytest.raises(ValueError, match=message):
      sweep.check_args(config, **dict(ok, **bad))
  assert sweep.check_args(config, **dict(ok, variants=["long", "short", "merge"]))[0] == "long2short"


def test_the_command_rejects_bad_flags_before_any_work(tmp_path):
  workdir = tmp_path / "never"
  proc = subprocess.run(_command(workdir, "--variants=k15,ppo"), cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode != 0 and "--variants: unknown ['ppo']" in proc.stderr, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and not workdir.exists()
