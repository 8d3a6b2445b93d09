"""notebooks/loss_ablations.ipynb executed at smoke size, and the ablation helpers it drives."""
import json
import os

import nbformat
import pytest

from experiments.configs import arith
from experiments import ablation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "loss_ablations.ipynb")
SMOKE_VARIANTS = ["k15", "k15_token", "grpo"]
# A whole response fits one iteration's budget, so both iterations train; the smoke warm-up solves nothing, and the
# length penalty's rewards are what gives the losses a non-zero signal to differ on. A shorter warm-up and no
# sampled evaluation keep the run near a minute and a half of CPU (the table's sampled column is tested below).
SMOKE_OVERRIDES = {"rl.token_budget": 160, "rl.length_penalty_weight": 0.5, "sft.steps": 10,
                   "eval.sampled_temperature": 0.0}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_committed_notebook_is_clean_and_parameterized():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), "commit the notebook without outputs"
  params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1 and code[0] is params[0], "one papermill 'parameters' cell, the first code cell"
  for name in ("SIZE", "WORKDIR", "VARIANTS", "ITERATIONS", "EVAL_EVERY", "OVERRIDES"):
    assert f"\n{name} = " in "\n" + params[0].source, name
  # The default variants are all known, so a researcher's plain run does not fail after the warm-up.
  scope = {}
  exec(params[0].source, scope)  # pylint: disable=exec-used
  ablation.resolve_variants(scope["VARIANTS"])


def test_variants_and_overrides():
  config = arith.get_config("smoke")
  ablation.apply_overrides(config, {"rl.iterations": 7, "sft.steps": 3})
  assert (config.rl.iterations, config.sft.steps) == (7, 3)
  with pytest.raises(KeyError, match="rl.itterations"):
    ablation.apply_overrides(config, {"rl.itterations": 7})
  assert ablation.resolve_variants(["grpo", "k15_token"]) == {"grpo": {"loss": "grpo"},
                                                               "k15_token": {"log_ratio": "token"}}
  with pytest.raises(ValueError, match="unknown variants"):
    ablation.resolve_variants(["k15", "ppo"])
  with pytest.raises(ValueError, match="letters"):
    ablation.resolve_variants({"a/b": {}})
  v = ablation.variant_config(config, {"tau": 1, "reset_optimizer": False})
  assert (v.rl.tau, v.rl.reset_optimizer, v.rl.iterations) == (1.0, False, 7)
  assert config.rl.tau == 0.1 and config.rl.reset_optimizer  # the base config is untouched
  assert ablation.describe(v.rl) == "k15 tau=1 sequence mean-baseline no-reset"
  assert ablation.describe(ablation.variant_config(config, {"loss": "rest"}).rl) == "rest reset"
  with pytest.raises(ValueError, match="ppo"):
    ablation.variant_config(config, {"loss": "ppo"})


def test_smoothing_is_a_trailing_mean():
  assert ablation._smooth([1, 0, 1, 0], 2).tolist() == [1.0, 0.5, 0.5, 0.5]  # pylint: disable=protected-access
  assert ablation._smooth([2, 4], 5).tolist() == [2.0, 3.0]  # pylint: disable=protected-access


def test_results_table():
  ev = {"accuracy": 0.5, "sampled_accuracy": 0.25, "mean_tokens": 40.0, "tokens_per_correct": 80.0}
  greedy_only = {k: v for k, v in ev.items() if k != "sampled_accuracy"}
  results = [{"name": "k15", "description": "k15 tau=0.1", "eval": dict(ev, accuracy=0.75), "rl_time_s": 12.3,
              "train_accuracy_last5": 0.6},
             {"name": "grpo", "description": "grpo reset", "eval": greedy_only, "rl_time_s": 9.0,
              "train_accuracy_last5": 0.5}]
  lines = ablation.results_table(results, ev).splitlines()
  assert lines[2] == "| warm-up (no RL) | SFT only | 50.0% | 25.0% | 40.0 | 80.0 | - | - |"
  assert lines[3] == "| k15 | k15 tau=0.1 | 75.0% | 25.0% | 40.0 | 80.0 | 60.0% | 12 |"
  assert lines[4] == "| grpo | grpo reset | 50.0% | - | 40.0 | 80.0 | 50.0% | 9 |"
  assert all(line.count("|") == lines[0].count("|") for line in lines)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """Runs the notebook once at smoke size in a fresh kernel, as `papermill` would from the command line."""
  import papermill
  tmp = tmp_path_factory.mktemp("ablation")
  workdir = str(tmp / "work")
  out = str(tmp / "executed.ipynb")
  env = {"TMPDIR": str(tmp), "KERAS_HOME": str(tmp / "keras"), "TFDS_DATA_DIR": str(tmp / "tfds"),
         "XLA_FLAGS": "",  # one CPU device: the 8 fake devices of conftest only slow a tiny model down
         "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel is a subprocess and inherits this environment
  try:
    papermill.execute_notebook(NOTEBOOK, out, cwd=REPO, kernel_name="python3", progress_bar=False,
                               parameters={"SIZE": "smoke", "WORKDIR": workdir, "VARIANTS": SMOKE_VARIANTS,
                                           "ITERATIONS": 2, "EVAL_EVERY": 0, "OVERRIDES": SMOKE_OVERRIDES})
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return workdir, nbformat.read(out, as_version=4)


def test_notebook_writes_plots(executed):
  workdir, nb = executed
  for name in ("ablation_curves.png", "ablation_final.png"):
    path = os.path.join(workdir, name)
    with open(path, "rb") as f:
      data = f.read()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
  # Shown inline too: the executed notebook carries both images.
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
  assert len(images) == 2


def test_notebook_results_have_a_row_per_variant(executed):
  workdir, nb = executed
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert [r["name"] for r in results["variants"]] == SMOKE_VARIANTS
  warmup = results["warmup"]
  for r in [{"eval": warmup}] + results["variants"]:
    ev = r["eval"]
    assert 0.0 <= ev["accuracy"] <= 1.0 and 0.0 <= ev["tokens_per_correct"]
    assert 0 < ev["mean_tokens"] <= 160  # config.eval.max_response_len
  for r in results["variants"]:
    assert r["iterations"] == 2 and r["rl_time_s"] > 0 and 0.0 <= r["train_accuracy_last5"] <= 1.0
    rows = ablation.curves(workdir, r["name"])
    assert [row["step"] for row in rows] == [1, 2]
    assert all(row["response_len_mean"] > 0 for row in rows)
  assert [r["description"] for r in results["variants"]] == [
      "k15 tau=0.1 sequence mean-baseline reset", "k15 tau=0.1 token mean-baseline reset", "grpo reset"]
  # The variants trained differently from one shared warm-up: their second iterations differ.
  second = [ablation.curves(workdir, name)[1]["loss/loss"] for name in SMOKE_VARIANTS]
  assert len(set(second)) == len(second)

  with open(os.path.join(workdir, "results.md")) as f:
    table = f.read().strip().splitlines()
  assert len(table) == 2 + 1 + len(SMOKE_VARIANTS)  # header, rule, warm-up, one row per variant
  assert table[2].startswith("| warm-up (no RL) |")
  for line, name in zip(table[3:], SMOKE_VARIANTS):
    assert line.startswith(f"| {name} |") and line.count("|") == table[0].count("|")
  shown = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "text/markdown" in o.get("data", {})]
  assert shown and all(f"| {name} |" in shown[-1]["data"]["text/markdown"] for name in SMOKE_VARIANTS)


def test_rerun_reuses_finished_variants(executed):
  workdir, _ = executed
  config = arith.get_config("smoke")
  ablation.apply_overrides(config, {"rl.iterations": 2, "eval.every": 0, **SMOKE_OVERRIDES})
  setup = ablation.Setup(config, workdir, None, None, None, None, None, {}, 0.0)  # run_variant reads no model
  with open(os.path.join(workdir, "variants", "grpo", "result.json")) as f:
    assert ablation.run_variant(setup, "grpo", {"loss": "grpo"}) == json.load(f)
  with pytest.raises(ValueError, match="another config"):
    ablation.run_variant(setup, "grpo", {"loss": "rest"})
