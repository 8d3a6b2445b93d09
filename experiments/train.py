"""The main job: data and tokenizer -> long-CoT SFT warm-up -> k1.5 RL -> held-out evaluation -> summary.

  python -m experiments.train --config=experiments/configs/arith.py --workdir=/tmp/k15_arith

Config fields are overridden with flags: --config.rl.iterations=10 --config.model.n_layers=2. Each stage leaves its
result in the workdir, so a rerun skips what is done and resumes RL from its last checkpoint:
  config.json            the config of the run, and a hash of the fields that define it (DEFINING_SKIPS: the rest)
  data/                  the generated task and its tokenizer (train.jsonl, eval.jsonl, spm.model)
  warmup/                the SFT model as a Hugging Face checkpoint; warmup_eval.json its held-out evaluation
  checkpoints/           orbax checkpoints of the RL run (params, optimizer, buffer, statistics, RNG); best/ the
                         best one by held-out accuracy
  final/                 the RL model as a Hugging Face checkpoint
  rl.jsonl, sft.jsonl    metrics; tensorboard/ the same for TensorBoard
  rl_curves.png          accuracy and mean length per iteration
  summary.json / .md     held-out accuracy and mean tokens after warm-up and after RL
data/, warmup/ and final/ are written under a temporary name and renamed when complete (k15.checkpoint.stage_dir).
A rerun whose config differs in a defining field is an error listing the fields, unless --allow_config_change.
The workdir may be a bucket (--workdir=gs://bucket/run): every file goes through k15.storage.
"""
import hashlib
import json
import os
import time

import jax

from k15 import checkpoint, models, sharding, storage
from k15.config import Config, EvalConfig
from k15.data import sources
from k15.rewards import reward_model
from k15.rewards.sandbox import SandboxConfig
from k15.rewards.shared import SharedVerifier
from k15.rewards.verifiers import Verifier, methods_by_domain
from k15.rl import evaluation, loop, sft
from k15.rl.metrics import MetricsLogger, plot_rl_curves
from k15.rl.trainer import Trainer


def make_trainer(config: Config, model_cfg=None) -> Trainer:
  """The run's trainer: config.model (or model_cfg) on the mesh of config.mesh with config.sharding's rules."""
  return Trainer(model_cfg or config.model, sharding.make_mesh(config.mesh.sizes(), dcn_data=config.mesh.dcn_data),
                 config.sharding.logical_axis_rules, config.sharding.sampling_rules)


def make_verifier(config: Config, trainer: Trainer = None, reward: str = "rules") -> SharedVerifier:
  """The verifiers of config.reward; with a reward other than "rules" (config.rl.reward), also the reward models
  it needs from config.reward.rm_path, on the trainer's mesh with its rules (their own frozen params). On several
  processes each response a rule verifies is verified by one process and the rewards shared with all; judges run
  on the mesh, every process alike (k15.rewards.shared)."""
  r = config.reward
  judges = {}
  for kind in r.judges_needed(reward):
    judges[kind] = reward_model.load_judge(os.path.join(r.rm_path, kind), rollout=config.sampling,
                                           mesh=trainer.mesh, rules=trainer.rules,
                                           sampling_rules=trainer.sampling_rules)
    print(f"reward: {kind} from {os.path.join(r.rm_path, kind)}", flush=True)
  return SharedVerifier(Verifier(default_domain=r.default_domain, math_timeout_s=r.math_timeout_s,
                                 math_workers=r.math_workers,
                                 sandbox_config=SandboxConfig(allow_unisolated=r.sandbox_allow_unisolated),
                                 judges=judges, by_domain=methods_by_domain(reward, r.mix)))


def load_task(config: Config, workdir: str, write: bool = True):
  """(tokenizer, train, eval) of config.data, generated into workdir/data (write=False: only read from there)."""
  return sources.load_task(config.data, workdir, seed=config.seed, model_vocab_size=config.model.vocab_size,
                           hf_path=config.hf_path, write=write)


# Fields that may change between the runs of one workdir: how long, how often, where and how fast, not what.
DEFINING_SKIPS = ("rl.iterations", "rl.max_bad_steps", "eval.every", "checkpoint.", "sampling.backend",
                  "sampling.page_size", "sampling.num_pages", "mesh.", "sharding.", "tpu", "long2short")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def record_config(config: Config, workdir: str, allow_change: bool = False):
  """Writes workdir/config.json; a workdir made by a config that differs in a defining field is an error listing
  the fields (the run would silently continue another one), unless allow_change."""
  full = json.loads(json.dumps(config.to_dict()))
  defining = {k: v for k, v in _flat(full).items() if not k.startswith(DEFINING_SKIPS)}
  path = storage.join(workdir, "config.json")
  if storage.exists(path):
    old = json.loads(storage.read_text(path))["defining"]
    diff = [f"{k}: {old.get(k, '(absent)')!r} -> {defining.get(k, '(absent)')!r}"
            for k in sorted(set(old) | set(defining)) if old.get(k) != defining.get(k)]
    if diff and not allow_change:
      raise ValueError(f"{workdir} holds a run of another config; differing fields: {'; '.join(diff)}. Use a fresh "
                       "--workdir, or --allow_config_change to continue this run with the new values.")
    if diff:
      print(f"WARNING: continuing {workdir} with changed fields: {'; '.join(diff)}", flush=True)
  if jax.process_index() == 0:
    digest = hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()
    storage.write_text(path, json.dumps({"defining_sha256": digest, "defining": defining, "config": full}, indent=2))


def load_or_train_warmup(config: Config, workdir, trainer, tokenizer, train):
  """The warm-up params: workdir/warmup if it is complete, else long-CoT SFT (config.sft; 0 steps: initial params)."""
  path = storage.join(workdir, "warmup")
  if checkpoint.is_complete(path):
    print(f"warm-up checkpoint found at {path}", flush=True)
    _, params = checkpoint.load_hf(path, dtype=config.model.param_dtype)
    return trainer.place_params(params)
  if config.hf_path:  # start from a Hugging Face checkpoint instead of random params
    try:
      params = models.load_hf_matching(config.hf_path, trainer.cfg)
    except models.hf.CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # json, safetensors and OS errors name no file
      raise checkpoint.CheckpointError(f"config.model.hf_path={config.hf_path}: {type(e).__name__}: {e}") from None
    checkpoint.assert_finite(params, config.hf_path)
    params = trainer.place_params(params)
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
    checkpoint.save_hf(path, trainer.cfg, host_params)
  return params


def warmup_evaluation(config: Config, workdir, evaluate, params) -> dict:
  """evaluate(params) of the warm-up, kept in workdir/warmup_eval.json for the evaluation settings it used (a
  resumed run does not redo it)."""
  path = storage.join(workdir, "warmup_eval.json")
  key = json.loads(json.dumps({"eval": config.to_dict()["eval"], "sampling": config.to_dict()["sampling"]}))
  if storage.exists(path):
    cached = json.loads(storage.read_text(path))
    if cached["key"] == key:
      return cached["result"]
  result = evaluate(params)
  if jax.process_index() == 0:
    storage.write_text(path, json.dumps({"key": key, "result": result}, indent=2))
  return result


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


def run(config: Config, workdir: str, allow_config_change: bool = False) -> dict:
  """Runs (or resumes) the main job in workdir; returns the summary."""
  start = time.time()
  storage.makedirs(workdir)
  record_config(config, workdir, allow_config_change)
  trainer = make_trainer(config)
  print(f"k15: {config.model.num_params() / 1e6:.2f}M params on mesh {dict(trainer.mesh.shape)}; workdir {workdir}",
        flush=True)
  tokenizer, train, eval_ = load_task(config, workdir)
  print(f"task: {len(train)} train / {len(eval_)} held-out problems, vocab {tokenizer.vocab_size}", flush=True)
  params = load_or_train_warmup(config, workdir, trainer, tokenizer, train)
  with make_verifier(config) as verifier, make_verifier(config, trainer, config.rl.reward) as reward_verifier:
    summary = _rl_and_report(config, workdir, trainer, params, tokenizer, train, eval_, verifier, reward_verifier)
  summary["wall_time_s"] = time.time() - start
  if jax.process_index() == 0:
    storage.write_text(storage.join(workdir, "summary.json"), json.dumps(summary, indent=2))
  print(f"wall time {summary['wall_time_s']:.0f}s", flush=True)
  return summary


def _rl_and_report(config: Config, workdir, trainer, params, tokenizer, train, eval_, verifier, reward_verifier):
  """verifier: the held-out evaluation's (the rules); reward_verifier: RL's reward (config.rl.reward)."""
  def evaluate(params):
    return evaluation.evaluate(trainer, params, tokenizer, eval_, config.sampling, config.eval, verifier, sampled=True)

  warmup_eval = warmup_evaluation(config, workdir, evaluate, params)
  print(f"after warm-up: accuracy {warmup_eval['accuracy']:.1%}, mean tokens {warmup_eval['mean_tokens']:.1f}",
        flush=True)
  params = loop.run_rl(config, workdir, trainer, params, tokenizer, train, eval_, reward_verifier, verifier)
  final_eval = evaluate(params)
  host_params = sharding.to_host(params)  # every process joins the gather; process 0 writes
  if jax.process_index() == 0:
    checkpoint.save_hf(storage.join(workdir, "final"), trainer.cfg, host_params)

  start_name = "long-CoT warm-up (SFT)" if config.sft.steps else "initial model (no warm-up)"
  rows = {start_name: warmup_eval, "k1.5 RL": final_eval}
  table = summary_table(rows, config.eval)
  summary = {name: {k: v for k, v in r.items() if k != "per_level"} for name, r in rows.items()}
  summary["per_level_accuracy"] = {name: r["per_level"] for name, r in rows.items()}
  if jax.process_index() == 0:
    storage.write_text(storage.join(workdir, "summary.md"), table + "\n")
    if storage.exists(storage.join(workdir, "rl.jsonl")):
      plot_rl_curves(storage.join(workdir, "rl.jsonl"), storage.join(workdir, "rl_curves.png"),
                     baseline=warmup_eval["accuracy"])
  print("\n" + table, flush=True)
  print(f"\naccuracy change: {100 * (final_eval['accuracy'] - warmup_eval['accuracy']):+.1f} points; "
        f"plot {storage.join(workdir, 'rl_curves.png')}", flush=True)
  return summary


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from experiments import cli  # pylint: disable=g-import-not-at-top
  _ALLOW = flags.DEFINE_bool("allow_config_change", False, "Continue a workdir's run although defining config "
                             "fields differ from the ones it was made with (e.g. a changed learning rate).")
  cli.run(lambda config, workdir: run(config, workdir, _ALLOW.value),
          config_help="Experiment config file (experiments/configs/*.py).",
          workdir_help="Directory for data, checkpoints, metrics and plots: a local path or a bucket (gs://...).",
          url_workdir=True)
