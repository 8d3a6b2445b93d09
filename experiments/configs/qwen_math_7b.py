"""k1.5 RL of a Qwen2.5-Math-7B-style model on math prompt files, on a Cloud TPU slice.

  python -m experiments.plan --config=experiments/configs/qwen_math_7b.py:v5p-128
  python -m launch.tpu up --name=k15-7b --zone=us-east5-a --accelerator=v5p-128 \
      --workdir=gs://BUCKET/k15/qwen_math_7b -- \
      --config=experiments/configs/qwen_math_7b.py:v5p-128 --config.model.hf_path=/home/$USER/Qwen2.5-Math-7B

As qwen_math_1p5b.py (same data, lengths and loop settings), with the 7B architecture, twice the prompts per
iteration, and meshes with a 'tensor' axis of 4 (the 4 kv heads, 28 heads, d_ff and vocab all divide by it).
"""
import ml_collections

from experiments.configs import qwen_math_1p5b

# Slice -> mesh and the batch settings that fit its memory (see `python -m experiments.plan`).
SLICES = {
    "v5p-128": dict(mesh=dict(data=1, fsdp=16, tensor=4), minibatches=16, num_slots=1024),  # 64 chips x 95 GiB
    "v5p-512": dict(mesh=dict(data=4, fsdp=16, tensor=4), minibatches=8, num_slots=1024),  # 256 chips
    "v5litepod-256": dict(mesh=dict(data=1, fsdp=64, tensor=4), minibatches=16, num_slots=512),  # 256 chips x 16 GiB
}
DEFAULT_SLICE = "v5p-128"


def set_qwen_math_7b(model: ml_collections.ConfigDict):
  """Qwen2.5-Math-7B's architecture (its config.json); load_hf_matching checks a checkpoint against it."""
  model.vocab_size = 152064  # the 7B checkpoints pad the vocab to 152,064 (1.5B: 151,936)
  model.d_model = 3584
  model.n_layers = 28
  model.n_heads = 28
  model.n_kv_heads = 4
  model.head_dim = 128
  model.d_ff = 18944
  model.rope_theta = 10000.0  # the Math models' rope base
  model.rms_norm_eps = 1e-6
  model.qkv_bias = True
  model.tie_embeddings = False  # a separate lm_head


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """arg: a slice name from SLICES (default DEFAULT_SLICE)."""
  slice_name = arg or DEFAULT_SLICE
  if slice_name not in SLICES:
    raise ValueError(f"unknown slice {arg!r}; one of {sorted(SLICES)}")
  c = qwen_math_1p5b.get_config(qwen_math_1p5b.DEFAULT_SLICE)  # data, lengths, loop settings
  set_qwen_math_7b(c.model)
  c.tpu.accelerator_type = slice_name
  c.mesh = ml_collections.ConfigDict(SLICES[slice_name]["mesh"])  # data x fsdp x tensor = the slice's chips
  c.sampling.num_slots = SLICES[slice_name]["num_slots"]  # concurrent trajectories, split over data x fsdp
  c.rl.prompts_per_iteration = 256
  c.rl.minibatches = SLICES[slice_name]["minibatches"]  # gradient steps per iteration (256 / this prompts each)
  c.rl.learning_rate = 5e-7
  return c
