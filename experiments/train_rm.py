"""Reward models on the synthetic task: labelled pairs -> the CoT RM (SFT) and the value-head RM (a classifier) ->
held-out accuracy of exact match, math-verify, the value RM and the CoT RM, overall and per answer form.

  python -m experiments.train_rm --config=experiments/configs/rm.py --workdir=/tmp/k15_rm

Workdir (a rerun skips what is complete):
  data/                  train.jsonl, eval.jsonl (k15/data/rm_data.py), spm.model (the judges' tokenizer)
  cot_rm/, value_rm/     the judges (k15.rewards.reward_model.save_judge): an RL run reads them through
                         --config.reward.rm_path=<this workdir>
  cot_rm.jsonl, value_rm.jsonl   training metrics (and tensorboard/)
  rm_eval.json / .md     the comparison on the held-out pairs
"""
import collections
import dataclasses
import json
import os
import time

import jax
import numpy as np

from k15 import checkpoint, models, sharding
from k15.config import RMTrainConfig
from k15.data import rm_data
from k15.data import tokenizer as tokenizer_lib
from k15.rewards import reward_model as rm
from k15.rewards.math_pool import MathVerifierPool
from k15.rewards.verifiers import Verifier
from k15.rl import batching, sft
from k15.rl.metrics import MetricsLogger
from k15.rl.trainer import Trainer, train_steps

METHODS = ("exact match", "math-verify", "value RM", "CoT RM")


def make_trainer(config: RMTrainConfig) -> Trainer:
  return Trainer(config.model, sharding.make_mesh(config.mesh.sizes()), config.sharding.logical_axis_rules,
                 config.sharding.sampling_rules)


def spec_of(config: RMTrainConfig, kind: str, **overrides) -> rm.JudgeSpec:
  j = config.judge
  return rm.JudgeSpec(kind, template=j.template, max_input_tokens=j.max_input_tokens, max_new_tokens=j.max_new_tokens,
                      value_reward=j.value_reward, threshold=j.threshold, **overrides)


def load_data(config: RMTrainConfig, workdir: str):
  """(tokenizer, train pairs, calibration pairs, held-out pairs), generated into workdir/data once."""
  d = config.data
  data_dir = os.path.join(workdir, "data")
  if jax.process_index() == 0 and not checkpoint.is_complete(data_dir):
    with checkpoint.stage_dir(data_dir) as tmp:
      rm_data.prepare_rm_data(tmp, d.n_train, d.n_eval, config.seed, d.levels, d.tokenizer_vocab_size,
                              n_problems=d.n_problems)
  sharding.sync_processes("k15_rm_data")
  tokenizer = tokenizer_lib.SentencePieceTokenizer(os.path.join(data_dir, "spm.model"))
  tokenizer_lib.check_tokenizer_fits(tokenizer, config.model.vocab_size)
  train = rm_data.read_pairs(os.path.join(data_dir, "train.jsonl"))
  eval_ = rm_data.read_pairs(os.path.join(data_dir, "eval.jsonl"))
  return tokenizer, train[:-d.n_calibration], train[-d.n_calibration:], eval_


def judge_inputs(config: RMTrainConfig, tokenizer, pairs) -> list[list[int]]:
  j = config.judge
  return [rm.encode_input(tokenizer, j.template, p["question"], p["answer"], p["response"], j.max_input_tokens)
          for p in pairs]


def train_cot(config: RMTrainConfig, workdir, trainer, tokenizer, train):
  """The CoT RM: SFT (k15.rl.sft) on the judge's input -> a short trace ending in the JSON verdict."""
  targets, weights = [], []
  for p in train:  # the first line copies the final answer; the judging after it weighs cot_judging_weight
    first, rest = rm_data.cot_target(p, config.cot_trace).split("\n", 1)
    head, tail = tokenizer.encode(first + "\n"), tokenizer.encode(rest) + [tokenizer.eos_id]
    targets.append(head + tail)
    weights.append([1.0] * len(head) + [config.cot_judging_weight] * len(tail))
  if config.cot_init == "scratch":
    params = trainer.init_params(jax.random.PRNGKey(config.seed))
  else:
    params = trainer.place_params(load_judge_params(config, config.cot_init, os.path.join(workdir, "data", "spm.model")))
  logger = MetricsLogger(workdir, "cot_rm", total_steps=config.cot.steps)
  params = sft.sft_train(trainer, params, judge_inputs(config, tokenizer, train), targets, config.cot,
                         pad_id=tokenizer.pad_id, seed=config.seed, logger=logger, weights=weights)
  logger.close()
  return params


def load_judge_params(config: RMTrainConfig, path: str, spm_path: str):
  """The params of a saved judge that starts a new one: its model shape and tokenizer must be this run's."""
  _, model_cfg, params, _ = rm.load_judge_files(path)
  shapes = lambda tree: {jax.tree_util.keystr(k): np.shape(x) for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  saved, wanted = shapes(params), shapes(models.abstract_params(config.model))
  if saved != wanted:
    params_differ = {k: (saved.get(k), wanted.get(k)) for k in sorted(saved.keys() | wanted.keys())
                     if saved.get(k) != wanted.get(k)}
    fields_differ = {f.name: (getattr(model_cfg, f.name), getattr(config.model, f.name))
                     for f in dataclasses.fields(model_cfg) if getattr(model_cfg, f.name) != getattr(config.model, f.name)}
    raise ValueError(f"{path}: the judge's params do not fit config.model; shapes (judge, config) {params_differ}; "
                     f"model fields that differ (judge, config) {fields_differ}")
  with open(os.path.join(path, "tokenizer.model"), "rb") as a, open(spm_path, "rb") as b:
    if a.read() != b.read():
      raise ValueError(f"{path}: the judge's tokenizer differs from {spm_path}; copy its run's data/ into the workdir")
  return params


def train_value(config: RMTrainConfig, workdir, trainer, tokenizer, train):
  """The value RM: binary cross-entropy of a scalar head on the last hidden state (the same transformer)."""
  cfg = config.model
  inputs = judge_inputs(config, tokenizer, train)
  labels = np.array([float(p["correct"]) for p in train], np.float32)
  seq_len = 8 * -(-max(len(x) for x in inputs) // 8)
  tokens_all, _ = batching.pack(inputs, [[] for _ in inputs], seq_len, tokenizer.pad_id)
  lengths_all = np.array([len(x) for x in inputs], np.int32)

  def loss_fn(params, batch):
    return rm.value_loss(rm.value_logits(cfg, params, batch["tokens"], batch["lengths"]), batch["labels"])

  def batch_fn(idx):
    return {"tokens": tokens_all[idx], "lengths": lengths_all[idx], "labels": labels[idx]}

  if config.value_init == "cot_rm":  # the trained CoT RM's transformer, a new head
    model = trainer.place_params(load_judge_params(config, os.path.join(workdir, "cot_rm"),
                                                   os.path.join(workdir, "data", "spm.model")))
  else:
    model = trainer.init_params(jax.random.PRNGKey(config.seed + 1))
  params = {"model": model, "head": jax.device_put(rm.init_value_head(cfg), sharding.replicated(trainer.mesh))}
  v = config.value
  logger = MetricsLogger(workdir, "value_rm", total_steps=v.steps)
  params = train_steps(trainer, params, loss_fn, sft.sft_optimizer(v.learning_rate, v.steps, v.warmup_steps),
                       batch_fn, len(inputs), steps=v.steps, batch_size=v.batch_size, seed=config.seed, logger=logger,
                       show=("loss", "accuracy"))
  logger.close()
  return params


def train_judges(config: RMTrainConfig, workdir, trainer, tokenizer, train, calibration):
  spm_path = os.path.join(workdir, "data", "spm.model")
  for kind in config.rms:
    path = os.path.join(workdir, kind)
    if checkpoint.is_complete(path):
      print(f"{kind} found at {path}", flush=True)
      continue
    start = time.time()
    if kind == "cot_rm":
      params, spec = train_cot(config, workdir, trainer, tokenizer, train), spec_of(config, kind)
    else:
      params = train_value(config, workdir, trainer, tokenizer, train)
      judge = rm.ValueJudge(config.model, params, tokenizer, spec_of(config, kind), mesh=trainer.mesh,
                            rules=trainer.rules, sampling_rules=trainer.sampling_rules)
      logits = judge.logits([p["response"] for p in calibration], calibration)
      spec = spec_of(config, kind, temperature=rm.fit_temperature(logits, [p["correct"] for p in calibration]))
      print(f"value_rm: temperature {spec.temperature:.3g} fitted on {len(calibration)} calibration pairs", flush=True)
    host_params = sharding.to_host(params)
    if jax.process_index() == 0:
      rm.save_judge(path, spec, config.model, host_params, spm_path)
    print(f"{kind}: trained in {time.time() - start:.0f}s, saved to {path}", flush=True)


def predictions(config: RMTrainConfig, workdir, trainer, pairs) -> dict:
  """{method: 0/1 predictions on the pairs}, and the CoT judge's failures (no single valid verdict)."""
  texts = [p["response"] for p in pairs]
  out, extra = {}, {}
  with Verifier(default_domain="arith") as v:
    out["exact match"] = v(texts, pairs)
  # The pool itself, not the Verifier: a CPU shared with other jobs can take minutes to start a sympy worker.
  with MathVerifierPool(num_workers=1, timeout_s=config.math_timeout_s, startup_timeout_s=900) as pool:
    out["math-verify"] = np.array([r.reward for r in pool.score(texts, [p["answer"] for p in pairs])], np.float32)
  for name, kind in (("value RM", "value_rm"), ("CoT RM", "cot_rm")):
    if kind not in config.rms:
      continue
    judge = rm.load_judge(os.path.join(workdir, kind), rollout=config.sampling, mesh=trainer.mesh,
                          rules=trainer.rules, sampling_rules=trainer.sampling_rules)
    out[name] = np.array([r.reward for r in judge.score(texts, pairs)], np.float32)
    extra[f"{kind}_time_s"] = judge.time_s
    if kind == "cot_rm":
      extra["cot_rm_failures"] = judge.failures
      extra["cot_rm_outputs"] = judge.last_outputs[:20]
      extra["cot_rm_errors"] = cot_errors(pairs, judge.last_outputs, out[name], config.cot_trace)
  return out, extra


def _trace_lines(text: str) -> dict:
  return dict(line.split(": ", 1) for line in text.split("\n") if ": " in line and not line.startswith("{"))


def _result(line):
  """The value a trace line ends on: "3*2=6, 6+2=8" -> "8"."""
  return None if line is None else line.rsplit("=", 1)[-1]


def cot_errors(pairs, outputs, rewards, trace: str = "value") -> dict:
  """Where the CoT judge's wrong verdicts go wrong: per trace line ("Value", "Match", ...), how many of them differ
  from the target trace (rm_data.cot_target); and how many end their value on the reference when it is not."""
  wrong = [(p, _trace_lines(out)) for p, out, r in zip(pairs, outputs, rewards) if r != float(p["correct"])]
  lines = collections.Counter()
  copied = 0
  for p, got in wrong:
    target = _trace_lines(rm_data.cot_target(p, trace))
    lines.update(k for k, v in target.items() if got.get(k) != v)
    copied += _result(got.get("Value")) == p["answer"] != _result(target.get("Value"))
  return {"wrong verdicts": len(wrong), "wrong lines": dict(lines), "value copied from the reference": copied}


def comparison(pairs, preds: dict) -> dict:
  """{form or "overall": {"n": ..., method: accuracy}} of predictions against the labels."""
  labels = np.array([float(p["correct"]) for p in pairs])
  forms = np.array([p["form"] for p in pairs])
  table = {}
  for form in ("overall",) + rm_data.FORMS:
    sel = np.ones(len(pairs), bool) if form == "overall" else forms == form
    if sel.any():
      table[form] = {"n": int(sel.sum()), "correct share": float(labels[sel].mean()),
                     **{m: float((preds[m][sel] == labels[sel]).mean()) for m in METHODS if m in preds}}
  return table


def markdown(table: dict) -> str:
  methods = [m for m in METHODS if m in table["overall"]]
  lines = ["| answer form | pairs | labelled correct | " + " | ".join(methods) + " |",
           "|---|---|---|" + "---|" * len(methods)]
  for form, row in table.items():
    lines.append(f"| {form} | {row['n']} | {row['correct share']:.0%} | "
                 + " | ".join(f"{row[m]:.1%}" for m in methods) + " |")
  return "\n".join(lines)


def run(config: RMTrainConfig, workdir: str) -> dict:
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(json.loads(json.dumps(dataclasses.asdict(config))), f, indent=2)
  trainer = make_trainer(config)
  tokenizer, train, calibration, eval_ = load_data(config, workdir)
  print(f"reward models: {len(train)} training / {len(calibration)} calibration / {len(eval_)} held-out pairs, "
        f"vocab {tokenizer.vocab_size}, {config.model.num_params() / 1e6:.2f}M params each", flush=True)
  train_judges(config, workdir, trainer, tokenizer, train, calibration)
  preds, extra = predictions(config, workdir, trainer, eval_)
  table = comparison(eval_, preds)
  summary = {"accuracy": table, **extra, "wall_time_s": time.time() - start}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "rm_eval.json"), "w") as f:
      json.dump(summary, f, indent=2)
    with open(os.path.join(workdir, "rm_eval.md"), "w") as f:
      f.write(markdown(table) + "\n")
  print("\n" + markdown(table), flush=True)
  if "cot_rm_errors" in extra:
    print(f"CoT RM errors: {extra['cot_rm_errors']}", flush=True)
  print(f"wall time {summary['wall_time_s']:.0f}s", flush=True)
  return summary


if __name__ == "__main__":
  from experiments import cli  # pylint: disable=g-import-not-at-top
  cli.run(run, config_help="Reward-model config file (experiments/configs/rm.py).",
          workdir_help="Directory for the labelled data, the judges, metrics and the comparison.",
          build="rm_config_from_config_dict")
