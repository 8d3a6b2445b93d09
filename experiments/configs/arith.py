"""The main job, a complete k1.5 run on the synthetic arithmetic task (CPU, minutes), and its long2short stage.

  python -m experiments.train --config=experiments/configs/arith.py --workdir=/tmp/k15_arith
  python -m experiments.long2short --config=experiments/configs/arith.py --main_workdir=/tmp/k15_arith \
      --workdir=/tmp/k15_l2s

arg: "" for the full CPU run, "smoke" for the seconds-long variant the tests run, "sweep" for the seeds runner
(experiments/sweep.py: the main job with 20 RL iterations, about 2 minutes of CPU per run), "longtail" for the
sweep on a task whose response lengths are long-tailed (a few long chains). Any field can be overridden:
--config.rl.tau=0.05 --config.model.n_layers=2.
"""
import ml_collections

from experiments.configs.architectures import ARCHITECTURES
from experiments.configs.loss import k15_loss
from k15.sharding import DEFAULT_RULES, SAMPLING_RULES

VARIANTS = ("", "smoke", "sweep", "longtail")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in VARIANTS:
    raise ValueError(f"unknown config variant {arg!r}; one of {VARIANTS}")
  smoke = arg == "smoke"
  c = ml_collections.ConfigDict()
  c.seed = 0  # everything (data, init, sampling) derives from this

  c.model = ml_collections.ConfigDict(ARCHITECTURES["tiny" if smoke else "arith"])  # the shape fields
  c.model.param_dtype = "float32"  # params and optimizer state
  c.model.dtype = "float32"  # matmuls and activations
  c.model.remat = False  # recompute each layer in the backward pass
  # Full passes' attention: "auto" (splash on TPU; else dense up to attention_block tokens, blockwise beyond),
  # "dense", "blockwise" (flash-style, no T x T matrix), "splash" (Pallas, TPU).
  c.model.attention = "auto"
  c.model.attention_block = 512  # query and key block of blockwise and splash attention
  c.model.logprob_chunk = 1024  # log-probs from the logits of this many positions at a time (0: all at once)
  # A long-context checkpoint's rope scaling (k15.models.RopeScaling; hf_path's must match), e.g.
  # dict(type="yarn", factor=4.0, original_max_position_embeddings=4096); None: plain rotary embeddings.
  c.model.rope_scaling = None
  c.model.hf_path = ""  # a Hugging Face checkpoint to start from; "": random init

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: the rest of the devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.dcn_data = 1  # slices that 'data' spans (multi-slice TPU runs); the sizes above are per slice
  c.sharding = ml_collections.ConfigDict()
  c.sharding.logical_axis_rules = DEFAULT_RULES  # (logical axis, mesh axes) pairs of training
  c.sharding.sampling_rules = SAMPLING_RULES  # of sampling: tensor parallel; the params move once per rollout phase

  c.data = ml_collections.ConfigDict()
  c.data.source = "arith"  # the synthetic task, generated into the workdir (k15/data/arith.py)
  c.data.n_train = 400 if smoke else 4000  # generated training problems (SFT traces and RL prompts)
  c.data.n_eval = 32 if smoke else 200  # held-out problems
  c.data.levels = (1, 2, 3, 4)  # difficulty levels: chains of 1 to 4 steps
  c.data.level_shares = ()  # each level's share of the problems, in the order of levels; (): even
  c.data.tokenizer_vocab_size = 128  # SentencePiece vocab trained on the generated corpus
  c.data.direct_prob = 0.6  # share of warm-up targets that answer at once, without reasoning: RL's headroom

  c.sft = ml_collections.ConfigDict()  # long-CoT warm-up
  c.sft.steps = 30 if smoke else 400  # 0: RL starts from the initial params
  c.sft.batch_size = 16 if smoke else 32
  c.sft.learning_rate = 3e-3  # peak of a warm-up + cosine schedule
  c.sft.warmup_steps = 5 if smoke else 100

  c.sampling = ml_collections.ConfigDict()  # rollouts (and evaluation, at eval.temperature)
  c.sampling.temperature = 1.0  # rollouts sample (> 0)
  c.sampling.top_p = 1.0  # 1.0: off
  c.sampling.top_k = 0  # 0: off
  c.sampling.chunk_size = 16  # decode steps per dispatch; slots are refilled between chunks
  c.sampling.num_slots = 32  # concurrent trajectories in the rollout engine
  c.sampling.repeat_ngram = 8  # n-gram size for repeat detection (0: off)
  c.sampling.repeat_count = 4  # an n-gram seen this often stops the trajectory with reason "repeat"
  c.sampling.page_size = 16  # positions per page of the paged KV cache
  c.sampling.num_pages = 0  # pages of the KV cache; 0: every slot can reach the longest sequence at once
  # The sampler's device calls: "model" (the model's own paged passes, any platform) or a plug-in module:
  # k15.sampling.native is C++ for float32 models on CPU (the model's passes where it cannot run).
  c.sampling.backend = "k15.sampling.native"
  # The plug-in's options: the native one's matmuls, "auto" (default: "int8x9" on a CPU with AMX tiles, else
  # "float32"), "float32", "bf16x6", "bf16x3", "int8x9" (k15/sampling/native/weights.py); "step": "native" (its
  # whole pass, default) or "model" (the model's passes, split over a mesh, with its attention). "model"'s options:
  # "scan_layers" (loop over the layer stack instead of each layer's weights apart).
  c.sampling.backend_options = ml_collections.ConfigDict({"matmul": "auto"})

  c.reward = ml_collections.ConfigDict()
  c.reward.default_domain = "arith"  # verifier of examples without a domain field: arith | math | code
  c.reward.math_timeout_s = 5.0  # per-item timeout of the math-verify pool (math prompts only)
  c.reward.math_workers = 1  # math-verify processes (math prompts only)
  # Code rewards in a sandbox without namespaces, where the machine forbids them (k15/rewards/sandbox.py): only for
  # trusted programs or a disposable machine.
  c.reward.sandbox_allow_unisolated = False
  c.reward.rm_path = ""  # reward models (python -m experiments.train_rm --workdir=...): cot_rm/, value_rm/; "": none
  # rl.reward="mix": {domain: rules | cot_rm | value_rm}; domains left out use their rule-based verifier
  c.reward.mix = ml_collections.ConfigDict({"math": "cot_rm"})

  c.rl = ml_collections.ConfigDict()
  c.rl.iterations = 3 if smoke else 40
  c.rl.prompts_per_iteration = 8 if smoke else 16
  c.rl.samples_per_prompt = 4 if smoke else 8  # k
  c.rl.token_budget = 48 if smoke else 96  # per-iteration output tokens per trajectory; the rest is resumed later
  c.rl.max_response_len = 160  # total response tokens; reason "max_length" beyond
  # Growing responses over training: ((from iteration, max_response_len, token_budget), ...) replace the two above
  # from that iteration on. The new cap holds for buffered partial rollouts too: they continue up to a grown cap,
  # and one already beyond a shrunk cap finishes with "max_length". The rollout cache is sized for the longest.
  c.rl.length_schedule = ()
  c.rl.minibatches = 2  # gradient steps per iteration
  c.rl.optimizer = "adam"  # adam | sgd | momentum
  c.rl.learning_rate = 5e-5  # Adam restarts every iteration: its first steps move every weight by ~lr
  c.rl.update(k15_loss())  # the k1.5 loss (RECIPE.md section 4) and its optimizer settings
  c.rl.partial_rollouts = True  # False: every sample runs to its end in one iteration (token_budget unused)
  c.rl.length_penalty_weight = 0.0 if smoke else 0.1
  c.rl.length_penalty_warmup = 1 if smoke else 20  # iterations before the length penalty turns on
  c.rl.repeat_penalty = -0.5  # added to the reward of "repeat" stops
  # Curriculum stages: (until iteration, difficulty levels in the pool); the last stage (None) lasts to the end.
  c.rl.curriculum = ((5 if smoke else 15, (1, 2, 3, 4)), (None, (2, 3, 4)))
  c.rl.prioritized = True  # P(i) ~ (1 - s_i) + floor
  c.rl.priority_floor = 0.05
  c.rl.priority_ema = 0.5  # s_i <- ema*s_i + (1-ema)*batch success
  c.rl.max_bad_steps = 3  # training steps with a non-finite loss, gradient or update skipped before the run stops
  c.rl.pack = False  # several samples per training row (sequence packing); off: a sample per row, as measured
  c.rl.reward = "rules"  # rules (the verifiers) | cot_rm | value_rm (reward models in reward.rm_path) | mix

  c.eval = ml_collections.ConfigDict()  # held-out evaluation
  c.eval.temperature = 0.0  # 0: greedy
  c.eval.sampled_temperature = 1.0  # also report accuracy of one sample at this temperature (0: off)
  c.eval.every = 0 if smoke else 10  # RL iterations between held-out evaluations (0: only at the end)
  c.eval.max_response_len = 160

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 1 if smoke else 5  # RL iterations between checkpoints
  c.checkpoint.keep = 2  # checkpoints kept

  # Long2short (RECIPE.md section 5) on the main job's workdir: shorter variants of its long-CoT model.
  l = c.long2short = ml_collections.ConfigDict()
  # Stages to run, in this order; rl_<v> is long2short RL starting from the variant v.
  l.variants = ("long", "short", "merge", "merge_rs", "dpo", "rl_long", "rl_merge_rs")
  l.sample_prompts = 16 if smoke else 256  # training prompts sampled for rejection sampling and DPO
  l.samples_per_prompt = 4 if smoke else 8  # n: responses per prompt (the report's 8)
  l.sample_max_len = 64 if smoke else 160  # response cap when sampling for rejection sampling / DPO
  l.short_init = "long"  # what the short-CoT SFT starts from: long (final/) | warmup (warmup/) | scratch
  l.short = ml_collections.ConfigDict()  # the short-CoT model: SFT on the step-results-only traces
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
  l.rl.length_schedule = ()  # the short cap throughout, whatever the main job's schedule
  l.rl.length_penalty_weight = 0.5  # w: reward = correct + w * len_reward
  l.rl.length_penalty_warmup = 0  # the length penalty is on from the first iteration
  l.rl.curriculum = ()  # all levels throughout: every level has length to cut
  l.rl.learning_rate = 5e-5

  if arg in ("sweep", "longtail"):  # the main job at half length, so that 5 seeds x several variants fit in hours
    c.rl.iterations = 20
    c.eval.every = 4
    c.rl.length_penalty_warmup = 10
    c.rl.curriculum = ((8, (1, 2, 3, 4)), (None, (2, 3, 4)))
    l.rl.iterations = 15
  if arg == "longtail":  # 6% of the problems are 9-step chains, about twice the longest response of levels 1-4
    c.data.levels = (1, 2, 3, 4, 7)
    c.data.level_shares = (0.24, 0.24, 0.24, 0.24, 0.04)  # levels 1 and 2 run out of questions: 7 gets 6%
    c.rl.max_response_len = c.eval.max_response_len = 256
    c.rl.curriculum = ()  # the prompts stay the task's long-tailed mix: no pools,
    c.rl.prioritized = False  # and no preference for the unsolved long chains
  return c
