"""Experiment configs: flag overrides, clear errors for unknown keys and wrong types; a light `import k15`."""
import ast
import dataclasses
import importlib
import os
import re
import subprocess
import sys
import typing

import pytest
from absl import flags
from ml_collections import config_flags

from k15 import config as config_lib
from k15 import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARITH = os.path.join(REPO, "experiments", "configs", "arith.py")


def parse(*overrides, variant=""):
  argv = ["train", f"--config={ARITH}{':' + variant if variant else ''}", *overrides]
  fv = flags.FlagValues()  # override flags are discovered from argv when --config is defined
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def test_overrides_reach_the_typed_config():
  config = parse("--config.model.n_layers=4", "--config.rl.tau=0.25", "--config.rl.loss=grpo")
  typed = config_lib.from_config_dict(config)
  assert typed.model.n_layers == 4 and typed.rl.tau == 0.25 and typed.rl.loss == "grpo"
  assert typed.model.vocab_size == config.model.vocab_size and typed.hf_path == ""


def test_smoke_variant_is_smaller():
  full, smoke = parse(), parse(variant="smoke")
  assert smoke.rl.iterations < full.rl.iterations and smoke.sft.steps < full.sft.steps


def test_unknown_key_is_a_clear_error():
  with pytest.raises((flags.Error, AttributeError), match='n_layerz.*Did you mean "n_layers"'):
    parse("--config.model.n_layerz=4")


def test_wrong_type_is_a_clear_error():
  with pytest.raises(flags.Error, match="n_layers"):
    parse("--config.model.n_layers=four")


def test_unknown_field_in_a_config_file_is_named():
  config = parse().to_dict()
  config["model"]["n_layerz"] = 3
  with pytest.raises(config_lib.ConfigError, match=r"config.model.n_layerz: unknown field; did you mean 'n_layers'"):
    config_lib.from_config_dict(config)


def test_invalid_model_values_are_named():
  with pytest.raises(ValueError, match="n_kv_heads=3 must divide n_heads=4"):
    models.ModelConfig(n_heads=4, n_kv_heads=3)
  with pytest.raises(ValueError, match="param_dtype"):
    models.ModelConfig(param_dtype="float16")


def test_import_k15_stays_light():
  code = ("import sys, k15, k15.models, k15.sharding\n"
          "heavy = [m for m in ('tensorflow', 'torch', 'seqio') if m in sys.modules]\n"
          "assert not heavy, heavy\n")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


CONFIG_DIR = os.path.join(REPO, "experiments", "configs")
SHARED = ("architectures.py", "loss.py")  # building blocks of the configs, not configs
CONFIG_FILES = sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                      if f.endswith(".py") and f not in ("__init__.py", *SHARED))


def _load(name):
  return importlib.import_module(f"experiments.configs.{name}")


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_and_variant_builds_on_its_own(name):
  with open(os.path.join(CONFIG_DIR, f"{name}.py")) as f:
    tree = ast.parse(f.read())
  imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  others = sorted(m for m in imported if m.startswith("experiments.configs")
                  and m.rsplit(".", 1)[-1] + ".py" not in SHARED)
  assert not others, f"{name}.py builds on other configs: {others}"
  module = _load(name)
  assert module.VARIANTS
  build = getattr(config_lib, getattr(module, "BUILD", "from_config_dict"))  # reward models: their own config
  for variant in module.VARIANTS:
    typed = build(module.get_config(variant))
    assert typed.model.num_params() > 0
  with pytest.raises(ValueError, match="unknown config variant"):
    module.get_config("no-such-variant")


def _sections(cls=config_lib.Config, seen=None):
  """Every dataclass reachable from cls's fields (the typed config's sections)."""
  seen = {} if seen is None else seen
  seen[cls.__name__] = cls
  for hint in typing.get_type_hints(cls).values():
    for t in (hint,) + typing.get_args(hint) + tuple(a for x in typing.get_args(hint) for a in typing.get_args(x)):
      if dataclasses.is_dataclass(t) and t.__name__ not in seen:
        _sections(t, seen)
  return seen


def _attributes_read(paths, skip_functions=("__post_init__",)):
  """Attribute names read anywhere in the given files, outside functions named in skip_functions (checks)."""
  names = set()

  def visit(node):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in skip_functions:
      return
    if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
      names.add(node.attr)
    for child in ast.iter_child_nodes(node):
      visit(child)

  for path in paths:
    with open(path) as f:
      visit(ast.parse(f.read()))
  return names


def unread_fields(sections) -> list:
  """Fields of the typed sections that no code in k15/ or experiments/ (not the config files) reads."""
  paths = [os.path.join(root, f) for top in ("k15", "experiments")
           for root, _, files in os.walk(os.path.join(REPO, top))
           for f in files if f.endswith(".py") and os.sep + "configs" not in root]
  read = _attributes_read(paths)
  return [f"{name}.{f.name}" for name, cls in sorted(sections.items()) for f in dataclasses.fields(cls)
          if f.name not in read]


def test_every_config_field_is_read_somewhere():
  sections = _sections(config_lib.RMTrainConfig, _sections())
  assert {"RLConfig", "RolloutConfig", "ArithDataConfig", "PromptDataConfig", "Long2ShortConfig", "ModelConfig",
          "CurriculumStage", "PromptFile"} <= set(sections)
  assert unread_fields(sections) == []
  dead = dataclasses.make_dataclass("DeadConfig", [("max_len_nobody_reads", int), ("iterations", int)])
  assert unread_fields({"DeadConfig": dead}) == ["DeadConfig.max_len_nobody_reads"]


@pytest.mark.parametrize("override, message", [
    ("checkpoint.every=0", "config.checkpoint.every: must be >= 1, got 0"),
    ("checkpoint.keep=0", "config.checkpoint.keep: must be >= 1, got 0"),
    ("rl.minibatches=0", "config.rl.minibatches: must be >= 1, got 0"),
    ("rl.prompts_per_iteration=0", "config.rl.prompts_per_iteration: must be >= 1, got 0"),
    ("rl.samples_per_prompt=0", "config.rl.samples_per_prompt: must be >= 1, got 0"),
    ("rl.iterations=-1", "config.rl.iterations: must be >= 1, got -1"),
    ("rl.token_budget=0", "config.rl.token_budget: must be >= 1, got 0"),
    ("rl.learning_rate=-1e-4", "config.rl.learning_rate: must be > 0"),
    ("rl.max_bad_steps=-1", "config.rl.max_bad_steps: must be >= 0"),
    ("sampling.num_slots=0", "config.sampling.num_slots: must be >= 1, got 0"),
    ("sampling.top_p=1.5", "config.sampling.top_p:"),
    ("sampling.temperature=0.0", "config.sampling.temperature: must be > 0"),
    ("sft.batch_size=0", "config.sft.batch_size: must be >= 1, got 0"),
    ("sft.steps=-1", "config.sft.steps: must be >= 0"),
    ("eval.max_response_len=0", "config.eval.max_response_len: must be >= 1"),
    ("data.n_eval=0", "config.data.n_eval: must be >= 1"),
    ("data.direct_prob=1.5", r"config.data.direct_prob: must be in \[0, 1\]"),
    ("data.level_shares=(0.5,)", r"config.data.level_shares: must be \(\) or one share >= 0 per level"),
    ("model.d_model=0", "config.model: ModelConfig.d_model must be positive"),
    ("mesh.fsdp=0", "config.mesh.fsdp: must be >= 1 or -1"),
    ("mesh.dcn_data=0", "config.mesh.dcn_data: must be >= 1, got 0"),
    ("rl.loss=ppo", "config.rl.loss: must be one of"),
    ("rl.samples_per_prompt=1", "config.rl.samples_per_prompt: must be >= 2 for loss 'k15': one sample is its own"),
    ("rl.minibatches=9", "config.rl.minibatches: 9 gradient steps cannot each take whole groups of 8 prompts"),
    ("rl.curriculum=((5, (1,)), (3, (2,)))", "config.rl.curriculum: curriculum stage 1: until_iteration=3 must"),
    ("data.tokenizer_vocab_size=256", "config.data.tokenizer_vocab_size: 256 exceeds model.vocab_size=128"),
])
def test_bad_values_are_rejected_naming_the_field(override, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.from_config_dict(parse(f"--config.{override}", variant="smoke"))


def test_one_sample_per_prompt_is_fine_for_rest():
  assert config_lib.from_config_dict(parse("--config.rl.samples_per_prompt=1", "--config.rl.loss=rest")).rl.loss == "rest"


@pytest.mark.parametrize("override, message", [
    ("--config.rl.nonexistent=1", r"config.rl.nonexistent is not a field of the config; valid: \['adam_eps'"),
    ("--config.rl.taux=1", "config.rl.taux is not a field of the config; did you mean 'tau'"),
    ("--config.rl.iterations=-1", "config.rl.iterations: must be >= 1, got -1"),
])
def test_the_entry_point_rejects_bad_config_before_any_work(override, message, tmp_path):
  workdir = tmp_path / "never"
  proc = subprocess.run([sys.executable, "-m", "experiments.train", f"--config={ARITH}:smoke", override,
                         f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and re.search(message, proc.stderr), proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and not workdir.exists()
