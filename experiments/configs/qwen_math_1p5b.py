"""k1.5 RL of a Qwen2.5-Math-1.5B-style model on math prompt files, on a Cloud TPU slice.

  python -m experiments.plan --config=experiments/configs/qwen_math_1p5b.py:v5p-32
  python -m launch.tpu up --name=k15-1p5b --zone=us-east5-a --accelerator=v5p-32 \
      --workdir=gs://BUCKET/k15/qwen_math_1p5b -- \
      --config=experiments/configs/qwen_math_1p5b.py:v5p-32 --config.model.hf_path=/home/$USER/Qwen2.5-Math-1.5B

The architecture is Qwen2.5-Math-1.5B's; --config.model.hf_path (a Hugging Face checkpoint directory present on
every worker) starts from its weights and tokenizer, otherwise the params are random. The prompt files are the
repository's fixtures until prompts.tasks / prompts.eval_tasks name real ones (as in math_mixture.py). The arg is the
slice (a key of SLICES); its mesh is in the config, and `experiments.plan` prints the memory and FLOPs per device.
Lengths follow the model's 4,096-token context; batch structure as in the k1.5 report (k samples per prompt, a
per-iteration token budget with partial rollouts, several minibatch steps per iteration with a fresh optimizer).
"""
import ml_collections

from experiments.configs import math_mixture

# Slice (gcloud accelerator type) -> mesh (one JAX process per host; the devices are the chips) and the batch
# settings that fit its memory (see `python -m experiments.plan`): a training minibatch of 128 / minibatches prompts
# x 8 samples holds float32 logits over the 151,936-token vocab for every row, the largest memory item.
SLICES = {
    "v5p-32": dict(mesh=dict(data=1, fsdp=16, tensor=1), minibatches=16, num_slots=512),  # 16 chips x 95 GiB
    "v5p-64": dict(mesh=dict(data=2, fsdp=16, tensor=1), minibatches=8, num_slots=512),  # 32 chips: 2 FSDP replicas
    "v5litepod-64": dict(mesh=dict(data=1, fsdp=64, tensor=1), minibatches=16, num_slots=512),  # 64 chips x 16 GiB
}
DEFAULT_SLICE = "v5p-32"


def set_qwen_math_1p5b(model: ml_collections.ConfigDict):
  """Qwen2.5-Math-1.5B's architecture (its config.json); load_hf_matching checks a checkpoint against it."""
  model.vocab_size = 151936
  model.d_model = 1536
  model.n_layers = 28
  model.n_heads = 12
  model.n_kv_heads = 2
  model.head_dim = 128
  model.d_ff = 8960
  model.rope_theta = 10000.0  # the Math models' rope base (Qwen2.5 general models use 1e6)
  model.rms_norm_eps = 1e-6
  model.qkv_bias = True
  model.tie_embeddings = True


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """arg: a slice name from SLICES (default DEFAULT_SLICE)."""
  slice_name = arg or DEFAULT_SLICE
  if slice_name not in SLICES:
    raise ValueError(f"unknown slice {arg!r}; one of {sorted(SLICES)}")
  c = math_mixture.get_config("")  # prompt files through a seqio Mixture, math-verify rewards
  set_qwen_math_1p5b(c.model)
  c.model.param_dtype = "float32"  # master weights and Adam moments in float32
  c.model.dtype = "bfloat16"  # matmuls and activations; logits and softmax stay float32
  c.model.remat = True  # recompute each layer in the backward pass: activations are the largest training cost
  c.model.hf_path = ""  # Hugging Face checkpoint directory to start from (on every worker); "" = random init

  c.tpu = ml_collections.ConfigDict()
  c.tpu.accelerator_type = slice_name  # the slice this mesh is for (experiments.plan reads its chip facts)
  c.mesh = ml_collections.ConfigDict(SLICES[slice_name]["mesh"])  # data x fsdp x tensor = the slice's chips

  c.data.tokenizer_path = ""  # "" = the tokenizer of model.hf_path
  c.prompts.max_prompt_len = 512  # longer prompts are an error naming the prompt
  c.prompts.num_train = 4096  # prompts drawn from the Mixture: the RL prompt pool
  c.prompts.template = ("Question: {question}\nPlease reason step by step, and put your final answer within "
                        "\\boxed{{}}.\nAnswer:")  # around the question

  c.sampling.num_slots = SLICES[slice_name]["num_slots"]  # concurrent trajectories, split over data x fsdp
  c.sampling.chunk_size = 64  # decode steps per dispatch; slots are refilled between chunks
  c.sampling.temperature = 1.0

  c.rl.iterations = 200
  c.rl.prompts_per_iteration = 128
  c.rl.samples_per_prompt = 8  # k
  c.rl.max_response_len = 3584  # prompt (512) + response fill the model's 4,096 positions
  c.rl.token_budget = 1024  # per-iteration output tokens of a trajectory; a long one is resumed in later iterations
  c.rl.minibatches = SLICES[slice_name]["minibatches"]  # gradient steps per iteration (128 / this prompts each)
  c.rl.learning_rate = 1e-6
  c.rl.math_workers = 16  # math-verify processes per host
  c.rl.curriculum = ()  # set (until iteration, levels) stages when the prompt files carry difficulty labels
  c.rl.length_penalty_weight = 0.1
  c.rl.length_penalty_warmup = 50  # iterations before the length penalty turns on

  c.eval.every = 10  # RL iterations between held-out evaluations
  c.eval.max_response_len = 3584
  c.eval.sampled_temperature = 0.0  # greedy only

  c.checkpoint.every = 10
  c.checkpoint.keep = 3
  return c
