"""The main job: data and tokenizer -> long-CoT SFT warm-up -> k1.5 RL -> held-out evaluation -> summary.

  python -m experiments.train --config=experiments/configs/arith.py --workdir=/tmp/k15_arith

Config fields are overridden with flags: --config.rl.iterations=10 --config.model.n_layers=2. Each stage leaves its
result in the workdir, so a rerun skips what is done and resumes RL from its last checkpoint:
  data/                  the generated task and its tokenizer (train.jsonl, eval.jsonl, spm.model)
  warmup/                the SFT model as a Hugging Face checkpoint
  checkpoints/           orbax checkpoints of the RL run (params, optimizer, buffer, statistics, RNG)
  final/                 the RL model as a Hugging Face checkpoint
  rl.jsonl, sft.jsonl    metrics; tensorboard/ the same for TensorBoard
  rl_curves.png          accuracy and mean length per iteration
  summary.json / .md     held-out accuracy and mean tokens after warm-up and after RL
"""
import json
import os
import time

import jax

from k15 import models, sharding
from k15.config import Config, EvalConfig
from k15.data import sources
from k15.rewards.sandbox import SandboxConfig
from k15.rewards.verifiers import Verifier
from k15.rl import evaluation, loop, sft
from k15.rl.metrics import MetricsLogger, plot_rl_curves
from k15.rl.trainer import Trainer


def make_trainer(config: Config, model_cfg=None) -> Trainer:
  """The run's trainer: config.model (or model_cfg) on the mesh of config.mesh with config.sharding's rules."""
  return Trainer(model_cfg or config.model, sharding.make_mesh(config.mesh.sizes()),
                 config.sharding.logical_axis_rules)


def make_verifier(config: Config) -> Verifier:
  r = config.reward
  return Verifier(default_domain=r.default_domain, math_timeout_s=r.math_timeout_s, math_workers=r.math_workers,
                  sandbox_config=SandboxConfig(allow_unisolated=r.sandbox_allow_unisolated))


def load_task(config: Config, workdir: str):
  """(tokenizer, train, eval) of config.data, generated or read into workdir/data."""
  return sources.load_task(config.data, workdir, seed=config.seed, model_vocab_size=config.model.vocab_size,
                           hf_path=config.hf_path)


def load_or_train_warmup(config: Config, workdir, trainer, tokenizer, train):
  """The warm-up params: workdir/warmup if it exists, else long-CoT SFT (config.sft; 0 steps: initial params)."""
  path = os.path.join(workdir, "warmup")
  if os.path.exists(os.path.join(path, "config.json")):
    print(f"warm-up checkpoint found at {path}", flush=True)
    _, params = models.load_hf(path, dtype=config.model.param_dtype)
    return trainer.place_params(params)
  if config.hf_path:  # start from a Hugging Face checkpoint instead of random params
    params = trainer.place_params(models.load_hf_matching(config.hf_path, trainer.cfg))
  else:
    params = trainer.init_params(jax.random.PRNGKey(config.seed))
  if not config.sft.steps:  # no warm-up: RL starts from the initial params
    return params
  logger = MetricsLogger(workdir, "sft", total_steps=config.sft.steps)
  params = sft.sft_train(trainer, params, [ex["inputs_ids"] for ex in train],
                         [ex["targets_ids"] for ex in train],  # long-CoT traces, ending with eos
                         config.sft, pad_id=tokenizer.pad_id, seed=config.seed, logger=logger)
  logger.close()
  host_params = sharding.to_host(params)  # every process joins the gather; process 0 writes
  if jax.process_index() == 0:
    models.save_hf(path, trainer.cfg, host_params)
  return params


def summary_table(rows: dict, eval_cfg: EvalConfig) -> str:
  """Markdown: one row per model with held-out accuracy, sampled accuracy, mean tokens and tokens per correct."""
  sampled = f" | sampled accuracy (T={eval_cfg.sampled_temperature:g})" if eval_cfg.sampled_temperature else ""
  mode = "greedy" if eval_cfg.temperature == 0 else f"T={eval_cfg.temperature:g}"
  lines = [f"| model | held-out accuracy ({mode}){sampled} | mean response tokens | tokens per correct answer |",
           "|---|---|---|---|" + ("---|" if sampled else "")]
  for name, r in rows.items():
    cell = f" | {r['sampled_accuracy']:.1%}" if sampled else ""
    lines.append(f"| {name} | {r['accuracy']:.1%}{cell} | {r['mean_tokens']:.1f} | {r['tokens_per_correct']:.1f} |")
  return "\n".join(lines)


def run(config: Config, workdir: str) -> dict:
  """Runs (or resumes) the main job in workdir; returns the summary."""
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  trainer = make_trainer(config)
  print(f"k15: {config.model.num_params() / 1e6:.2f}M params on mesh {dict(trainer.mesh.shape)}; workdir {workdir}",
        flush=True)
  tokenizer, train, eval_ = load_task(config, workdir)
  print(f"task: {len(train)} train / {len(eval_)} held-out problems, vocab {tokenizer.vocab_size}", flush=True)
  params = load_or_train_warmup(config, workdir, trainer, tokenizer, train)
  with make_verifier(config) as verifier:
    summary = _rl_and_report(config, workdir, trainer, params, tokenizer, train, eval_, verifier)
  summary["wall_time_s"] = time.time() - start
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  print(f"wall time {summary['wall_time_s']:.0f}s", flush=True)
  return summary


def _rl_and_report(config: Config, workdir, trainer, params, tokenizer, train, eval_, verifier):
  def evaluate(params):
    return evaluation.evaluate(trainer, params, tokenizer, eval_, config.sampling, config.eval, verifier, sampled=True)

  warmup_eval = evaluate(params)
  print(f"after warm-up: accuracy {warmup_eval['accuracy']:.1%}, mean tokens {warmup_eval['mean_tokens']:.1f}",
        flush=True)
  params = loop.run_rl(config, workdir, trainer, params, tokenizer, train, eval_, verifier)
  final_eval = evaluate(params)
  host_params = sharding.to_host(params)  # every process joins the gather; process 0 writes
  if jax.process_index() == 0:
    models.save_hf(os.path.join(workdir, "final"), trainer.cfg, host_params)

  start_name = "long-CoT warm-up (SFT)" if config.sft.steps else "initial model (no warm-up)"
  rows = {start_name: warmup_eval, "k1.5 RL": final_eval}
  table = summary_table(rows, config.eval)
  summary = {name: {k: v for k, v in r.items() if k != "per_level"} for name, r in rows.items()}
  summary["per_level_accuracy"] = {name: r["per_level"] for name, r in rows.items()}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.md"), "w") as f:
      f.write(table + "\n")
    if os.path.exists(os.path.join(workdir, "rl.jsonl")):
      plot_rl_curves(os.path.join(workdir, "rl.jsonl"), os.path.join(workdir, "rl_curves.png"),
                     baseline=warmup_eval["accuracy"])
  print("\n" + table, flush=True)
  print(f"\naccuracy change: {100 * (final_eval['accuracy'] - warmup_eval['accuracy']):+.1f} points; "
        f"plot {os.path.join(workdir, 'rl_curves.png')}", flush=True)
  return summary


if __name__ == "__main__":
  from experiments import cli  # pylint: disable=g-import-not-at-top
  cli.run(run, config_help="Experiment config file (experiments/configs/*.py).",
          workdir_help="Directory for data, checkpoints, metrics and plots.")
