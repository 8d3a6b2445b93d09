"""Long2short (RECIPE.md section 5) on the main job's output: every variant, one table and one plot.

  python -m experiments.long2short --config=experiments/configs/long2short.py \
      --config.main_workdir=/tmp/k15_arith --workdir=/tmp/k15_l2s
  python -m experiments.long2short --config=experiments/configs/long2short.py:smoke \
      --config.main_workdir=/tmp/k15_smoke --workdir=/tmp/k15_l2s_smoke

The main job's own config (experiments/configs/arith.py, same variant) supplies the sampling, evaluation and RL
settings every variant shares; `long2short` holds what this pipeline adds. The models come from the main job's
workdir, so the architecture is whatever its final/ checkpoint says.
"""
import ml_collections

from experiments.configs import arith


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """arg: "" for the full CPU run, "smoke" for the seconds-long test variant (on a smoke main job)."""
  if arg not in ("", "smoke"):
    raise ValueError(f"unknown config variant {arg!r}; use '' or 'smoke'")
  smoke = arg == "smoke"
  c = arith.get_config(arg)  # seed, sampling, eval, rl and mesh settings of the main job
  c.main_workdir = "/tmp/k15_arith"  # the main job's workdir (read only): data/, warmup/, final/
  c.sampling.num_slots = 64  # concurrent trajectories; a tiny model's decode step costs about the same at 64 as at 32
  if smoke:
    c.eval.max_response_len = 48  # a smoke model rambles; every variant is still evaluated alike

  l = c.long2short = ml_collections.ConfigDict()
  # Stages to run, in this order; rl_<v> is long2short RL starting from the variant v.
  l.variants = ("long", "short", "merge", "merge_rs", "dpo", "rl_long", "rl_merge_rs")
  l.sample_prompts = 16 if smoke else 256  # training prompts sampled for rejection sampling and DPO
  l.samples_per_prompt = 4 if smoke else 8  # n: responses per prompt (the report's 8)
  l.sample_max_len = 64 if smoke else 160  # response cap when sampling for rejection sampling / DPO

  l.short = ml_collections.ConfigDict()  # the short-CoT model: SFT on the step-results-only traces
  l.short.init = "long"  # long (final/) | warmup (warmup/) | scratch: what the short-CoT SFT starts from
  l.short.steps = 10 if smoke else 120
  l.short.batch_size = 16 if smoke else 32
  l.short.learning_rate = 1e-3
  l.short.warmup_steps = 2 if smoke else 20

  l.merge_weights = (0.5, 0.5)  # (long, short); non-negative, summing to 1

  l.rs = ml_collections.ConfigDict()  # merge + shortest rejection sampling: SFT of the merge on its shortest correct
  l.rs.steps = 10 if smoke else 60
  l.rs.batch_size = 16 if smoke else 32
  l.rs.learning_rate = 3e-4
  l.rs.warmup_steps = 2 if smoke else 10

  l.dpo = ml_collections.ConfigDict()  # DPO from the long model, the long model as frozen reference
  l.dpo.beta = 0.1  # scale of the implicit reward beta*(logp - ref_logp)
  l.dpo.long_factor = 1.5  # a correct response at least this times the positive's length is a negative
  l.dpo.steps = 10 if smoke else 40
  l.dpo.batch_size = 8 if smoke else 16  # pairs per step (2x rows per forward pass)
  l.dpo.learning_rate = 1e-3 if smoke else 2e-5  # 1e-4 for 80 steps overfit 101 pairs: accuracy fell to 24.5%
  l.dpo.warmup_steps = 2 if smoke else 10

  l.rl = ml_collections.ConfigDict()  # long2short RL (every rl_<v>): these replace the main job's config.rl fields
  l.rl.iterations = 2 if smoke else 30
  l.rl.max_response_len = 48 if smoke else 64  # much smaller than the main job's 160
  l.rl.token_budget = 48 if smoke else 64  # no partial rollouts: one iteration finishes every response
  l.rl.length_penalty_weight = 0.5  # w: reward = correct + w * len_reward
  l.rl.length_penalty_warmup = 0  # the length penalty is on from the first iteration
  l.rl.curriculum = ()  # all levels throughout: every level has length to cut
  l.rl.learning_rate = 5e-5
  return c
