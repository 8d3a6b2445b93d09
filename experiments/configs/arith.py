"""The main job: a complete k1.5 run on the synthetic arithmetic task, on CPU, in minutes.

  python -m experiments.train --config=experiments/configs/arith.py --workdir=/tmp/k15_arith
  python -m experiments.train --config=experiments/configs/arith.py:smoke --workdir=/tmp/k15_smoke

Any field can be overridden: --config.rl.tau=0.05 --config.model.n_layers=2.
"""
import ml_collections

from k15.sharding import DEFAULT_RULES


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """arg: "" for the full CPU run, "smoke" for the seconds-long CI variant."""
  if arg not in ("", "smoke"):
    raise ValueError(f"unknown config variant {arg!r}; use '' or 'smoke'")
  smoke = arg == "smoke"
  c = ml_collections.ConfigDict()
  c.seed = 0  # everything (data, init, sampling) derives from this

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 128  # must be >= the trained tokenizer's vocab
  c.model.d_model = 64 if smoke else 128
  c.model.n_layers = 2 if smoke else 3
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.head_dim = 16 if smoke else 32
  c.model.d_ff = 128 if smoke else 384
  c.model.rope_theta = 10000.0
  c.model.rms_norm_eps = 1e-6
  c.model.qkv_bias = True  # Qwen2-style
  c.model.tie_embeddings = True
  c.model.param_dtype = "float32"
  c.model.dtype = "float32"
  c.model.remat = False

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: the rest of the devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.sharding = ml_collections.ConfigDict()
  c.sharding.logical_axis_rules = DEFAULT_RULES  # (logical axis, mesh axes) pairs

  c.data = ml_collections.ConfigDict()
  c.data.source = "arith"  # arith: the synthetic task | prompts: prompt files (experiments/configs/math_mixture.py)
  c.data.n_train = 400 if smoke else 4000  # generated training problems (SFT traces and RL prompts)
  c.data.n_eval = 32 if smoke else 200  # held-out problems
  c.data.levels = (1, 2, 3, 4)  # difficulty levels of the synthetic task
  c.data.tokenizer_vocab_size = 128  # SentencePiece vocab trained on the generated corpus
  c.data.direct_prob = 0.6  # share of warm-up targets that answer at once, without reasoning: RL's headroom

  c.sft = ml_collections.ConfigDict()  # long-CoT warm-up
  c.sft.steps = 30 if smoke else 400
  c.sft.batch_size = 16 if smoke else 32
  c.sft.learning_rate = 3e-3
  c.sft.warmup_steps = 5 if smoke else 100
  c.sft.max_len = 192  # prompt + trace tokens; longer examples are an error, not truncated

  c.sampling = ml_collections.ConfigDict()
  c.sampling.temperature = 1.0
  c.sampling.top_p = 1.0
  c.sampling.top_k = 0  # 0: off
  c.sampling.chunk_size = 16  # decode steps per dispatch; slots are refilled between chunks
  c.sampling.num_slots = 32  # concurrent trajectories in the rollout engine
  c.sampling.repeat_ngram = 8  # n-gram size for repeat detection
  c.sampling.repeat_count = 4  # an n-gram seen this often stops the trajectory with reason "repeat"
  c.sampling.decode_kernel = "auto"  # "auto": the native CPU step where it runs, else XLA's; "native"; "xla"
  c.sampling.native_matmul = "auto"  # the native step's matmuls: "auto", "float32", "bf16x6" / "bf16x3" (AMX)

  c.rl = ml_collections.ConfigDict()
  c.rl.iterations = 3 if smoke else 40
  c.rl.prompts_per_iteration = 8 if smoke else 16
  c.rl.samples_per_prompt = 4 if smoke else 8  # k
  c.rl.token_budget = 48 if smoke else 96  # per-iteration output tokens per trajectory; the rest is resumed later
  c.rl.max_response_len = 160  # total response tokens; reason "max_length" beyond
  c.rl.minibatches = 2  # gradient steps per iteration
  c.rl.optimizer = "adam"  # adam | sgd | momentum
  c.rl.learning_rate = 5e-5  # Adam restarts every iteration: its first steps move every weight by ~lr
  c.rl.adam_eps = 1e-8
  c.rl.max_grad_norm = 1.0  # global-norm clipping before the optimizer
  c.rl.reset_optimizer = True  # fresh optimizer state at each iteration start
  c.rl.reward = "arith"  # verifier of examples without a domain field: arith | math | code
  c.rl.loss = "k15"  # k15 | reinforce | grpo | rest
  c.rl.tau = 0.1  # KL weight towards the start-of-iteration policy
  c.rl.log_ratio = "sequence"  # sequence (the report) | token (public reimplementations)
  c.rl.baseline = "mean"  # mean | logmeanexp
  c.rl.form = "gradient"  # gradient (eq. 3) | squared (the surrogate)
  c.rl.mask_old_segments = True  # older partial-rollout segments are context only
  c.rl.length_penalty_weight = 0.0 if smoke else 0.1
  c.rl.length_penalty_warmup = 1 if smoke else 20  # iterations before the length penalty turns on
  c.rl.repeat_penalty = -0.5  # added to the reward of "repeat" stops
  c.rl.curriculum = ((5 if smoke else 15, (1, 2, 3, 4)), (10**9, (2, 3, 4)))  # (until iteration, levels)
  c.rl.prioritized = True  # P(i) ~ (1 - s_i) + floor
  c.rl.priority_floor = 0.05
  c.rl.priority_ema = 0.5  # s_i <- ema*s_i + (1-ema)*batch success

  c.eval = ml_collections.ConfigDict()
  c.eval.temperature = 0.0  # 0: greedy
  c.eval.sampled_temperature = 1.0  # also report accuracy of one sample at this temperature (0: off)
  c.eval.every = 0 if smoke else 10  # RL iterations between held-out evaluations (0: only at the end)
  c.eval.max_response_len = 160

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 1 if smoke else 5  # RL iterations between checkpoints
  c.checkpoint.keep = 2
  return c
