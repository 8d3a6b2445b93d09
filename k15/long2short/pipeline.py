"""The long2short pipeline (RECIPE.md section 5): from the main job's long-CoT model to shorter variants.

Variants (config.long2short.variants, in order): long (the main job's final/ model), short (SFT on the
step-results-only traces), merge (weighted average of long and short), merge_rs (the merge fine-tuned on its own
shortest correct response of n), dpo (DPO from long, long as the frozen reference), rl_<start> (long2short RL: the
RL loop from the variant <start>, e.g. rl_long, with the length penalty on from the start and a much smaller
maximum response length).
Every variant is evaluated on the same held-out prompts with the same sampling settings (config.eval).

Reads the main job's workdir (data/, warmup/, final/) and never writes there. Writes under its own workdir:
  source.json                the main workdir and a hash of its final/ weights (another long model is an error)
  models/<variant>/          each variant as a Hugging Face checkpoint (long: a copy of final/)
  samples/<variant>.json     n sampled responses per prompt (merge: for rejection sampling, long: for DPO)
  eval/<variant>.json        held-out accuracy, mean tokens, tokens per correct answer, per-level accuracy
  rl_<start>/                a long2short RL run (checkpoints, rl.jsonl, rl_curves.png); it resumes
  short.jsonl, merge_rs.jsonl, dpo.jsonl   training metrics (and tensorboard/)
  long2short.md / .csv / .png, summary.json   the table, the scatter plot, all results
A stage whose output exists is skipped. To redo one, delete models/<variant> (and those built on it).
"""
import dataclasses
import hashlib
import json
import os
import shutil
import time

import jax
import numpy as np

from k15 import models, sharding
from k15.long2short import dpo, merge, rejection, report
from k15.rl import evaluation, loop, sft
from k15.rl import pipeline as main_pipeline
from k15.rl.metrics import MetricsLogger, plot_rl_curves
from k15.rl.trainer import Trainer

# Each variant and the variants it is built from (which must run before it). Besides these, "rl_<start>" is
# long2short RL from the variant <start> (one of these).
DEPENDS = {"long": (), "short": (), "merge": ("long", "short"), "merge_rs": ("merge",), "dpo": ("long",)}
SHORT_INITS = ("long", "warmup", "scratch")
SAMPLE_SEED_OFFSET = {"merge": 1, "long": 2}  # sampling seed = config.seed + this (merge for merge_rs, long for dpo)


def rl_start(variant: str):
  """The variant an "rl_<start>" variant starts from; None for the other variants."""
  return variant[3:] if variant.startswith("rl_") and variant[3:] in DEPENDS else None


def _needs(variant: str) -> tuple:
  start = rl_start(variant)
  return (start,) if start else DEPENDS[variant]


def check_config(config):
  """Clear errors for a config this pipeline cannot run, naming the field."""
  l = config.long2short
  variants = tuple(l.variants)
  unknown = [v for v in variants if v not in DEPENDS and not rl_start(v)]
  if unknown:
    raise ValueError(f"config.long2short.variants: unknown {unknown}; valid: {list(DEPENDS)} and rl_<one of them>")
  if "long" not in variants:
    raise ValueError("config.long2short.variants must include 'long': every variant is compared with it")
  if len(set(variants)) != len(variants):
    raise ValueError(f"config.long2short.variants repeats a name: {variants}")
  if l.short.init not in SHORT_INITS:
    raise ValueError(f"config.long2short.short.init={l.short.init!r}; valid: {list(SHORT_INITS)}")
  for i, v in enumerate(variants):
    missing = [d for d in _needs(v) if d not in variants[:i]]
    if missing:
      raise ValueError(f"config.long2short.variants: {v!r} is built from {missing}, which must come before it")
  extra = sorted(k for k in l.rl if k not in config.rl)
  if extra:
    raise ValueError(f"config.long2short.rl: {extra} are not fields of config.rl, which they would replace")
  if l.samples_per_prompt < 2:
    raise ValueError(f"config.long2short.samples_per_prompt must be >= 2 to choose among responses, "
                     f"got {l.samples_per_prompt}")
  merge.merge_params({"w": np.zeros(1, np.float32)}, {"w": np.zeros(1, np.float32)}, l.merge_weights)  # validates


def rl_config(config):
  """The main job's config with config.long2short.rl replacing its rl fields; evaluation left to the pipeline."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for k, v in config.long2short.rl.items():
      c.rl[k] = v
    c.eval.every = 0  # run_rl evaluates only when asked; every variant is evaluated the same way afterwards
  return c


def _sha256(path, chunk=1 << 20):
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      h.update(block)
  return h.hexdigest()


def _weights_hash(model_dir):
  files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"{model_dir}: no .safetensors files")
  return hashlib.sha256("".join(_sha256(os.path.join(model_dir, f)) for f in files).encode()).hexdigest()


def check_main_workdir(main_workdir, need_warmup=False):
  """The files this pipeline reads; a missing one is an error naming it."""
  need = ["data/train.jsonl", "data/eval.jsonl", "data/spm.model", "final/config.json"]
  need += ["warmup/config.json"] if need_warmup else []  # config.long2short.short.init="warmup"
  missing = [p for p in need if not os.path.exists(os.path.join(main_workdir, p))]
  if missing:
    raise FileNotFoundError(f"config.main_workdir={main_workdir!r} is not a finished main job's workdir: missing "
                            f"{missing} (run experiments.train there first)")


class Long2Short:
  """The state shared by the stages: trainer, task and paths."""

  def __init__(self, config, workdir):
    self.start = time.time()
    check_config(config)
    self.config, self.l, self.workdir = config, config.long2short, workdir
    self.main = os.path.abspath(config.main_workdir)
    check_main_workdir(self.main, need_warmup=self.l.short.init == "warmup")
    os.makedirs(workdir, exist_ok=True)
    self._check_source()
    cfg, _ = models.load_hf(os.path.join(self.main, "final"), dtype=config.model.param_dtype)
    self.cfg = dataclasses.replace(cfg, dtype=config.model.dtype, remat=config.model.remat)
    self.trainer = Trainer(self.cfg, sharding.make_mesh(dict(config.mesh)), config.sharding.logical_axis_rules)
    self.tokenizer, self.train, self.eval = main_pipeline.load_task(config, self.main)
    self.notes = {}  # variant -> what its training used this run (counts), for the summary

  def _check_source(self):
    source = {"main_workdir": self.main, "final_weights_sha256": _weights_hash(os.path.join(self.main, "final"))}
    path = os.path.join(self.workdir, "source.json")
    if os.path.exists(path):
      with open(path) as f:
        old = json.load(f)
      if old["final_weights_sha256"] != source["final_weights_sha256"]:
        raise ValueError(f"{self.workdir} was built from another long model ({old['main_workdir']}/final, sha256 "
                         f"{old['final_weights_sha256'][:12]}); use a fresh --workdir for {self.main}/final")
    elif jax.process_index() == 0:
      with open(path, "w") as f:
        json.dump(source, f, indent=2)

  # --- paths, loading and saving

  def model_dir(self, variant):
    return os.path.join(self.workdir, "models", variant)

  def has_model(self, variant):
    return os.path.exists(os.path.join(self.model_dir(variant), "config.json"))

  def load(self, path):
    """Params of an HF checkpoint, placed on the mesh. Every call reads the disk: training steps donate params."""
    cfg, params = models.load_hf(path, dtype=self.config.model.param_dtype)
    if dataclasses.replace(cfg, dtype=self.cfg.dtype, remat=self.cfg.remat) != self.cfg:
      raise ValueError(f"{path}: architecture {cfg} differs from the long model's {self.cfg}")
    return self.trainer.place_params(params)

  def load_variant(self, variant):
    return self.load(self.model_dir(variant))

  def save(self, variant, params):
    """Writes models/<variant> atomically (a stopped run never leaves a half-written checkpoint to skip over)."""
    for stale in ("eval", "samples"):  # results of an older model of this name
      path = os.path.join(self.workdir, stale, f"{variant}.json")
      if os.path.exists(path):
        os.remove(path)
    if jax.process_index() != 0:
      return
    tmp = self.model_dir(variant) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    models.save_hf(tmp, self.cfg, jax.device_get(params))
    shutil.rmtree(self.model_dir(variant), ignore_errors=True)
    os.replace(tmp, self.model_dir(variant))

  def log(self, msg):
    print(f"[long2short {time.time() - self.start:6.0f}s] {msg}", flush=True)

  # --- stages

  def stage_long(self):
    self.save("long", self.load(os.path.join(self.main, "final")))

  def short_examples(self):
    """The training problems with the short traces (step results only) as targets."""
    from k15.data import tasks  # seqio (TensorFlow) only here
    data_dir = os.path.join(self.main, "data")
    prefix = f"k15_l2s_short_{abs(hash(data_dir)) % 10**8}"
    tasks.register_arith_tasks(data_dir, os.path.join(data_dir, "spm.model"), name_prefix=prefix,
                               target_field="cot_short")
    return tasks.load_examples(f"{prefix}_train")

  def stage_short(self):
    s = self.l.short
    if s.init == "scratch":
      params = self.trainer.init_params(jax.random.PRNGKey(self.config.seed))
    else:
      params = self.load(os.path.join(self.main, "final" if s.init == "long" else "warmup"))
    examples = self.short_examples()
    logger = MetricsLogger(self.workdir, "short", total_steps=s.steps)
    params = sft.sft_train(self.trainer, params, [ex["inputs_ids"] for ex in examples],
                           [ex["targets_ids"] for ex in examples], steps=s.steps, batch_size=s.batch_size,
                           learning_rate=s.learning_rate, warmup_steps=s.warmup_steps,
                           pad_id=self.tokenizer.pad_id, seed=self.config.seed, logger=logger,
                           log_every=max(1, s.steps // 4))
    logger.close()
    self.save("short", params)

  def stage_merge(self):
    self.save("merge", merge.merge_params(self.load_variant("long"), self.load_variant("short"), self.l.merge_weights))

  def sample_prompts(self):
    """The same seeded subset of training prompts for rejection sampling and DPO."""
    order = np.random.default_rng(self.config.seed).permutation(len(self.train))
    return [self.train[i] for i in order[:self.l.sample_prompts]]

  def samples(self, variant, seed):
    """n responses per sampled prompt from `variant` (cached in samples/<variant>.json with its settings)."""
    path = os.path.join(self.workdir, "samples", f"{variant}.json")
    examples = self.sample_prompts()
    key = {"ids": [ex["id"] for ex in examples], "n": self.l.samples_per_prompt, "max_len": self.l.sample_max_len,
           "seed": seed}
    if os.path.exists(path):
      with open(path) as f:
        d = json.load(f)
      if all(d.get(k) == v for k, v in key.items()):  # the same prompts and sampling settings
        return examples, d["responses"], np.asarray(d["lengths"]), np.asarray(d["correct"])
    responses, lengths, correct = rejection.sample_groups(
        self.trainer, self.load_variant(variant), self.tokenizer, examples, self.config,
        self.l.samples_per_prompt, seed, self.l.sample_max_len)
    self.log(f"  sampled {lengths.size} responses from {variant}: accuracy {correct.mean():.1%}, mean tokens "
             f"{lengths.mean():.1f}, prompts with a correct one {correct.any(axis=1).mean():.1%}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w") as f:
        json.dump(dict(key, responses=responses, lengths=lengths.tolist(), correct=correct.tolist()), f)
    return examples, responses, lengths, correct

  def stage_merge_rs(self):
    r = self.l.rs
    examples, responses, lengths, correct = self.samples("merge", self.config.seed + SAMPLE_SEED_OFFSET["merge"])
    prompts, targets = rejection.rejection_sft_set(examples, responses, lengths, correct, self.tokenizer.eos_id)
    self.notes["merge_rs"] = f"{len(prompts)} SFT examples"
    if not prompts:  # a tiny or broken model: say so loudly, keep the variant so the table stays complete
      self.log("  WARNING merge_rs: no sampled response of the merge is correct; merge_rs = merge, unchanged")
      self.save("merge_rs", self.load_variant("merge"))
      return
    self.log(f"  SFT on {len(prompts)} shortest correct responses, mean {np.mean([len(t) - 1 for t in targets]):.1f} "
             f"tokens")
    logger = MetricsLogger(self.workdir, "merge_rs", total_steps=r.steps)
    params = sft.sft_train(self.trainer, self.load_variant("merge"), prompts, targets, steps=r.steps,
                           batch_size=r.batch_size, learning_rate=r.learning_rate, warmup_steps=r.warmup_steps,
                           pad_id=self.tokenizer.pad_id, seed=self.config.seed, logger=logger,
                           log_every=max(1, r.steps // 4))
    logger.close()
    self.save("merge_rs", params)

  def stage_dpo(self):
    d = self.l.dpo
    examples, responses, lengths, correct = self.samples("long", self.config.seed + SAMPLE_SEED_OFFSET["long"])
    eos = self.tokenizer.eos_id
    prompts, chosen, rejected = [], [], []
    for ex, group, len_G, cor_G in zip(examples, responses, lengths, correct):
      for c, r in dpo.build_dpo_pairs(len_G, cor_G, d.long_factor):
        prompts.append(ex["inputs_ids"])
        chosen.append(list(group[c]) + [eos])
        rejected.append(list(group[r]) + [eos])
    self.notes["dpo"] = f"{len(prompts)} pairs"
    if not prompts:
      self.log("  WARNING dpo: no preference pairs (no sampled group has a correct response and a longer "
               "negative); dpo = long, unchanged")
      self.save("dpo", self.load_variant("long"))
      return
    self.log(f"  DPO on {len(prompts)} pairs from {len(examples)} prompts")
    logger = MetricsLogger(self.workdir, "dpo", total_steps=d.steps)
    params = dpo.dpo_train(self.trainer, self.load_variant("long"), self.load_variant("long"), prompts, chosen,
                           rejected, steps=d.steps, batch_size=d.batch_size, learning_rate=d.learning_rate,
                           warmup_steps=d.warmup_steps, beta=d.beta, pad_id=self.tokenizer.pad_id,
                           seed=self.config.seed, logger=logger, log_every=max(1, d.steps // 4))
    logger.close()
    self.save("dpo", params)

  def stage_rl(self, variant):
    rl_dir = os.path.join(self.workdir, variant)
    params = loop.run_rl(rl_config(self.config), rl_dir, self.trainer, self.load_variant(rl_start(variant)),
                         self.tokenizer, self.train, self.eval)
    if jax.process_index() == 0 and os.path.exists(os.path.join(rl_dir, "rl.jsonl")):
      plot_rl_curves(os.path.join(rl_dir, "rl.jsonl"), os.path.join(rl_dir, "rl_curves.png"),
                     title=f"long2short RL from {rl_start(variant)}")
    self.save(variant, params)

  def evaluate(self, variant):
    path = os.path.join(self.workdir, "eval", f"{variant}.json")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    result = evaluation.evaluate(self.trainer, self.load_variant(variant), self.tokenizer, self.eval, self.config)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result

  def descriptions(self):
    l = self.l
    rl_cfg = rl_config(self.config).rl
    rl_how = (f"{rl_cfg.iterations} iterations, max {rl_cfg.max_response_len} tokens, length penalty "
              f"{rl_cfg.length_penalty_weight:g} " + ("from the start" if not rl_cfg.length_penalty_warmup
                                                       else f"after {rl_cfg.length_penalty_warmup} iterations"))
    out = {
        "long": "the main job's RL model",
        "short": f"SFT on short traces from {l.short.init}, {l.short.steps} steps",
        "merge": f"{l.merge_weights[0]:g} long + {l.merge_weights[1]:g} short",
        "merge_rs": f"merge + SFT on its shortest correct of {l.samples_per_prompt}",
        "dpo": f"DPO from long, beta {l.dpo.beta:g}, {l.dpo.steps} steps",
    }
    out.update({v: f"RL from {rl_start(v)}, {rl_how}" for v in l.variants if rl_start(v)})
    return out

  def run(self) -> dict:
    """Every configured variant (skipping those whose model exists), each evaluated; the table and the plot."""
    workdir = self.workdir
    variants = tuple(self.l.variants)
    self.log(f"main job {self.main}: {len(self.train)} train / {len(self.eval)} held-out problems; "
             f"variants {list(variants)}")
    results = {}
    for i, v in enumerate(variants, 1):
      t0 = time.time()
      if self.has_model(v):
        self.log(f"stage {i}/{len(variants)} {v}: model found, skipped")
      else:
        self.log(f"stage {i}/{len(variants)} {v}: training")
        self.stage_rl(v) if rl_start(v) else getattr(self, f"stage_{v}")()
      results[v] = self.evaluate(v)
      self.log(f"stage {i}/{len(variants)} {v}: accuracy {results[v]['accuracy']:.1%}, mean tokens "
               f"{results[v]['mean_tokens']:.1f} ({time.time() - t0:.0f}s)")

    rows = report.rows_against(results, "long")
    descriptions = self.descriptions()
    table = report.markdown_table(rows, descriptions)
    summary = {"results": results, "rows": rows, "descriptions": {v: descriptions[v] for v in variants},
               "trained_on": self.notes, "main_workdir": self.main,
               "wall_time_s": time.time() - self.start}
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "long2short.md"), "w") as f:
        f.write(table + "\n")
      report.write_csv(os.path.join(workdir, "long2short.csv"), rows)
      report.plot(os.path.join(workdir, "long2short.png"), rows)
      with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("\n" + table, flush=True)
    for r in rows:
      if rl_start(r["variant"]):
        print(f"{r['variant']} against long: {r['token_change']:+.1%} mean tokens, "
              f"{r['accuracy_change_points']:+.1f} accuracy points", flush=True)
    print(f"wall time {summary['wall_time_s']:.0f}s; {os.path.join(workdir, 'long2short.md')}, .csv, .png", flush=True)
    return summary


def run(config, workdir: str) -> dict:
  """Runs (or resumes) every configured variant, evaluates each and writes the table and plot."""
  return Long2Short(config, workdir).run()
