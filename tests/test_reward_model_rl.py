"""Reward models end to end at smoke size: experiments.train_rm trains both judges and writes the comparison; the
main job's RL scores with the CoT RM (rl.reward=cot_rm) and reports its time share; judges score the same on 8 fake
devices as on one."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from experiments import train, train_rm
from experiments.configs import arith as arith_config
from experiments.configs import rm as rm_config
from k15 import config as config_lib
from k15 import sharding
from k15.data import rm_data
from k15.rewards import reward_model as rm
from k15.rl import metrics as metrics_lib


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("rm"))
  config = config_lib.rm_config_from_config_dict(rm_config.get_config("smoke"))
  return workdir, config, train_rm.run(config, workdir)


def test_train_rm_writes_judges_and_the_comparison(rm_run):
  workdir, config, summary = rm_run
  for name in ("cot_rm/judge.json", "cot_rm/model.safetensors", "cot_rm/tokenizer.model", "value_rm/head.npz",
               "rm_eval.md", "cot_rm.jsonl", "value_rm.jsonl"):
    assert os.path.exists(os.path.join(workdir, name)), name
  table = summary["accuracy"]
  assert table["overall"]["n"] == config.data.n_eval
  assert set(train_rm.METHODS) <= set(table["overall"])
  # exact match is right on every canonical answer and every truncated response, by construction of the labels
  assert table["canonical"]["exact match"] == 1.0 and table["truncated"]["exact match"] == 1.0
  with open(os.path.join(workdir, "value_rm", "judge.json")) as f:
    assert json.load(f)["temperature"] > 0


def test_rl_smoke_run_with_the_cot_rm(rm_run, tmp_path):
  rm_dir, _, _ = rm_run
  config = arith_config.get_config("smoke")
  config.rl.reward = "cot_rm"
  config.rl.iterations = 2
  config.reward.rm_path = rm_dir
  workdir = str(tmp_path / "rl")
  summary = train.run(config_lib.from_config_dict(config), workdir)
  assert os.path.exists(os.path.join(workdir, "summary.md")) and 0 <= summary["k1.5 RL"]["accuracy"] <= 1
  rows = [r for r in metrics_lib.read_jsonl(os.path.join(workdir, "rl.jsonl")) if r.get("groups_trained")]
  assert rows and all(r["rm_time_s"] > 0 and 0 < r["rm_time_share"] < 1 for r in rows)
  assert all("rm_failures" in r for r in rows)


def _judge_pairs(n=24):
  from k15.data import arith  # pylint: disable=g-import-not-at-top
  return rm_data.generate_pairs(arith.generate(40, 7, (1, 2, 3, 4)), n, 7)


def test_judges_score_the_same_on_8_devices_as_on_1(rm_run):
  workdir, config, _ = rm_run
  assert jax.device_count() >= 8
  pairs = _judge_pairs()
  texts = [p["response"] for p in pairs]
  rollout = dataclasses.replace(config.sampling, backend="model", num_slots=8)
  out = {}
  for name, mesh in (("1", sharding.make_mesh({"data": 1}, jax.devices()[:1])),
                     ("8", sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))):
    kw = dict(mesh=mesh, rules=config.sharding.logical_axis_rules, sampling_rules=config.sharding.sampling_rules)
    cot = rm.load_judge(os.path.join(workdir, "cot_rm"), rollout=rollout, **kw)
    value = rm.load_judge(os.path.join(workdir, "value_rm"), **kw)
    if name == "8":  # the judge's params are split over the mesh like the policy's
      specs = {str(x.sharding.spec) for x in jax.tree.leaves(cot.params)}
      assert any("tensor" in s or "fsdp" in s for s in specs), specs
    out[name] = dict(cot=[r.reward for r in cot.score(texts, pairs)], text=list(cot.last_outputs),
                     logits=value.logits(texts, pairs),
                     value=[r.reward for r in value.score(texts, pairs)])
  assert out["8"]["cot"] == out["1"]["cot"]
  assert out["8"]["text"] == out["1"]["text"]
  np.testing.assert_allclose(out["8"]["logits"], out["1"]["logits"], rtol=1e-4, atol=1e-4)
  assert out["8"]["value"] == out["1"]["value"]


def test_cot_rm_continues_from_a_saved_judge(rm_run, tmp_path):
  """cot_init: the saved judge's params start the CoT RM; another tokenizer or model shape is refused by name."""
  workdir, config, _ = rm_run
  spm = os.path.join(workdir, "data", "spm.model")
  saved = os.path.join(workdir, "cot_rm")
  params = train_rm.load_judge_params(config, saved, spm)
  jax.tree.map(np.testing.assert_array_equal, params, rm.load_judge_files(saved)[2])
  other_spm = tmp_path / "other.model"
  other_spm.write_bytes(open(spm, "rb").read() + b"x")
  with pytest.raises(ValueError, match="tokenizer differs"):
    train_rm.load_judge_params(config, saved, str(other_spm))
  wider = dataclasses.replace(config, model=dataclasses.replace(config.model, d_ff=2 * config.model.d_ff))
  with pytest.raises(ValueError, match="d_ff"):
    train_rm.load_judge_params(wider, saved, spm)
  # 20 more steps from the trained judge end below where the 20 from scratch ended
  again = dataclasses.replace(config, cot_init=saved)
  os.symlink(os.path.join(workdir, "data"), tmp_path / "data")
  tokenizer, train_pairs, _, _ = train_rm.load_data(again, str(tmp_path))
  train_rm.train_cot(again, str(tmp_path), train_rm.make_trainer(again), tokenizer, train_pairs)
  last = lambda d: metrics_lib.read_jsonl(os.path.join(d, "cot_rm.jsonl"))[-1]
  assert last(str(tmp_path))["step"] == last(workdir)["step"] == config.cot.steps
  assert last(str(tmp_path))["loss"] < last(workdir)["loss"]


def test_ablation_variant_rewards_with_the_reward_model(rm_run, tmp_path):
  """The cot_rm variant of experiments.ablation (and so of the seeds sweep) scores RL with the judge, and evaluates
  held-out accuracy with the rules."""
  from experiments import ablation  # pylint: disable=g-import-not-at-top
  rm_dir, _, _ = rm_run
  config = arith_config.get_config("smoke")
  config.rl.iterations = 2
  config.reward.rm_path = rm_dir
  setup = ablation.prepare(config, str(tmp_path))
  result = ablation.run_variant(setup, "cot_rm", ablation.VARIANTS["cot_rm"])
  assert "reward cot_rm" in result["description"] and 0 <= result["eval"]["accuracy"] <= 1
  rows = [r for r in metrics_lib.read_jsonl(str(tmp_path / "variants" / "cot_rm" / "rl.jsonl"))
          if r.get("groups_trained")]
  assert rows and all(r["rm_time_s"] > 0 for r in rows)
