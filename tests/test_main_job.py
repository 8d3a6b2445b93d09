"""The main job end to end at smoke size, and exact resume from an RL checkpoint."""
import json
import os
import shutil

import pytest

from experiments import train
from experiments.configs import arith as arith_config
from k15 import config as config_lib
from k15.rl import metrics as metrics_lib



def smoke_config(**rl):
  config = arith_config.get_config("smoke")
  config.rl.update(rl)
  return config_lib.from_config_dict(config)


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
