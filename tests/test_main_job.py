"""The main job end to end at smoke size: its outputs, exact resume (also after a kill), and what keeps a workdir
sound: the divergence guard, the recorded config, complete stage outputs and load errors that name the file."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import train
from experiments.configs import arith as arith_config
from k15 import checkpoint
from k15 import config as config_lib
from k15.rl import loop
from k15.rl import metrics as metrics_lib
from k15.rl.trainer import DivergenceError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(**rl):
  config = arith_config.get_config("smoke")
  config.rl.update(rl)
  return config_lib.from_config_dict(config)


def _copy(src, dst, parts=("data", "warmup")):
  """A workdir holding `parts` of another one (by default its task and warm-up: a run that starts at RL)."""
  os.makedirs(dst)
  for part in parts:
    (shutil.copytree if os.path.isdir(os.path.join(src, part)) else shutil.copy)(os.path.join(src, part),
                                                                                 os.path.join(dst, part))
  return dst


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  summary = train.run(smoke_config(), workdir)
  return workdir, summary


def test_main_job_writes_its_outputs(full_run):
  workdir, summary = full_run
  for name in ("summary.json", "summary.md", "rl.jsonl", "sft.jsonl", "rl_curves.png", "warmup/config.json",
               "final/model.safetensors"):
    assert os.path.exists(os.path.join(workdir, name)), name
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "rl.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3]
  for key in ("accuracy", "reward", "response_len_mean", "response_len_max", "slot_utilization", "tokens_per_s",
              "finish_eos", "length_penalty_share"):
    assert all(key in r for r in rows if r.get("groups_trained")), key
  for name in ("long-CoT warm-up (SFT)", "k1.5 RL"):
    assert 0.0 <= summary[name]["accuracy"] <= 1.0 and summary[name]["mean_tokens"] > 0


def test_resume_continues_exactly(full_run, tmp_path, untimed):
  full_dir, _ = full_run
  workdir = str(tmp_path / "resumed")
  os.makedirs(workdir)
  for part in ("data", "warmup"):  # the same warm-up as the full run: resume concerns RL
    shutil.copytree(os.path.join(full_dir, part), os.path.join(workdir, part))
  train.run(smoke_config(iterations=2), workdir)  # "stopped" after iteration 2
  train.run(smoke_config(iterations=3), workdir)  # resumed from its checkpoint
  full = metrics_lib.read_jsonl(os.path.join(full_dir, "rl.jsonl"))
  resumed = metrics_lib.read_jsonl(os.path.join(workdir, "rl.jsonl"))
  assert [r["step"] for r in resumed] == [1, 2, 3]
  for a, b in zip(full, resumed):
    assert untimed(a) == pytest.approx(untimed(b), rel=1e-5, abs=1e-6), a["step"]


def test_divergence_stops_the_run_and_saves_nothing_of_it(full_run, tmp_path):
  full_dir, _ = full_run
  workdir = _copy(full_dir, str(tmp_path / "fresh"))
  with pytest.raises(DivergenceError, match=r"RL diverged at iteration \d: \d training steps had a non-finite"):
    train.run(smoke_config(learning_rate=1e30), workdir)
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "rl.jsonl"))
  assert sum(r.get("loss/skipped", 0) for r in rows) > 0
  assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == []
  assert not os.path.exists(os.path.join(workdir, "final"))

  # A finished run continued with the harmful learning rate: its checkpoints and final model stay as they were.
  workdir = _copy(full_dir, str(tmp_path / "continued"), ("data", "warmup", "checkpoints", "final", "config.json",
                                                          "warmup_eval.json", "rl.jsonl"))
  final_before = open(os.path.join(workdir, "final", "model.safetensors"), "rb").read()
  with pytest.raises(DivergenceError, match=r"RL diverged at iteration \d+: .*rl.max_bad_steps=1"):
    train.run(smoke_config(learning_rate=1e30, iterations=20, max_bad_steps=1), workdir, allow_config_change=True)
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "rl.jsonl"))
  first_bad = min(r["step"] for r in rows if r.get("loss/skipped"))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=2)
  assert ckpt.all_steps() and max(ckpt.all_steps()) < first_bad  # saved only before the divergence
  trainer, config = train.make_trainer(smoke_config()), smoke_config()
  params = trainer.init_params(jax.random.PRNGKey(0))
  like = (params, trainer.init_opt_state(loop.rl_optimizer(config.rl), params))
  for step in ckpt.all_steps():
    restored, _ = ckpt.restore(step, like)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored))
  ckpt.close()
  assert open(os.path.join(workdir, "final", "model.safetensors"), "rb").read() == final_before
  checkpoint.load_hf(os.path.join(workdir, "final"))  # finite (it checks)


def test_nothing_non_finite_is_saved(tmp_path):
  params = {"w": np.array([1.0, np.nan], np.float32), "b": np.zeros(2, np.float32)}
  with pytest.raises(checkpoint.CheckpointError, match=r"c/1: non-finite values in \['w'\]$"):
    checkpoint.Checkpointer(str(tmp_path / "c"), keep=1).save(1, params, {})
  cfg = smoke_config().model
  with pytest.raises(checkpoint.CheckpointError, match="non-finite"):
    checkpoint.save_hf(str(tmp_path / "hf"), cfg, jax.tree.map(lambda x: x * np.nan,
                                                                 train.make_trainer(smoke_config()).init_params(
                                                                     jax.random.PRNGKey(0))))
  assert not os.path.exists(tmp_path / "hf")


def test_a_rerun_with_another_config_fails_at_once(full_run, tmp_path):
  full_dir, _ = full_run
  workdir = _copy(full_dir, str(tmp_path / "other"), ("data", "warmup", "checkpoints", "config.json"))
  config = arith_config.get_config("smoke")
  config.seed = 1
  with pytest.raises(ValueError, match=r"another config; differing fields: seed: 0 -> 1"):
    train.run(config_lib.from_config_dict(config), workdir)
  start = time.time()
  proc = subprocess.run([sys.executable, "-m", "experiments.train", "--config=experiments/configs/arith.py:smoke",
                         "--config.model.d_model=32", f"--workdir={workdir}"], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode != 0 and "model.d_model: 64 -> 32" in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(os.path.join(workdir, "rl.jsonl")) and time.time() - start < 120
  # A longer schedule is the same run.
  assert train.record_config(smoke_config(iterations=5), workdir) is None


def _tensorboard_steps(workdir, tag):
  from tensorflow.compat.v1 import train as tf_train  # pylint: disable=g-import-not-at-top
  steps = []
  for events in sorted(glob.glob(os.path.join(workdir, "tensorboard", "rl", "events.out.tfevents.*"))):
    for event in tf_train.summary_iterator(events):
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return steps


def test_kill_between_checkpoints_then_resume(full_run, tmp_path, untimed):
  full_dir, _ = full_run
  workdir = _copy(full_dir, str(tmp_path / "killed"))
  command = [sys.executable, "-m", "experiments.train", "--config=experiments/configs/arith.py:smoke",
             "--config.rl.iterations=5", "--config.checkpoint.every=2", f"--workdir={workdir}"]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
  proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  path = os.path.join(workdir, "rl.jsonl")
  while not (os.path.exists(path) and len(metrics_lib.read_jsonl(path)) >= 3):  # iteration 3: after checkpoint 2
    assert proc.poll() is None, "the run ended before it could be killed"
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert subprocess.run(command, cwd=REPO, env=env, capture_output=True).returncode == 0
  rows = metrics_lib.read_jsonl(path)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
  full = metrics_lib.read_jsonl(os.path.join(full_dir, "rl.jsonl"))
  for a, b in zip(full, rows):  # the uninterrupted run's rows
    assert untimed(a) == pytest.approx(untimed(b), rel=1e-5, abs=1e-6), a["step"]
  assert sorted(_tensorboard_steps(workdir, "accuracy")) == [1, 2, 3, 4, 5]


def test_load_errors_name_the_file(full_run, tmp_path):
  full_dir, _ = full_run
  model = shutil.copytree(os.path.join(full_dir, "final"), str(tmp_path / "model"))
  weights, config_json = os.path.join(model, "model.safetensors"), os.path.join(model, "config.json")
  data = open(weights, "rb").read()
  with open(weights, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(checkpoint.CheckpointError, match="model.safetensors"):
    checkpoint.load_hf(model)
  header = 8 + int.from_bytes(data[:8], "little")  # safetensors: header length, JSON header, raw tensors
  with open(weights, "wb") as f:
    f.write(data[:header] + np.full((len(data) - header) // 4, np.nan, np.float32).tobytes())
  with pytest.raises(checkpoint.CheckpointError, match=r"model.safetensors.*non-finite"):
    checkpoint.load_hf(model)
  text = open(config_json).read()
  with open(config_json, "w") as f:
    f.write(text[:len(text) // 2])
  with pytest.raises(checkpoint.CheckpointError, match="config.json"):
    checkpoint.load_hf(model)
  spm = str(tmp_path / "spm.model")
  with open(os.path.join(full_dir, "data", "spm.model"), "rb") as src, open(spm, "wb") as f:
    f.write(src.read()[:100])
  from k15.data import tokenizer  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="spm.model"):
    tokenizer.SentencePieceTokenizer(spm)


def test_a_truncated_latest_checkpoint_resumes_from_the_one_before(full_run, tmp_path, capsys, untimed):
  full_dir, _ = full_run
  workdir = _copy(full_dir, str(tmp_path / "truncated"), ("data", "warmup", "checkpoints", "warmup_eval.json",
                                                          "rl.jsonl"))
  host = os.path.join(workdir, "checkpoints", "3", "host", "metadata")
  text = open(host).read()
  with open(host, "w") as f:
    f.write(text[:len(text) // 2])
  train.run(smoke_config(), workdir)
  out = capsys.readouterr().out
  assert "checkpoints/3: cannot restore" in out and "resumed RL from iteration 2" in out
  assert "after warm-up" in out and "warm-up checkpoint found" in out  # the warm-up's evaluation was not redone
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "rl.jsonl"))
  full = metrics_lib.read_jsonl(os.path.join(full_dir, "rl.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert untimed(rows[2]) == pytest.approx(untimed(full[2]), rel=1e-5, abs=1e-6)


def test_an_incomplete_stage_is_redone(full_run, tmp_path):
  full_dir, _ = full_run
  workdir = _copy(full_dir, str(tmp_path / "incomplete"), ("data", "warmup"))
  os.remove(os.path.join(workdir, "warmup", "model.safetensors"))  # killed while writing: config.json only
  os.remove(os.path.join(workdir, "warmup", checkpoint.COMPLETE))
  config = smoke_config(iterations=1)
  trainer = train.make_trainer(config)
  tokenizer, train_set, _ = train.load_task(config, workdir)
  train.load_or_train_warmup(config, workdir, trainer, tokenizer, train_set)
  assert checkpoint.is_complete(os.path.join(workdir, "warmup"))
  assert open(os.path.join(workdir, "warmup", "model.safetensors"), "rb").read() == open(
      os.path.join(full_dir, "warmup", "model.safetensors"), "rb").read()  # the same warm-up, written whole
