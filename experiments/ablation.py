"""Loss ablations on the synthetic task: one shared warm-up, one RL run per loss variant, a table and plots.

The driver is notebooks/loss_ablations.ipynb; this module keeps its logic importable and testable. Every variant
starts from the same SFT warm-up params and the same seed, so runs differ only in their config.rl overrides.

Workdir layout:
  data/, warmup/           the task and the shared long-CoT warm-up (the main job's layout, experiments/train.py)
  warmup_eval.json         held-out evaluation of the warm-up (the baseline row)
  variants/<name>/         one RL run: config.json, rl.jsonl, checkpoints/, tensorboard/, final/ (the RL model as
                           a Hugging Face checkpoint), result.json (written last: the run is complete)
  results.json, results.md every variant's held-out evaluation (and the table)
  ablation_curves.png      accuracy and mean response length per iteration, all variants on shared axes
  ablation_final.png       held-out accuracy against mean response tokens after RL
"""
import contextlib
import dataclasses
import json
import os
import re
import time
from typing import Mapping, Optional, Sequence, Union

import jax
import ml_collections
import numpy as np

from experiments import plotting
from experiments import train as main_job
from k15 import checkpoint, sharding, storage
from k15 import config as config_lib
from k15.rewards.verifiers import Verifier
from k15.rl import evaluation, loop
from k15.rl.metrics import read_jsonl
from k15.rl.trainer import Trainer

# Named variants: config.rl overrides on top of the experiment config (the "k15" row is the config as given): the
# loss and its options, and the recipe's other parts switched off one at a time.
VARIANTS: dict[str, dict] = {
    "k15": {},
    "k15_tau0.01": {"tau": 0.01},  # weaker pull towards the start-of-iteration policy
    "k15_tau1": {"tau": 1.0},  # stronger pull
    "k15_token": {"log_ratio": "token"},  # per-token squared log-ratio (public reimplementations)
    "k15_no_reset": {"reset_optimizer": False},  # Adam moments carried across iterations
    "k15_logmeanexp": {"baseline": "logmeanexp"},  # tau*log Z estimated by tau*log mean exp(r/tau)
    "reinforce": {"loss": "reinforce"},
    "grpo": {"loss": "grpo"},
    "rest": {"loss": "rest"},
    "no_length_penalty": {"length_penalty_weight": 0.0},
    "uniform": {"curriculum": (), "prioritized": False},  # every prompt, drawn uniformly
    "curriculum_only": {"prioritized": False},
    "prioritized_only": {"curriculum": ()},
    "full_rollouts": {"partial_rollouts": False},  # every sample finishes in the iteration it started
    # rewards from the reward models in config.reward.rm_path (experiments/train_rm.py); held-out accuracy stays
    # the rules'
    "cot_rm": {"reward": "cot_rm"},
    "value_rm": {"reward": "value_rm"},
}

VariantSpec = Union[Sequence[str], Mapping[str, Mapping]]


def apply_overrides(config, overrides: Mapping) -> ml_collections.ConfigDict:
  """Sets dotted fields in place, e.g. {"rl.iterations": 30, "sft.steps": 100}; returns config."""
  for key, value in dict(overrides).items():
    _set(config, key, value)
  return config


def _set(config, dotted_key, value):
  *path, leaf = dotted_key.split(".")
  node = config
  for part in path:
    node = node[part]
  if leaf not in node:  # a typo must not silently add a field nobody reads
    raise KeyError(f"unknown config field {dotted_key!r}")
  node[leaf] = value  # ConfigDict rejects a value of the wrong type


def resolve_variants(variants: VariantSpec) -> dict[str, dict]:
  """Names from VARIANTS, or a {name: rl overrides} dict, as {name: rl overrides}."""
  if isinstance(variants, Mapping):
    out = {str(k): dict(v) for k, v in variants.items()}
  else:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
      raise ValueError(f"unknown variants {unknown}; valid: {sorted(VARIANTS)} (or pass a dict of rl overrides)")
    out = {v: dict(VARIANTS[v]) for v in variants}
  if not out:
    raise ValueError("no variants to run")
  bad = [name for name in out if not re.fullmatch(r"[\w.\-]+", name)]
  if bad:  # names are directory names under variants/
    raise ValueError(f"variant names may hold letters, digits, '_', '.', '-' only: {bad}")
  return out


def variant_config(config: ml_collections.ConfigDict, rl_overrides: Mapping) -> config_lib.Config:
  """The typed config of `config` with config.rl fields replaced; an unknown field or bad value is an error."""
  return config_lib.from_config_dict(apply_overrides(ml_collections.ConfigDict(config.to_dict()),
                                                     {f"rl.{k}": v for k, v in rl_overrides.items()}))


def describe(rl: config_lib.RLConfig) -> str:
  """The loss settings of a variant in a few words, e.g. 'k15 tau=0.1 sequence mean-baseline reset'."""
  words = [rl.loss]
  if rl.loss == "k15":
    words += [f"tau={rl.tau:g}", rl.log_ratio, f"{rl.baseline}-baseline"]
    if rl.form != "gradient":
      words.append(f"{rl.form}-form")
  words.append("reset" if rl.reset_optimizer else "no-reset")
  if rl.reward != "rules":
    words.append(f"reward {rl.reward}")
  return " ".join(words)


@dataclasses.dataclass
class Setup:
  """What every variant shares: the base config (a ConfigDict, overridden per variant), task, warm-up, verifier."""
  config: ml_collections.ConfigDict
  workdir: str
  trainer: Trainer
  tokenizer: object
  train: list
  eval: list
  warmup_params: object
  warmup_eval: dict
  warmup_time_s: float
  verifier: Verifier = None


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Setup:
  """Generates the task and trains the warm-up once (both reused if already in workdir), evaluates it."""
  start = time.time()
  typed = config_lib.from_config_dict(config)
  os.makedirs(workdir, exist_ok=True)
  trainer = main_job.make_trainer(typed)
  tokenizer, train, eval_ = main_job.load_task(typed, workdir)
  params = main_job.load_or_train_warmup(typed, workdir, trainer, tokenizer, train)
  verifier = main_job.make_verifier(typed)
  path = os.path.join(workdir, "warmup_eval.json")
  if os.path.exists(path):
    with open(path) as f:
      warmup_eval = json.load(f)
  else:
    warmup_eval = evaluation.evaluate(trainer, params, tokenizer, eval_, typed.sampling, typed.eval, verifier,
                                      sampled=True)
    storage.write_text(path, json.dumps(warmup_eval, indent=2))  # whole or absent: its presence means done
  print(f"warm-up ({typed.model.num_params() / 1e6:.2f}M params): held-out accuracy {warmup_eval['accuracy']:.1%}, "
        f"mean tokens {warmup_eval['mean_tokens']:.1f} ({time.time() - start:.0f}s)", flush=True)
  return Setup(config, workdir, trainer, tokenizer, train, eval_, params, warmup_eval, time.time() - start, verifier)


def _jsonable(x):
  return json.loads(json.dumps(x))


def run_variant(setup: Setup, name: str, rl_overrides: Mapping) -> dict:
  """RL from the shared warm-up with config.rl overridden, then held-out evaluation; cached in result.json.

  An interrupted variant resumes from its last checkpoint. A variant directory made with another config is an
  error (delete it or use a fresh workdir) rather than a silent mix of two runs.
  """
  config = variant_config(setup.config, rl_overrides)
  vdir = os.path.join(setup.workdir, "variants", name)
  os.makedirs(vdir, exist_ok=True)
  config_path, result_path = os.path.join(vdir, "config.json"), os.path.join(vdir, "result.json")
  config_dict = _jsonable(config.to_dict())
  if os.path.exists(config_path):
    with open(config_path) as f:
      if json.load(f) != config_dict:
        raise ValueError(f"{vdir} holds a run with another config; delete it or use a fresh workdir")
  else:
    storage.write_text(config_path, json.dumps(config_dict, indent=2))
  if os.path.exists(result_path):
    with open(result_path) as f:
      print(f"{name}: reusing {result_path}", flush=True)
      return json.load(f)

  print(f"--- {name}: {describe(config.rl)}, {config.rl.iterations} iterations", flush=True)
  start = time.time()
  # The train step donates its params: each variant gets its own copy of the warm-up.
  params = jax.tree.map(lambda x: x.copy(), setup.warmup_params)
  with (contextlib.nullcontext(setup.verifier) if config.rl.reward == "rules"
        else main_job.make_verifier(config, setup.trainer, config.rl.reward)) as reward_verifier:
    params = loop.run_rl(config, vdir, setup.trainer, params, setup.tokenizer, setup.train, setup.eval,
                         reward_verifier, setup.verifier)
  rl_time = time.time() - start
  final = evaluation.evaluate(setup.trainer, params, setup.tokenizer, setup.eval, config.sampling, config.eval,
                              setup.verifier, sampled=True)
  host_params = sharding.to_host(params)  # every process joins the gather; process 0 writes
  if jax.process_index() == 0:
    checkpoint.save_hf(os.path.join(vdir, "final"), setup.trainer.cfg, host_params)
  rows = curves(setup.workdir, name)
  result = {"name": name, "overrides": dict(rl_overrides), "description": describe(config.rl),
            "iterations": config.rl.iterations, "rl_time_s": rl_time, "eval": final,
            "train_accuracy_last5": _tail_mean(rows, "accuracy"),
            "response_len_last5": _tail_mean(rows, "response_len_mean")}
  storage.write_text(result_path, json.dumps(_jsonable(result), indent=2))  # whole or absent: the run's end marker
  print(f"{name}: held-out accuracy {final['accuracy']:.1%} (warm-up {setup.warmup_eval['accuracy']:.1%}), "
        f"mean tokens {final['mean_tokens']:.1f}, RL {rl_time:.0f}s", flush=True)
  return result


def run_ablation(setup: Setup, variants: VariantSpec) -> list[dict]:
  """Runs every variant (in order), writes results.json and results.md; returns the results."""
  with setup.verifier:
    results = [run_variant(setup, name, overrides) for name, overrides in resolve_variants(variants).items()]
  with open(os.path.join(setup.workdir, "results.json"), "w") as f:
    json.dump({"warmup": setup.warmup_eval, "variants": results}, f, indent=2)
  with open(os.path.join(setup.workdir, "results.md"), "w") as f:
    f.write(results_table(results, setup.warmup_eval) + "\n")
  return results


def curves(workdir: str, name: str) -> list[dict]:
  """A variant's per-iteration metrics (rows of iterations that trained at least one group)."""
  rows = read_jsonl(os.path.join(workdir, "variants", name, "rl.jsonl"))
  return [r for r in rows if "accuracy" in r]


def _tail_mean(rows, key, n=5):
  vals = [r[key] for r in rows[-n:] if key in r]
  return float(np.mean(vals)) if vals else float("nan")


def results_table(results: Sequence[dict], warmup_eval: dict) -> str:
  """Markdown: one row for the warm-up, one per variant (held-out after RL, train accuracy of the last 5 its)."""
  lines = ["| variant | loss settings | held-out accuracy (greedy) | sampled accuracy (T=1) | mean response tokens "
           "| tokens per correct | train accuracy, last 5 iterations | RL time (s) |",
           "|---|---|---|---|---|---|---|---|"]

  def row(name, desc, ev, train_acc, seconds):
    sampled = f"{ev['sampled_accuracy']:.1%}" if "sampled_accuracy" in ev else "-"
    lines.append(f"| {name} | {desc} | {ev['accuracy']:.1%} | {sampled} | {ev['mean_tokens']:.1f} "
                 f"| {ev['tokens_per_correct']:.1f} | {train_acc} | {seconds} |")

  row("warm-up (no RL)", "SFT only", warmup_eval, "-", "-")
  for r in results:
    row(r["name"], r["description"], r["eval"], f"{r['train_accuracy_last5']:.1%}", f"{r['rl_time_s']:.0f}")
  return "\n".join(lines)


def _smooth(values, window):
  """Trailing mean over up to `window` points: per-iteration train accuracy of 128 samples is noisy."""
  values = np.asarray(values, np.float64)
  cumsum = np.concatenate([[0.0], np.cumsum(values)])
  idx = np.arange(1, len(values) + 1)
  lo = np.maximum(idx - window, 0)
  return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def plot_ablation(workdir: str, names: Sequence[str], png_path: str, baseline: Optional[float] = None,
                  smooth: int = 5, title: str = "loss ablations"):
  """Train accuracy, held-out accuracy and mean response length per iteration; one line per variant.

  baseline: the warm-up's held-out accuracy, drawn at iteration 0 of every held-out curve.
  """
  fig, (ax_acc, ax_eval, ax_len) = plotting.pyplot().subplots(1, 3, figsize=(15, 4.2), sharex=True)
  for i, name in enumerate(names):
    rows = curves(workdir, name)
    color = f"C{i % 10}"
    steps = [r["step"] for r in rows]
    ax_acc.plot(steps, _smooth([r["accuracy"] for r in rows], smooth), color=color, label=name)
    evals = dict((r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r)
    if baseline is not None:
      evals[0] = baseline  # every variant starts from the warm-up
    result_path = os.path.join(workdir, "variants", name, "result.json")
    if os.path.exists(result_path):  # the evaluation after RL, also when none ran during it
      with open(result_path) as f:
        result = json.load(f)
      evals[result["iterations"]] = result["eval"]["accuracy"]
    if evals:
      ax_eval.plot(*zip(*sorted(evals.items())), "o-", color=color, label=name)
    ax_len.plot(steps, _smooth([r["response_len_mean"] for r in rows], smooth), color=color, label=name)
  if baseline is not None:
    ax_eval.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="warm-up")
  ax_acc.set(xlabel="iteration", ylabel="accuracy", title=f"train-sample accuracy (mean of last {smooth})")
  ax_eval.set(xlabel="iteration (0: warm-up)", ylabel="accuracy", title="held-out accuracy (greedy)")
  ax_len.set(xlabel="iteration", ylabel="response tokens", title=f"mean response length (mean of last {smooth})")
  return plotting.save(fig, (ax_acc, ax_eval, ax_len), png_path, legend_on=(ax_len, ax_eval), title=title)


def plot_final(results: Sequence[dict], warmup_eval: dict, png_path: str):
  """Held-out accuracy against mean response tokens after RL, one point per variant, and the warm-up."""
  fig, ax = plotting.pyplot().subplots(figsize=(6, 4.2))
  ax.scatter([warmup_eval["mean_tokens"]], [warmup_eval["accuracy"]], marker="x", color="gray", label="warm-up")
  for i, r in enumerate(results):
    ax.scatter([r["eval"]["mean_tokens"]], [r["eval"]["accuracy"]], color=f"C{i % 10}", label=r["name"])
  ax.set(xlabel="mean response tokens (held-out)", ylabel="held-out accuracy (greedy)", title="after RL")
  return plotting.save(fig, [ax], png_path, legend_on=[ax])
