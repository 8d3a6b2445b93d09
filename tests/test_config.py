"""Experiment configs: flag overrides, clear errors for unknown keys and wrong types; a light `import k15`."""
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from k15 import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARITH = os.path.join(REPO, "experiments", "configs", "arith.py")


def parse(*overrides, variant=""):
  argv = ["train", f"--config={ARITH}{':' + variant if variant else ''}", *overrides]
  fv = flags.FlagValues()  # override flags are discovered from argv when --config is defined
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def test_overrides_reach_the_model_config():
  config = parse("--config.model.n_layers=4", "--config.rl.tau=0.25", "--config.rl.loss=grpo")
  assert config.model.n_layers == 4 and config.rl.tau == 0.25 and config.rl.loss == "grpo"
  cfg = models.ModelConfig.from_dict(config.model)
  assert cfg.n_layers == 4 and cfg.vocab_size == config.model.vocab_size


def test_smoke_variant_is_smaller():
  full, smoke = parse(), parse(variant="smoke")
  assert smoke.rl.iterations < full.rl.iterations and smoke.sft.steps < full.sft.steps


def test_unknown_key_is_a_clear_error():
  with pytest.raises((flags.Error, AttributeError), match='n_layerz.*Did you mean "n_layers"'):
    parse("--config.model.n_layerz=4")


def test_wrong_type_is_a_clear_error():
  with pytest.raises(flags.Error, match="n_layers"):
    parse("--config.model.n_layers=four")


def test_unknown_model_field_in_a_config_file_is_named():
  config = parse().model.to_dict()
  config["n_layerz"] = 3
  with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['n_layerz'\]"):
    models.ModelConfig.from_dict(config)


def test_invalid_model_values_are_named():
  with pytest.raises(ValueError, match="n_kv_heads=3 must divide n_heads=4"):
    models.ModelConfig(n_heads=4, n_kv_heads=3)
  with pytest.raises(ValueError, match="param_dtype"):
    models.ModelConfig(param_dtype="float16")


def test_train_entry_point_rejects_unknown_key():
  proc = subprocess.run([sys.executable, "-m", "experiments.train", f"--config={ARITH}",
                         "--config.rl.taux=1", "--workdir=/nonexistent"], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode != 0 and "taux" in proc.stderr


def test_import_k15_stays_light():
  code = ("import sys, k15, k15.models, k15.sharding\n"
          "heavy = [m for m in ('tensorflow', 'torch', 'seqio') if m in sys.modules]\n"
          "assert not heavy, heavy\n")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
