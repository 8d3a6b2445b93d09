"""k1.5 RL of Qwen2.5-Math models on math prompt files with math-verify rewards (RECIPE.md sections 3 and 6).

  python -m experiments.train --config=experiments/configs/qwen_math.py:smoke --workdir=/tmp/k15_math
  python -m experiments.plan --config=experiments/configs/qwen_math.py:1.5b,v5p-32
  python -m experiments.plan --config=experiments/configs/qwen_math.py:7b-32k,v5p-128
  python -m launch.tpu up --name=k15-1p5b --zone=us-east5-a --accelerator=v5p-32 \
      --workdir=gs://BUCKET/k15/qwen_math_1p5b -- \
      --config=experiments/configs/qwen_math.py:1.5b,v5p-32 --config.model.hf_path=/home/$USER/Qwen2.5-Math-1.5B

arg: "smoke" (a tiny random model on CPU, in a minute) or "<size>,<slice>": a size of SIZES and one of its TPU
slices (gcloud accelerator types; "<n>x<type>": n slices; "<size>" alone takes the first). The model is the size's
architecture; --config.model.hf_path (a Hugging Face checkpoint directory present on every worker) starts from its
weights and tokenizer, otherwise the params are random. The prompt files are the repository's fixtures (GSM8K-style and
MATH-style JSONL) until data.tasks / data.eval_tasks name real ones. On a slice: lengths follow the models'
context (4,096 tokens; "7b-32k": 32,768, responses of up to 32,256 tokens); batches as in the k1.5 report (k
samples per prompt, a per-iteration token budget with partial rollouts, several minibatch steps per iteration with a
fresh optimizer); `experiments.plan` prints the memory and FLOPs per device of each slice.
"""
import os

import ml_collections

from experiments.configs.architectures import ARCHITECTURES
from experiments.configs.loss import k15_loss
from k15.sharding import DEFAULT_RULES, SAMPLING_RULES

_FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "prompts")
_MATH_FIELDS = {"question": "problem", "answer": "solution", "difficulty": "level"}  # MATH's field names

# Model size -> architecture, the batch settings of its size, and slice -> mesh (one JAX process per host; the
# devices are the chips) with the batch settings that fit its memory (`experiments.plan` prints each phase's bytes).
SIZES = {
    # A 'tensor' axis of 2: the 2 kv heads (so the rollout KV cache splits over it), 12 heads, d_ff and vocab divide.
    "1.5b": dict(architecture="qwen2.5-math-1.5b", prompts_per_iteration=128, learning_rate=1e-6, slices={
        "v5p-32": dict(mesh=dict(data=1, fsdp=8, tensor=2), minibatches=16, num_slots=512),  # 16 chips x 95 GiB
        "v5p-64": dict(mesh=dict(data=2, fsdp=8, tensor=2), minibatches=8, num_slots=512),  # 2 FSDP replicas
        # Two v5p-32 slices (launch.tpu --num_slices=2): one FSDP replica per slice, gradients averaged over DCN.
        "2xv5p-32": dict(mesh=dict(data=1, fsdp=8, tensor=2, dcn_data=2), minibatches=8, num_slots=512),
        "v5litepod-64": dict(mesh=dict(data=1, fsdp=32, tensor=2), minibatches=16, num_slots=512),  # 64 x 16 GiB
    }),
    # A 'tensor' axis of 4: the 4 kv heads, 28 heads, d_ff and vocab all divide by it.
    "7b": dict(architecture="qwen2.5-math-7b", prompts_per_iteration=256, learning_rate=5e-7, slices={
        "v5p-128": dict(mesh=dict(data=1, fsdp=16, tensor=4), minibatches=16, num_slots=1024),  # 64 chips x 95 GiB
        "v5p-512": dict(mesh=dict(data=4, fsdp=16, tensor=4), minibatches=8, num_slots=1024),  # 256 chips
        "v5litepod-256": dict(mesh=dict(data=1, fsdp=64, tensor=4), minibatches=16, num_slots=512),  # 256 x 16 GiB
    }),
    # Long CoT at the report's scale: 32k-token responses from a 32k-context model. A trajectory runs 8,192 new tokens
    # per iteration (partial rollouts: 4 segments at most). Training rows are packed (rl.pack), 4 per device at most
    # (32 minibatches): the layer inputs remat keeps are the largest item (26 GiB).
    "7b-32k": dict(architecture="qwen2.5-7b", prompts_per_iteration=256, learning_rate=5e-7, context=32768,
                   token_budget=8192, slices={
        "v5p-128": dict(mesh=dict(data=1, fsdp=16, tensor=4), minibatches=32, num_slots=1024),
        "v5p-256": dict(mesh=dict(data=1, fsdp=32, tensor=4), minibatches=16, num_slots=1024),  # 128 chips
    }),
}
_PROMPT_LEN = 512  # on a slice; the response fills the rest of the size's context (4,096 unless it says)
VARIANTS = ("smoke",) + tuple(f"{size},{s}" for size, v in SIZES.items() for s in v["slices"])


def get_config(arg: str = "smoke") -> ml_collections.ConfigDict:
  smoke = arg == "smoke"
  size, _, slice_name = arg.partition(",")
  if not smoke and (size not in SIZES or (slice_name and slice_name not in SIZES[size]["slices"])):
    raise ValueError(f"unknown config variant {arg!r}; one of {VARIANTS}")
  if not smoke:
    run = SIZES[size]
    slice_name = slice_name or next(iter(run["slices"]))
    tpu = run["slices"][slice_name]
    response_len = run.get("context", 4096) - _PROMPT_LEN
  c = ml_collections.ConfigDict()
  c.seed = 0  # everything (data, init, sampling) derives from this

  c.model = ml_collections.ConfigDict(ARCHITECTURES["tiny" if smoke else run["architecture"]])  # the shape fields
  if smoke:
    c.model.vocab_size = 256  # must be >= the tokenizer's vocab
  c.model.param_dtype = "float32"  # params, and Adam moments, in float32
  c.model.dtype = "float32" if smoke else "bfloat16"  # matmuls and activations; logits and softmax stay float32
  c.model.remat = not smoke  # recompute each layer in the backward pass: activations are the largest training cost
  # Full passes' attention: "auto" (splash on TPU; else dense up to attention_block tokens, blockwise beyond),
  # "dense", "blockwise" (flash-style, no T x T matrix), "splash" (Pallas, TPU).
  c.model.attention = "auto"
  c.model.attention_block = 512  # query and key block of blockwise and splash attention
  c.model.logprob_chunk = 1024  # log-probs from the logits of this many positions at a time (0: all at once)
  # A long-context checkpoint's rope scaling (k15.models.RopeScaling; hf_path's must match), e.g.
  # dict(type="yarn", factor=4.0, original_max_position_embeddings=4096); None: plain rotary embeddings.
  c.model.rope_scaling = None
  c.model.hf_path = ""  # Hugging Face checkpoint directory to start from (on every worker); "": random init

  if not smoke:
    c.tpu = ml_collections.ConfigDict()
    c.tpu.accelerator_type = slice_name.partition("x")[2] if "x" in slice_name else slice_name  # one slice's type
  # Axis sizes within a slice (-1: the rest of its devices); dcn_data: slices that 'data' spans (multi-slice runs).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1) if smoke else
                                     dict(dict(dcn_data=1), **tpu["mesh"]))
  c.sharding = ml_collections.ConfigDict()
  c.sharding.logical_axis_rules = DEFAULT_RULES  # (logical axis, mesh axes) pairs of training
  c.sharding.sampling_rules = SAMPLING_RULES  # of sampling: tensor parallel; the params move once per rollout phase

  c.data = ml_collections.ConfigDict()
  c.data.source = "prompts"  # prompt files through a seqio Mixture (k15/data/sources.py)
  c.data.name = "k15_math_mixture"  # the seqio Mixture's name
  c.data.tasks = [  # one seqio Task per file; field_map maps our fields to the file's
      {"path": os.path.join(_FIXTURES, "gsm8k_style.jsonl"), "domain": "math"},
      {"path": os.path.join(_FIXTURES, "math_style.jsonl"), "domain": "math", "field_map": _MATH_FIELDS},
  ]
  c.data.domain_rates = {}  # {domain: rate} across domains; empty: each task by its size
  c.data.template = ("Question: {question}\nPut the final answer in \\boxed{{}}.\nAnswer:" if smoke else
                     "Question: {question}\nPlease reason step by step, and put your final answer within "
                     "\\boxed{{}}.\nAnswer:")  # the prompt around the question
  c.data.num_train = 32 if smoke else 4096  # prompts drawn from the Mixture at its rates: the RL prompt pool
  c.data.max_prompt_len = 128 if smoke else _PROMPT_LEN  # longer prompts are an error naming the prompt
  c.data.eval_tasks = list(c.data.tasks)  # held-out prompt files (here: the fixtures again)
  c.data.tokenizer_path = ""  # SentencePiece .model or HF tokenizer.json; "": model.hf_path's, else trained
  c.data.tokenizer_vocab_size = 256  # of the SentencePiece vocab trained on the prompt files (no tokenizer given)

  c.sft = ml_collections.ConfigDict()  # prompt files carry no long-CoT traces: RL starts from the model as given
  c.sft.steps = 0
  c.sft.batch_size = 16
  c.sft.learning_rate = 3e-3
  c.sft.warmup_steps = 5

  c.sampling = ml_collections.ConfigDict()  # rollouts (and evaluation, at eval.temperature)
  c.sampling.temperature = 1.0  # rollouts sample (> 0)
  c.sampling.top_p = 1.0  # 1.0: off
  c.sampling.top_k = 0  # 0: off
  c.sampling.chunk_size = 16 if smoke else 64  # decode steps per dispatch; slots are refilled between chunks
  c.sampling.num_slots = 32 if smoke else tpu["num_slots"]  # concurrent trajectories, split over data x fsdp
  c.sampling.repeat_ngram = 8  # n-gram size for repeat detection (0: off)
  c.sampling.repeat_count = 4  # an n-gram seen this often stops the trajectory with reason "repeat"
  c.sampling.page_size = 16 if smoke else 64  # positions per page of the paged KV cache
  c.sampling.num_pages = 0  # pages of the KV cache; 0: every slot can reach the longest sequence at once
  # The sampler's device calls: "model" (the model's own paged passes; on TPU the Pallas ragged paged attention)
  # or a plug-in module (k15.sampling.native: C++ for float32 models on CPU).
  c.sampling.backend = "model"
  c.sampling.backend_options = ml_collections.ConfigDict()  # make_backend's options (configs/arith.py lists them)

  c.reward = ml_collections.ConfigDict()
  c.reward.default_domain = "math"  # verifier of examples without a domain field: arith | math | code
  c.reward.math_timeout_s = 5.0  # per-item timeout of the math-verify pool
  c.reward.math_workers = 1 if smoke else 16  # math-verify processes per host
  # Code rewards in a sandbox without namespaces, where the machine forbids them (k15/rewards/sandbox.py): only for
  # trusted programs or a disposable machine.
  c.reward.sandbox_allow_unisolated = False
  c.reward.rm_path = ""  # reward models (python -m experiments.train_rm --workdir=...): cot_rm/, value_rm/; "": none
  # rl.reward="mix": {domain: rules | cot_rm | value_rm}; domains left out use their rule-based verifier
  c.reward.mix = ml_collections.ConfigDict({"math": "cot_rm"})

  c.rl = ml_collections.ConfigDict()
  c.rl.iterations = 2 if smoke else 200
  c.rl.prompts_per_iteration = 4 if smoke else run["prompts_per_iteration"]
  c.rl.samples_per_prompt = 4 if smoke else 8  # k
  c.rl.token_budget = 32 if smoke else run.get("token_budget", 1024)  # per-iteration output tokens of a trajectory; the rest is resumed later
  c.rl.max_response_len = 48 if smoke else response_len  # on a slice, prompt + response fill the context
  # ((from iteration, max_response_len, token_budget), ...): the two above from that iteration on, buffered partial
  # rollouts included (they continue up to a grown cap; beyond a shrunk one they finish with "max_length"). The
  # rollout cache is sized for the longest stage; experiments.plan plans for it.
  c.rl.length_schedule = ()
  c.rl.minibatches = 2 if smoke else tpu["minibatches"]  # gradient steps per iteration
  c.rl.optimizer = "adam"  # adam | sgd | momentum
  c.rl.learning_rate = 5e-5 if smoke else run["learning_rate"]
  c.rl.update(k15_loss())  # the k1.5 loss (RECIPE.md section 4) and its optimizer settings
  c.rl.partial_rollouts = True  # False: every sample runs to its end in one iteration (token_budget unused)
  c.rl.length_penalty_weight = 0.0 if smoke else 0.1
  c.rl.length_penalty_warmup = 1 if smoke else 50  # iterations before the length penalty turns on
  c.rl.repeat_penalty = -0.5  # added to the reward of "repeat" stops
  c.rl.curriculum = ()  # (until iteration, levels) stages once every prompt carries a difficulty label (GSM8K: none)
  c.rl.prioritized = True  # P(i) ~ (1 - s_i) + floor
  c.rl.priority_floor = 0.05
  c.rl.priority_ema = 0.5  # s_i <- ema*s_i + (1-ema)*batch success
  c.rl.max_bad_steps = 3  # training steps with a non-finite loss, gradient or update skipped before the run stops
  c.rl.pack = True  # several samples per training row (sequence packing): long-tailed lengths waste little
  c.rl.reward = "rules"  # rules (the verifiers) | cot_rm | value_rm (reward models in reward.rm_path) | mix

  c.eval = ml_collections.ConfigDict()  # held-out evaluation
  c.eval.temperature = 0.0  # 0: greedy
  c.eval.sampled_temperature = 0.0  # accuracy of one sample at this temperature too (0: off)
  c.eval.every = 0 if smoke else 10  # RL iterations between held-out evaluations (0: only at the end)
  c.eval.max_response_len = 48 if smoke else response_len

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 1 if smoke else 10  # RL iterations between checkpoints
  c.checkpoint.keep = 2 if smoke else 3  # checkpoints kept

  if smoke:  # long2short of the smoke run (tests): variants that need no short-CoT traces
    l = c.long2short = ml_collections.ConfigDict()
    l.variants = ("long", "dpo", "rl_long")  # stages to run, in this order; rl_<v>: long2short RL from v
    l.sample_prompts = 8  # training prompts sampled for DPO
    l.samples_per_prompt = 4  # n: responses per prompt
    l.sample_max_len = 48  # response cap when sampling for DPO
    l.short_init = "long"  # (no short variant here)
    l.short = ml_collections.ConfigDict(dict(steps=0, batch_size=1, learning_rate=1e-3, warmup_steps=0))  # unused
    l.merge_weights = (0.5, 0.5)  # (no merge here)
    l.rs = ml_collections.ConfigDict(dict(steps=0, batch_size=1, learning_rate=1e-3, warmup_steps=0))  # unused
    l.dpo = ml_collections.ConfigDict()  # DPO from the long model, the long model as frozen reference
    l.dpo.beta = 0.1  # scale of the implicit reward beta*(logp - ref_logp)
    l.dpo.long_factor = 1.5  # a correct response at least this times the positive's length is a negative
    l.dpo.steps = 4
    l.dpo.batch_size = 4  # pairs per step
    l.dpo.learning_rate = 1e-3
    l.dpo.warmup_steps = 1
    l.rl = ml_collections.ConfigDict()  # long2short RL: these replace config.rl's fields
    l.rl.iterations = 2
    l.rl.length_penalty_weight = 0.5  # on from the first iteration
    l.rl.length_penalty_warmup = 0
  return c
