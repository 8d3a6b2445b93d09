"""Long2short (RECIPE.md section 5): short-CoT variants of a main job's long-CoT model, evaluated side by side.

  python -m experiments.long2short --config=experiments/configs/arith.py --main_workdir=/tmp/k15_arith \
      --workdir=/tmp/k15_l2s

Variants (config.long2short.variants, in order): long (the main job's final/ model; run() can take another as
long_dir), short (SFT on the synthetic task's step-results-only traces), merge (weighted average of long and short),
merge_rs (the merge fine-tuned on its own shortest correct response of n), dpo (DPO from long, long as the frozen
reference), rl_<start> (long2short RL: the RL loop from the variant <start>, e.g. rl_long, with
config.long2short.rl's settings). Responses are scored by the run's verifiers, so every variant but short runs on any
prompt set with any reward. Every variant is evaluated on the same held-out prompts with the same sampling settings
(config.eval).

Reads the main job's workdir (data/, warmup/, final/) and never writes there. Writes under --workdir:
  source.json                the main workdir, the long model and a hash of its weights (another one is an error)
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
import time

import jax
import numpy as np

from experiments import train as main_job
from k15 import checkpoint, storage
from k15.config import Config, long2short_start
from k15.long2short import dpo, merge, rejection, report
from k15.rl import evaluation, loop, sft
from k15.rl.metrics import MetricsLogger, plot_rl_curves

SAMPLE_SEED_OFFSET = {"merge": 1, "long": 2}  # sampling seed = config.seed + this (merge for merge_rs, long for dpo)


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


def check_main_workdir(config: Config, main_workdir: str, long_dir: str):
  """The files this pipeline reads; a missing one is an error naming it."""
  l = config.long2short
  need = [os.path.relpath(os.path.join(long_dir, "config.json"), main_workdir)]
  if config.data.source == "arith":
    need += ["data/train.jsonl", "data/eval.jsonl", "data/spm.model"]
  elif not (config.data.tokenizer_path or config.hf_path):
    need += ["data/spm.model"]  # the tokenizer the main job trained on its prompt files
  if "short" in l.variants and l.short_init == "warmup":
    need += ["warmup/config.json"]
  missing = [p for p in need if not os.path.exists(os.path.join(main_workdir, p))]
  if missing:
    raise FileNotFoundError(f"--main_workdir={main_workdir!r} is not a finished main job's workdir: missing "
                            f"{missing} (run experiments.train there first, with the same config)")


class Long2Short:
  """The state shared by the stages: trainer, task, verifier and paths."""

  def __init__(self, config: Config, workdir: str, main_workdir: str, long_dir: str = ""):
    """long_dir: the long model (a Hugging Face checkpoint); "": the main job's final/."""
    if config.long2short is None:
      raise ValueError("the config has no long2short section (config.long2short)")
    self.start = time.time()
    self.config, self.l, self.workdir = config, config.long2short, workdir
    self.main = os.path.abspath(main_workdir)
    self.long = os.path.abspath(long_dir or os.path.join(self.main, "final"))
    check_main_workdir(config, self.main, self.long)
    os.makedirs(workdir, exist_ok=True)
    self._check_source()
    cfg, _ = checkpoint.load_hf(self.long, dtype=config.model.param_dtype)
    self.cfg = dataclasses.replace(cfg, dtype=config.model.dtype, remat=config.model.remat)
    self.trainer = main_job.make_trainer(config, self.cfg)
    self.tokenizer, self.train, self.eval = main_job.load_task(config, self.main, write=False)
    self.verifier = main_job.make_verifier(config)
    self.notes = {}  # variant -> what its training used this run (counts), for the summary

  def _check_source(self):
    source = {"main_workdir": self.main, "long_model": self.long, "final_weights_sha256": _weights_hash(self.long)}
    path = os.path.join(self.workdir, "source.json")
    if os.path.exists(path):
      with open(path) as f:
        old = json.load(f)
      if old["final_weights_sha256"] != source["final_weights_sha256"]:
        raise ValueError(f"{self.workdir} was built from another long model (sha256 "
                         f"{old['final_weights_sha256'][:12]}); use a fresh --workdir for {self.long}")
    elif jax.process_index() == 0:
      storage.write_text(path, json.dumps(source, indent=2))

  # --- paths, loading and saving

  def model_dir(self, variant):
    return os.path.join(self.workdir, "models", variant)

  def has_model(self, variant):
    return checkpoint.is_complete(self.model_dir(variant))

  def load(self, path):
    """Params of an HF checkpoint, placed on the mesh. Every call reads the disk: training steps donate params."""
    cfg, params = checkpoint.load_hf(path, dtype=self.config.model.param_dtype)
    if dataclasses.replace(cfg, dtype=self.cfg.dtype, remat=self.cfg.remat) != self.cfg:
      raise ValueError(f"{path}: architecture {cfg} differs from the long model's {self.cfg}")
    return self.trainer.place_params(params)

  def load_variant(self, variant):
    return self.load(self.model_dir(variant))

  def save(self, variant, params):
    """Writes models/<variant> whole or not at all (a stopped run never leaves a half-written one to skip over)."""
    for stale in ("eval", "samples"):  # results of an older model of this name
      path = os.path.join(self.workdir, stale, f"{variant}.json")
      if os.path.exists(path):
        os.remove(path)
    if jax.process_index() == 0:
      checkpoint.save_hf(self.model_dir(variant), self.cfg, jax.device_get(params))

  def log(self, msg):
    print(f"[long2short {time.time() - self.start:6.0f}s] {msg}", flush=True)

  def sft(self, variant, params, prompts, targets, cfg):
    """SFT of params (cfg: an SFTConfig) on (prompt, target) pairs, logged to <variant>.jsonl; saved as variant."""
    logger = MetricsLogger(self.workdir, variant, total_steps=cfg.steps)
    params = sft.sft_train(self.trainer, params, prompts, targets, cfg, pad_id=self.tokenizer.pad_id,
                           seed=self.config.seed, logger=logger, log_every=max(1, cfg.steps // 4))
    logger.close()
    self.save(variant, params)

  # --- stages

  def stage_long(self):
    self.save("long", self.load(self.long))

  def stage_short(self):
    """SFT on the training problems with the short traces (step results only) as targets."""
    from k15.data import sources, tasks  # pylint: disable=g-import-not-at-top
    if self.l.short_init == "scratch":
      params = self.trainer.init_params(jax.random.PRNGKey(self.config.seed))
    else:
      params = self.load(self.long if self.l.short_init == "long" else os.path.join(self.main, "warmup"))
    examples = tasks.load_examples(sources.arith_task_names(os.path.join(self.main, "data"), "cot_short")["train"])
    self.sft("short", params, [ex["inputs_ids"] for ex in examples], [ex["targets_ids"] for ex in examples],
             self.l.short)

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
      if {k: d[k] for k in key if k in d} == key:  # the same prompts and sampling settings
        return examples, d["responses"], np.asarray(d["lengths"]), np.asarray(d["correct"])
    responses, lengths, correct = rejection.sample_groups(
        self.trainer, self.load_variant(variant), self.tokenizer, examples, self.config.sampling, self.verifier,
        n=self.l.samples_per_prompt, seed=seed, max_new_tokens=self.l.sample_max_len)
    self.log(f"  sampled {lengths.size} responses from {variant}: accuracy {correct.mean():.1%}, mean tokens "
             f"{lengths.mean():.1f}, prompts with a correct one {correct.any(axis=1).mean():.1%}")
    if jax.process_index() == 0:
      storage.write_text(path, json.dumps(dict(key, responses=responses, lengths=lengths.tolist(),
                                               correct=correct.tolist())))  # whole or absent: read back on resume
    return examples, responses, lengths, correct

  def stage_merge_rs(self):
    examples, responses, lengths, correct = self.samples("merge", self.config.seed + SAMPLE_SEED_OFFSET["merge"])
    prompts, targets = rejection.rejection_sft_set(examples, responses, lengths, correct, self.tokenizer.eos_id)
    self.notes["merge_rs"] = f"{len(prompts)} SFT examples"
    if not prompts:  # a tiny or broken model: say so loudly, keep the variant so the table stays complete
      self.log("  WARNING merge_rs: no sampled response of the merge is correct; merge_rs = merge, unchanged")
      self.save("merge_rs", self.load_variant("merge"))
      return
    self.log(f"  SFT on {len(prompts)} shortest correct responses, mean {np.mean([len(t) - 1 for t in targets]):.1f} "
             f"tokens")
    self.sft("merge_rs", self.load_variant("merge"), prompts, targets, self.l.rs)

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
                           rejected, d, pad_id=self.tokenizer.pad_id, seed=self.config.seed, logger=logger,
                           log_every=max(1, d.steps // 4))
    logger.close()
    self.save("dpo", params)

  def rl_config(self) -> Config:
    """The run's config with long2short's RL; run_rl evaluates only when asked: every variant alike afterwards."""
    return dataclasses.replace(self.config, rl=self.l.rl, eval=dataclasses.replace(self.config.eval, every=0))

  def stage_rl(self, variant):
    rl_dir = os.path.join(self.workdir, variant)
    params = loop.run_rl(self.rl_config(), rl_dir, self.trainer, self.load_variant(long2short_start(variant)),
                         self.tokenizer, self.train, self.eval, self.verifier)
    if jax.process_index() == 0 and os.path.exists(os.path.join(rl_dir, "rl.jsonl")):
      plot_rl_curves(os.path.join(rl_dir, "rl.jsonl"), os.path.join(rl_dir, "rl_curves.png"),
                     title=f"long2short RL from {long2short_start(variant)}")
    self.save(variant, params)

  def evaluate(self, variant):
    path = os.path.join(self.workdir, "eval", f"{variant}.json")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    result = evaluation.evaluate(self.trainer, self.load_variant(variant), self.tokenizer, self.eval,
                                 self.config.sampling, self.config.eval, self.verifier)
    if jax.process_index() == 0:
      storage.write_text(path, json.dumps(result, indent=2))  # whole or absent: its presence means done
    return result

  def descriptions(self):
    l, rl = self.l, self.l.rl
    rl_how = (f"{rl.iterations} iterations, max {rl.max_response_len} tokens, length penalty "
              f"{rl.length_penalty_weight:g} " + ("from the start" if not rl.length_penalty_warmup
                                                  else f"after {rl.length_penalty_warmup} iterations"))
    out = {"long": "the main job's RL model"}
    if l.short:
      out["short"] = f"SFT on short traces from {l.short_init}, {l.short.steps} steps"
    if l.merge_weights:
      out["merge"] = f"{l.merge_weights[0]:g} long + {l.merge_weights[1]:g} short"
    out["merge_rs"] = f"merge + SFT on its shortest correct of {l.samples_per_prompt}"
    if l.dpo:
      out["dpo"] = f"DPO from long, beta {l.dpo.beta:g}, {l.dpo.steps} steps"
    out.update({v: f"RL from {long2short_start(v)}, {rl_how}" for v in l.variants if long2short_start(v)})
    return out

  def run(self) -> dict:
    """Every configured variant (skipping those whose model exists), each evaluated; the table and the plot."""
    variants = self.l.variants
    self.log(f"main job {self.main}: {len(self.train)} train / {len(self.eval)} held-out problems; "
             f"variants {list(variants)}")
    results = {}
    with self.verifier:
      for i, v in enumerate(variants, 1):
        t0 = time.time()
        if self.has_model(v):
          self.log(f"stage {i}/{len(variants)} {v}: model found, skipped")
        else:
          self.log(f"stage {i}/{len(variants)} {v}: training")
          self.stage_rl(v) if long2short_start(v) else getattr(self, f"stage_{v}")()
        results[v] = self.evaluate(v)
        self.log(f"stage {i}/{len(variants)} {v}: accuracy {results[v]['accuracy']:.1%}, mean tokens "
                 f"{results[v]['mean_tokens']:.1f} ({time.time() - t0:.0f}s)")
    return self.report(results)

  def report(self, results: dict) -> dict:
    """The table (markdown and CSV), the plot and summary.json of the evaluated variants."""
    rows = report.rows_against(results, "long")
    descriptions = self.descriptions()
    table = report.markdown_table(rows, descriptions)
    summary = {"results": results, "rows": rows, "descriptions": {v: descriptions[v] for v in results},
               "trained_on": self.notes, "main_workdir": self.main, "wall_time_s": time.time() - self.start}
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, "long2short.md"), "w") as f:
        f.write(table + "\n")
      report.write_csv(os.path.join(self.workdir, "long2short.csv"), rows)
      report.plot(os.path.join(self.workdir, "long2short.png"), rows)
      with open(os.path.join(self.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("\n" + table, flush=True)
    for r in rows:
      if long2short_start(r["variant"]):
        print(f"{r['variant']} against long: {r['token_change']:+.1%} mean tokens, "
              f"{r['accuracy_change_points']:+.1f} accuracy points", flush=True)
    print(f"wall time {summary['wall_time_s']:.0f}s; {os.path.join(self.workdir, 'long2short.md')}, .csv, .png",
          flush=True)
    return summary


def run(config: Config, workdir: str, main_workdir: str, long_dir: str = "") -> dict:
  """Runs (or resumes) every configured variant, evaluates each and writes the table and plot."""
  return Long2Short(config, workdir, main_workdir, long_dir).run()


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from experiments import cli  # pylint: disable=g-import-not-at-top
  _MAIN = flags.DEFINE_string("main_workdir", None, "The finished main job's workdir (read only).")
  flags.mark_flag_as_required("main_workdir")
  cli.run(lambda config, workdir: run(config, workdir, _MAIN.value),
          config_help="The main job's config file, with its long2short section (experiments/configs/*.py).",
          workdir_help="Directory for the variants' models, the table and the plot.")
