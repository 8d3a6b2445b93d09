"""The main job: data and tokenizer -> long-CoT SFT warm-up -> k1.5 RL -> held-out evaluation -> summary.

Each stage leaves its result in the workdir, so a rerun skips what is done and resumes RL from its last
checkpoint:
  data/                  train.jsonl, eval.jsonl, spm.model (the generated task and its tokenizer)
  warmup/                the SFT model as a Hugging Face checkpoint (save_hf)
  checkpoints/           orbax checkpoints of the RL run (params, optimizer, buffer, statistics, RNG)
  final/                 the RL model as a Hugging Face checkpoint
  rl.jsonl, sft.jsonl    metrics; tensorboard/ the same for TensorBoard
  rl_curves.png          accuracy and mean length per iteration
  summary.json / .md     held-out accuracy and mean tokens after warm-up and after RL
"""
import hashlib
import json
import os
import time

import jax
import numpy as np
from absl import logging

from k15 import models, sharding
from k15.rewards import verifiers
from k15.data import arith
from k15.data import tokenizer as tokenizer_lib
from k15.rl import evaluation, loop, sft
from k15.rl.metrics import MetricsLogger, plot_rl_curves
from k15.rl.trainer import Trainer


def load_task(config, workdir):
  """(tokenizer, train, eval) example dicts: the synthetic task, or prompt files (config.data.source)."""
  source = config.data.get("source", "arith")
  if source == "prompts":
    from k15.rl import prompt_sets  # pylint: disable=g-import-not-at-top
    return prompt_sets.load_prompt_mixture(config, workdir)
  if source != "arith":
    raise ValueError(f"config.data.source={source!r}; valid: 'arith', 'prompts'")
  return _load_arith_task(config, workdir)


def _load_arith_task(config, workdir):
  """Generates the synthetic task (once), registers its seqio Tasks and returns (tokenizer, train, eval)."""
  data_dir = os.path.join(workdir, "data")
  if jax.process_index() == 0 and not os.path.exists(os.path.join(data_dir, "spm.model")):
    os.makedirs(data_dir, exist_ok=True)
    arith.prepare_arith_data(data_dir, config.data.n_train, config.data.n_eval, config.seed,
                             tuple(config.data.levels), config.data.tokenizer_vocab_size,
                             config.data.direct_prob)
  sharding.sync_processes("k15_arith_data")  # the other processes read what process 0 wrote
  from k15.data import tasks  # seqio (TensorFlow) only here, not at `import k15`
  prefix = f"k15_arith_{hashlib.sha1(os.path.abspath(data_dir).encode()).hexdigest()[:8]}"
  tasks.register_arith_tasks(data_dir, os.path.join(data_dir, "spm.model"), name_prefix=prefix)
  train, eval_ = tasks.load_examples(f"{prefix}_train"), tasks.load_examples(f"{prefix}_eval")
  tokenizer = tokenizer_lib.SentencePieceTokenizer(os.path.join(data_dir, "spm.model"))
  tokenizer_lib.check_tokenizer_fits(tokenizer, config.model.vocab_size)
  return tokenizer, train, eval_


def load_or_train_warmup(config, workdir, trainer, tokenizer, train):
  """The warm-up params: workdir/warmup if it exists, else long-CoT SFT (config.sft; 0 steps: initial params)."""
  path = os.path.join(workdir, "warmup")
  if os.path.exists(os.path.join(path, "config.json")):
    logging.info("warm-up checkpoint found at %s", path)
    _, params = models.load_hf(path, dtype=config.model.param_dtype)
    return trainer.place_params(params)
  _, hf_path = models.split_hf_path(config.model)
  if hf_path:  # start from a Hugging Face checkpoint instead of random params
    params = trainer.place_params(models.load_hf_matching(hf_path, trainer.cfg))
  else:
    params = trainer.init_params(jax.random.PRNGKey(config.seed))
  if not config.sft.steps:  # no warm-up: RL starts from the initial params
    return params
  prompts = [ex["inputs_ids"] for ex in train]
  responses = [ex["targets_ids"] for ex in train]  # long-CoT traces, ending with eos
  logger = MetricsLogger(workdir, "sft", total_steps=config.sft.steps)
  params = sft.sft_train(trainer, params, prompts, responses, steps=config.sft.steps,
                         batch_size=config.sft.batch_size, learning_rate=config.sft.learning_rate,
                         warmup_steps=config.sft.warmup_steps, pad_id=tokenizer.pad_id, seed=config.seed,
                         logger=logger)
  logger.close()
  host_params = sharding.to_host(params)  # every process joins the gather; process 0 writes
  if jax.process_index() == 0:
    models.save_hf(path, trainer.cfg, host_params)
  return params


def evaluate_both(trainer, params, tokenizer, examples, config, verifier=None):
  """The main (config.eval.temperature) evaluation, plus sampled accuracy at config.eval.sampled_temperature."""
  result = evaluation.evaluate(trainer, params, tokenizer, examples, config, verifier=verifier)
  if config.eval.sampled_temperature:
    sampled = evaluation.evaluate(trainer, params, tokenizer, examples, config,
                                  temperature=config.eval.sampled_temperature, verifier=verifier)
    result["sampled_accuracy"] = sampled["accuracy"]
  return result


def summary_table(rows: dict, config) -> str:
  sampled = f" | sampled accuracy (T={config.eval.sampled_temperature:g})" if config.eval.sampled_temperature else ""
  mode = "greedy" if config.eval.temperature == 0 else f"T={config.eval.temperature:g}"
  lines = [f"| model | held-out accuracy ({mode}){sampled} | mean response tokens | tokens per correct answer |",
           "|---|---|---|---|" + ("---|" if sampled else "")]
  for name, r in rows.items():
    cell = f" | {r['sampled_accuracy']:.1%}" if sampled else ""
    lines.append(f"| {name} | {r['accuracy']:.1%}{cell} | {r['mean_tokens']:.1f} | {r['tokens_per_correct']:.1f} |")
  return "\n".join(lines)


def run(config, workdir: str):
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  model_cfg, _ = models.split_hf_path(config.model)
  mesh = sharding.make_mesh(dict(config.mesh))
  trainer = Trainer(model_cfg, mesh, config.sharding.logical_axis_rules)
  print(f"k15: {model_cfg.num_params() / 1e6:.2f}M params on mesh {dict(mesh.shape)}; workdir {workdir}", flush=True)

  tokenizer, train, eval_ = load_task(config, workdir)
  print(f"task: {len(train)} train / {len(eval_)} held-out problems, vocab {tokenizer.vocab_size}", flush=True)

  params = load_or_train_warmup(config, workdir, trainer, tokenizer, train)
  with verifiers.make_verifier(config) as verifier:
    summary = _rl_and_report(config, workdir, trainer, params, tokenizer, train, eval_, verifier)
  summary["wall_time_s"] = time.time() - start
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  print(f"wall time {summary['wall_time_s']:.0f}s", flush=True)
  return summary


def _rl_and_report(config, workdir, trainer, params, tokenizer, train, eval_, verifier):
  model_cfg = trainer.cfg
  warmup_eval = evaluate_both(trainer, params, tokenizer, eval_, config, verifier)
  print(f"after warm-up: accuracy {warmup_eval['accuracy']:.1%}, mean tokens {warmup_eval['mean_tokens']:.1f}",
        flush=True)

  params = loop.run_rl(config, workdir, trainer, params, tokenizer, train, eval_, verifier)
  final_eval = evaluate_both(trainer, params, tokenizer, eval_, config, verifier)
  host_params = sharding.to_host(params)  # every process joins the gather; process 0 writes
  if jax.process_index() == 0:
    models.save_hf(os.path.join(workdir, "final"), model_cfg, host_params)

  start_name = "long-CoT warm-up (SFT)" if config.sft.steps else "initial model (no warm-up)"
  rows = {start_name: warmup_eval, "k1.5 RL": final_eval}
  table = summary_table(rows, config)
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
