"""Seeds runner: every variant for every seed; tables and plots of the mean and its 95% interval over seeds.

  python -m experiments.sweep --config=experiments/configs/arith.py:sweep --workdir=/tmp/k15_sweep \
      --seeds=5 --variants=k15,no_length_penalty --report=length_penalty

Seed s runs the config with config.seed = s, which sets its data, initialisation and sampling. A command's seeds
are config.seed + seed_offset + (0, ..., seeds - 1): machines split a sweep with --seed_offset, and a command over
all seeds on a workdir that holds their seed_<s>/ directories (copied together) reuses every finished run.
Variants are either RL variants (experiments/ablation.py's VARIANTS: config.rl overrides, each an RL run from the
seed's warm-up; "k15" is the config as given) or long2short variants (experiments/long2short.py, built from the
seed's "k15" run), not both in one command.

Workdir:
  seed_<s>/                  the seed's ablation workdir (experiments/ablation.py): data/, warmup/ (shared by the
                             seed's variants), warmup_eval.json, variants/<v>/ with rl.jsonl (per-iteration
                             metrics), final/ and result.json (written last; a run without it resumes from its
                             checkpoint)
  seed_<s>/long2short/       the seed's long2short workdir; its long model is seed_<s>/variants/k15/final
  <report>.md, .json, .png   over this command's seeds: each variant's mean and 95% t interval after RL and at the
                             evaluated iterations, the paired differences against --reference, and the curves
"""
import json
import os
import re
import time
from typing import Mapping, Sequence

import ml_collections
import numpy as np

from experiments import ablation
from experiments import long2short as long2short_lib
from experiments import plotting
from experiments import seed_stats
from k15 import config as config_lib
from k15.rl.metrics import read_jsonl

# Per-run results after RL: (key, column title, kind); pct values are fractions, shown in % and in points.
RL_METRICS = (
    ("accuracy", "held-out accuracy (greedy)", "pct"),
    ("sampled_accuracy", "held-out accuracy (one sample, T=1)", "pct"),
    ("mean_tokens", "held-out mean response tokens", "num"),
    ("train_len", "train response tokens (last 5 iterations)", "num"),
    ("samples_seen", "samples trained on", "num"),
    ("s_per_iteration", "s per iteration (median)", "num"),
    ("rollout_s", "rollout s per iteration (median)", "num"),
    ("decode_steps", "decode steps per iteration (mean)", "num"),
)
LONG2SHORT_METRICS = (
    ("accuracy", "held-out accuracy (greedy)", "pct"),
    ("mean_tokens", "held-out mean response tokens", "num"),
    ("tokens_per_correct", "tokens per correct answer", "num"),
)
LONG_RUN = "k15"  # the RL variant whose final model is the long model of long2short


def seed_list(config: config_lib.Config, seeds: int, seed_offset: int) -> list[int]:
  return [config.seed + seed_offset + i for i in range(seeds)]


def seed_dir(workdir: str, seed: int) -> str:
  return os.path.join(workdir, f"seed_{seed}")


def _config_dict(config: config_lib.Config, seed: int) -> ml_collections.ConfigDict:
  return ablation.apply_overrides(ml_collections.ConfigDict(config.to_dict()), {"seed": seed})


def kind_of(variants: Sequence[str]) -> str:
  """"rl" or "long2short", by the variants' names; an unknown name or a mix of both is an error naming them."""
  rl = [v for v in variants if v in ablation.VARIANTS]
  l2s = [v for v in variants if v in config_lib.LONG2SHORT_DEPENDS or config_lib.long2short_start(v)]
  unknown = [v for v in variants if v not in rl + l2s]
  if unknown or not variants:
    raise ValueError(f"--variants: unknown {unknown}; RL variants: {sorted(ablation.VARIANTS)}; long2short "
                     f"variants: {sorted(config_lib.LONG2SHORT_DEPENDS)} and rl_<one of them>")
  if rl and l2s:
    raise ValueError(f"--variants: RL variants {rl} and long2short variants {l2s} go in separate commands")
  return "rl" if rl else "long2short"


def long2short_config(config: config_lib.Config, variants: Sequence[str], seed: int) -> config_lib.Config:
  """The seed's config with config.long2short.variants = variants (checked: order and dependencies)."""
  if config.long2short is None:
    raise ValueError("--variants: long2short variants need a config with a long2short section")
  cd = _config_dict(config, seed)
  cd.long2short.variants = tuple(variants)
  return config_lib.from_config_dict(cd)


# --- running


def _run_done(workdir: str, variant: str) -> bool:
  return os.path.exists(os.path.join(workdir, "variants", variant, "result.json"))


def run_rl_seed(config: config_lib.Config, seed: int, workdir: str, variants: Sequence[str]):
  """The seed's warm-up (once) and one RL run per variant; finished runs are kept, interrupted ones resume."""
  sdir = seed_dir(workdir, seed)
  todo = [v for v in variants if not _run_done(sdir, v)]
  if not todo:
    return
  print(f"=== seed {seed}: {', '.join(todo)}", flush=True)
  setup = ablation.prepare(_config_dict(config, seed), sdir)
  with setup.verifier:
    for v in todo:
      ablation.run_variant(setup, v, ablation.VARIANTS[v])


def run_long2short_seed(config: config_lib.Config, seed: int, workdir: str, variants: Sequence[str]):
  """The seed's long model (its "k15" RL run), then the long2short variants built from it."""
  run_rl_seed(config, seed, workdir, [LONG_RUN])
  sdir = seed_dir(workdir, seed)
  l2s_dir = os.path.join(sdir, "long2short")
  if all(os.path.exists(os.path.join(l2s_dir, "eval", f"{v}.json")) for v in variants):
    return
  print(f"=== seed {seed}: long2short {', '.join(variants)}", flush=True)
  long2short_lib.run(long2short_config(config, variants, seed), l2s_dir, sdir,
                     long_dir=os.path.join(sdir, "variants", LONG_RUN, "final"))


# --- collecting a run's results


def _warmup_eval(sdir: str) -> dict:
  with open(os.path.join(sdir, "warmup_eval.json")) as f:
    return json.load(f)


def rl_run(sdir: str, variant: str, samples_per_prompt: int) -> dict:
  """A finished RL run: its results after RL ("final") and per-iteration curves (steps 1..N; nan where an
  iteration trained no group)."""
  vdir = os.path.join(sdir, "variants", variant)
  with open(os.path.join(vdir, "result.json")) as f:
    result = json.load(f)
  rows = read_jsonl(os.path.join(vdir, "rl.jsonl"))
  if [r["step"] for r in rows] != list(range(1, len(rows) + 1)):
    raise ValueError(f"{vdir}/rl.jsonl: expected one row per iteration 1..{len(rows)}")

  def column(key):
    return np.array([r.get(key, np.nan) for r in rows], np.float64)

  samples = np.cumsum([r.get("groups_trained", 0) for r in rows]) * samples_per_prompt
  warmup = _warmup_eval(sdir)
  evals = {0: warmup["accuracy"], **{r["step"]: r["eval_accuracy"] for r in rows if "eval_accuracy" in r}}
  ev = result["eval"]
  final = {"accuracy": ev["accuracy"], "sampled_accuracy": ev.get("sampled_accuracy"),
           "mean_tokens": ev["mean_tokens"], "train_len": result["response_len_last5"],
           "samples_seen": float(samples[-1]), "s_per_iteration": float(np.median(column("iteration_time_s"))),
           "rollout_s": float(np.median(column("rollout_time_s"))), "decode_steps": float(np.mean(column("decode_steps")))}
  return {"final": {k: v for k, v in final.items() if v is not None},
          "warmup": {k: warmup[k] for k in ("accuracy", "sampled_accuracy", "mean_tokens") if k in warmup},
          "eval_accuracy": evals, "samples_seen": np.concatenate([[0.0], samples]),
          "train_len": column("response_len_mean"), "iteration_time_s": column("iteration_time_s")}


def long2short_run(sdir: str, variant: str) -> dict:
  with open(os.path.join(sdir, "long2short", "eval", f"{variant}.json")) as f:
    ev = json.load(f)
  return {"final": {k: ev[k] for k, _, _ in LONG2SHORT_METRICS}}


# --- statistics and tables


def _interval_dict(iv: seed_stats.Interval) -> dict:
  return {"mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n}


def fmt(iv: seed_stats.Interval, kind: str, diff: bool = False) -> str:
  """'76.2% [71.0, 81.4]' (pct), '53.3 [50.1, 56.5]' (num); differences signed, pct ones in points."""
  scale, unit = (100.0, "%") if kind == "pct" else (1.0, "")
  unit = " pts" if diff and kind == "pct" else unit
  sign = "+" if diff else ""
  if iv.n < 2:
    return f"{scale * iv.mean:{sign}.1f}{unit} [-]"
  return f"{scale * iv.mean:{sign}.1f}{unit} [{scale * iv.low:{sign}.1f}, {scale * iv.high:{sign}.1f}]"


def summarize(runs: Mapping[str, Mapping[int, dict]], metrics, reference: str, warmup: Mapping[int, dict] = None):
  """Means, intervals and paired differences over seeds. runs: variant -> seed -> run (rl_run or long2short_run).

  A metric goes in only when every run has it. Returns a JSON-able dict.
  """
  variants = list(runs)
  seeds = sorted(runs[variants[0]])
  out = {"seeds": seeds, "reference": reference, "final": {}, "differences": {}, "at_iteration": {},
         "at_iteration_differences": {}}
  keys = [k for k, _, _ in metrics if all(k in runs[v][s]["final"] for v in variants for s in seeds)]
  values = {v: {k: {s: runs[v][s]["final"][k] for s in seeds} for k in keys} for v in variants}
  for v in variants:
    out["final"][v] = {k: dict(_interval_dict(seed_stats.t_interval(values[v][k])), values=values[v][k])
                       for k in keys}
    if v != reference:
      out["differences"][v] = {k: _interval_dict(seed_stats.paired_difference(values[v][k], values[reference][k]))
                               for k in keys}
  if warmup:
    wkeys = [k for k in keys if all(k in warmup[s] for s in seeds)]
    out["warmup"] = {k: dict(_interval_dict(seed_stats.t_interval({s: warmup[s][k] for s in seeds})),
                             values={s: warmup[s][k] for s in seeds}) for k in wkeys}
  if all("eval_accuracy" in runs[v][s] for v in variants for s in seeds):
    steps = sorted(set.intersection(*(set(runs[v][s]["eval_accuracy"]) for v in variants for s in seeds)))
    acc = {v: {t: {s: runs[v][s]["eval_accuracy"][t] for s in seeds} for t in steps} for v in variants}
    for v in variants:
      out["at_iteration"][v] = {t: _interval_dict(seed_stats.t_interval(acc[v][t])) for t in steps}
      if v != reference:
        out["at_iteration_differences"][v] = {
            t: _interval_dict(seed_stats.paired_difference(acc[v][t], acc[reference][t])) for t in steps if t}
  return out


def _iv(d: dict) -> seed_stats.Interval:
  return seed_stats.Interval(d["mean"], d["low"], d["high"], d["n"])


def markdown(summary: dict, metrics, descriptions: Mapping[str, str], title: str) -> str:
  """The tables of a summary: results, held-out accuracy at the evaluated iterations, paired differences."""
  seeds, ref = summary["seeds"], summary["reference"]
  kinds = {k: kind for k, _, kind in metrics}
  titles = {k: t for k, t, _ in metrics}
  keys = [k for k, _, _ in metrics if k in next(iter(summary["final"].values()))]
  lines = [f"**{title}**: mean [95% t interval] over {len(seeds)} seeds ({', '.join(map(str, seeds))}).", "",
           "| variant | " + " | ".join(titles[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
  if "warmup" in summary:
    lines.append("| warm-up (before RL) | " + " | ".join(
        fmt(_iv(summary["warmup"][k]), kinds[k]) if k in summary["warmup"] else "-" for k in keys) + " |")
  for v, res in summary["final"].items():
    name = f"{v} ({descriptions[v]})" if descriptions.get(v) else v
    lines.append(f"| {name} | " + " | ".join(fmt(_iv(res[k]), kinds[k]) for k in keys) + " |")
  if summary["at_iteration"]:
    steps = list(next(iter(summary["at_iteration"].values())))
    lines += ["", "Held-out accuracy (greedy) at iteration (0: the warm-up):", "",
              "| variant | " + " | ".join(str(t) for t in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for v, res in summary["at_iteration"].items():
      lines.append(f"| {v} | " + " | ".join(fmt(_iv(res[t]), "pct") for t in steps) + " |")
  if summary["differences"]:
    lines += ["", f"Paired differences, variant minus {ref}, seed by seed:", "",
              "| variant | " + " | ".join(titles[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for v, res in summary["differences"].items():
      lines.append(f"| {v} - {ref} | " + " | ".join(fmt(_iv(res[k]), kinds[k], diff=True) for k in keys) + " |")
  if summary["at_iteration_differences"]:
    steps = list(next(iter(summary["at_iteration_differences"].values())))
    lines += ["", f"Paired differences of held-out accuracy at iteration, variant minus {ref}:", "",
              "| variant | " + " | ".join(str(t) for t in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for v, res in summary["at_iteration_differences"].items():
      lines.append(f"| {v} - {ref} | " + " | ".join(fmt(_iv(res[t]), "pct", diff=True) for t in steps) + " |")
  return "\n".join(lines)


# --- plots


def _band(values_SxT):
  """Per column: the mean over seeds and its 95% interval (nan where fewer than 2 seeds have a value)."""
  mean, low, high = [], [], []
  for col in np.asarray(values_SxT, np.float64).T:
    col = col[np.isfinite(col)]
    iv = seed_stats.t_interval(col) if col.size else seed_stats.Interval(np.nan, np.nan, np.nan, 0)
    mean.append(iv.mean)
    low.append(iv.low)
    high.append(iv.high)
  return np.array(mean), np.array(low), np.array(high)


def plot_rl(runs: Mapping[str, Mapping[int, dict]], png_path: str, title: str):
  """Per variant, the mean over seeds with its 95% band: held-out accuracy against iterations and against samples
  trained on, train response length and wall time per iteration."""
  fig, axes = plotting.pyplot().subplots(1, 4, figsize=(20, 4.4))
  ax_it, ax_samples, ax_len, ax_time = axes
  # Accuracy against samples: each seed's curve interpolated on a grid up to the fewest samples any run reached.
  grid = np.linspace(0, min(r["samples_seen"][-1] for seeds in runs.values() for r in seeds.values()), 60)
  for i, (v, seeds) in enumerate(runs.items()):
    color, rs = f"C{i % 10}", list(seeds.values())
    steps = sorted(set.intersection(*(set(r["eval_accuracy"]) for r in rs)))
    for ax, x, ys in ((ax_it, np.array(steps), [[r["eval_accuracy"][t] for t in steps] for r in rs]),
                      (ax_samples, grid, [np.interp(grid, r["samples_seen"][steps], [r["eval_accuracy"][t] for t in steps])
                                          for r in rs])):
      mean, low, high = _band(ys)
      ax.plot(x, 100 * mean, "o-" if ax is ax_it else "-", color=color, label=v, markersize=4)
      ax.fill_between(x, 100 * low, 100 * high, color=color, alpha=0.2)
    its = np.arange(1, len(rs[0]["train_len"]) + 1)
    for ax, key in ((ax_len, "train_len"), (ax_time, "iteration_time_s")):
      mean, low, high = _band([r[key] for r in rs])
      ax.plot(its, mean, color=color, label=v)
      ax.fill_between(its, low, high, color=color, alpha=0.2)
  ax_it.set(xlabel="iteration (0: warm-up)", ylabel="held-out accuracy (%)", title="held-out accuracy (greedy)")
  ax_samples.set(xlabel="samples trained on", ylabel="held-out accuracy (%)", title="against samples trained on")
  ax_len.set(xlabel="iteration", ylabel="tokens", title="mean train response length")
  ax_time.set(xlabel="iteration", ylabel="s", title="wall time per iteration")
  return plotting.save(fig, axes, png_path, legend_on=[ax_it], title=title, dpi=90)


def plot_long2short(summary: dict, png_path: str, title: str):
  """Held-out accuracy against mean response tokens per variant, with 95% intervals on both axes."""
  fig, ax = plotting.pyplot().subplots(figsize=(7, 4.6))
  markers = "os^Dv<>Pp*X"
  for i, (v, res) in enumerate(summary["final"].items()):
    x, y = res["mean_tokens"], res["accuracy"]
    xerr = [[x["mean"] - x["low"]], [x["high"] - x["mean"]]] if x["n"] > 1 else None
    yerr = [[100 * (y["mean"] - y["low"])], [100 * (y["high"] - y["mean"])]] if y["n"] > 1 else None
    ax.errorbar(x["mean"], 100 * y["mean"], xerr=xerr, yerr=yerr, fmt=markers[i % len(markers)], capsize=3,
                label=v)
  ax.set(xlabel="held-out mean response tokens", ylabel="held-out accuracy (%)", title=title)
  return plotting.save(fig, [ax], png_path, legend_on=[ax])


# --- the command


def check_args(config: config_lib.Config, *, seeds: int, variants: Sequence[str], report: str, seed_offset: int,
               reference: str) -> tuple[str, list[int], str]:
  """(kind, seeds, reference) of a command; a bad flag is a ValueError naming it, before any work."""
  kind = kind_of(variants)
  if seeds < 1 or seed_offset < 0:
    raise ValueError(f"--seeds must be >= 1 and --seed_offset >= 0, got {seeds} and {seed_offset}")
  if not re.fullmatch(r"[\w.\-]+", report):
    raise ValueError(f"--report={report!r}: a file name of letters, digits, '_', '.', '-'")
  reference = reference or variants[0]
  if reference not in variants:
    raise ValueError(f"--reference={reference!r} is not one of --variants {list(variants)}")
  seed_values = seed_list(config, seeds, seed_offset)
  if kind == "long2short":
    long2short_config(config, variants, seed_values[0])  # a bad order or a missing stage
  else:
    for v in variants:
      ablation.variant_config(_config_dict(config, seed_values[0]), ablation.VARIANTS[v])
  return kind, seed_values, reference


def run(config: config_lib.Config, workdir: str, *, seeds: int, variants: Sequence[str], report: str,
        seed_offset: int = 0, reference: str = "") -> dict:
  """Runs what is missing of variants x seeds, then writes <report>.md, .json and .png in workdir."""
  kind, seed_values, reference = check_args(config, seeds=seeds, variants=variants, report=report,
                                            seed_offset=seed_offset, reference=reference)
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  for seed in seed_values:
    (run_long2short_seed if kind == "long2short" else run_rl_seed)(config, seed, workdir, variants)

  title = f"{report}: {config.rl.iterations} RL iterations" if kind == "rl" else f"{report}: long2short"
  if kind == "rl":
    runs = {v: {s: rl_run(seed_dir(workdir, s), v, config.rl.samples_per_prompt) for s in seed_values}
            for v in variants}
    summary = summarize(runs, RL_METRICS, reference, warmup={s: runs[variants[0]][s]["warmup"] for s in seed_values})
    descriptions = {v: ", ".join(f"{k}={val}" for k, val in ablation.VARIANTS[v].items()) for v in variants}
    table = markdown(summary, RL_METRICS, descriptions, title)
    plot_rl(runs, os.path.join(workdir, f"{report}.png"), f"{title}; mean and 95% interval over {seeds} seeds")
  else:
    runs = {v: {s: long2short_run(seed_dir(workdir, s), v) for s in seed_values} for v in variants}
    summary = summarize(runs, LONG2SHORT_METRICS, reference)
    table = markdown(summary, LONG2SHORT_METRICS, {}, title)
    plot_long2short(summary, os.path.join(workdir, f"{report}.png"),
                    f"{title}; mean and 95% interval over {seeds} seeds")
  summary.update(variants=list(variants), kind=kind, wall_time_s=time.time() - start)
  with open(os.path.join(workdir, f"{report}.json"), "w") as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(workdir, f"{report}.md"), "w") as f:
    f.write(table + "\n")
  print("\n" + table, flush=True)
  print(f"\n{os.path.join(workdir, report)}.md, .json, .png ({time.time() - start:.0f}s)", flush=True)
  return summary


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from experiments import cli  # pylint: disable=g-import-not-at-top
  _SEEDS = flags.DEFINE_integer("seeds", 5, "Number of seeds.")
  _OFFSET = flags.DEFINE_integer("seed_offset", 0, "The first seed is config.seed + seed_offset (to split a sweep "
                                 "over machines).")
  _VARIANTS = flags.DEFINE_list("variants", None, "RL variants (experiments/ablation.py VARIANTS) or long2short "
                                "variants (config.long2short.variants' names), in order.")
  _REPORT = flags.DEFINE_string("report", "sweep", "Name of the report files <workdir>/<report>.md, .json, .png.")
  _REFERENCE = flags.DEFINE_string("reference", "", "The variant the paired differences are taken against; "
                                   "default: the first of --variants.")
  flags.mark_flag_as_required("variants")

  def main(config, workdir):
    args = dict(seeds=_SEEDS.value, variants=_VARIANTS.value, report=_REPORT.value, seed_offset=_OFFSET.value,
                reference=_REFERENCE.value)
    try:
      check_args(config, **args)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    run(config, workdir, **args)

  cli.run(main, config_help="Experiment config file (experiments/configs/*.py), e.g. arith.py:sweep.",
          workdir_help="Directory for the seeds' runs and the report.")
