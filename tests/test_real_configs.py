"""Real-model configs on their TPU slices, checked abstractly (no weights, no TPU), and the planning command's
numbers against independent sums."""
import dataclasses
import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import plan
from experiments.configs import qwen_math
from k15 import config as config_lib
from k15 import flops, models, sharding
from k15.rl import loop, trainer
from launch import tpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [(name, s) for name, size in qwen_math.SIZES.items() for s in size["slices"]]
DEFAULT_SLICE = {name: next(iter(size["slices"])) for name, size in qwen_math.SIZES.items()}

# Published architectures (the checkpoints' config.json) and parameter counts.
ARCH = {
    "1.5b": dict(vocab_size=151936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2, head_dim=128,
                 d_ff=8960, rope_theta=10000.0, qkv_bias=True, tie_embeddings=True),
    "7b": dict(vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, head_dim=128,
               d_ff=18944, rope_theta=10000.0, qkv_bias=True, tie_embeddings=False),
}
ARCH["7b-32k"] = dict(ARCH["7b"], rope_theta=1e6)  # Qwen2.5-7B(-Instruct): a 32k context
NUM_PARAMS = {"1.5b": 1_543_714_304, "7b": 7_615_616_512, "7b-32k": 7_615_616_512}
CONTEXT = {"1.5b": 4096, "7b": 4096, "7b-32k": 32768}  # max_position_embeddings


def _build(name, slice_name):
  config = config_lib.from_config_dict(qwen_math.get_config(f"{name},{slice_name}"))
  info = tpu.slice_info(config.tpu.accelerator_type)
  return config, info, plan.resolve_mesh(config, None, info)


@functools.lru_cache(maxsize=None)
def _plan(name, slice_name):
  config, info, sizes = _build(name, slice_name)
  return plan.plan(config, sizes, info)


def _spec_bytes_per_device(abstract_tree, shardings, sizes):
  """Bytes on one device, from each leaf's PartitionSpec: every dim divided by its mesh axes' sizes."""
  total = 0
  for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    shape = list(x.shape)
    for dim, axes in enumerate(s.spec):
      for axis in (() if axes is None else (axes,) if isinstance(axes, str) else axes):
        assert shape[dim] % sizes[axis] == 0, (x.shape, s.spec)
        shape[dim] //= sizes[axis]
    total += int(np.prod(shape)) * x.dtype.itemsize
  return total


@pytest.mark.parametrize("name, slice_name", CASES)
def test_config_fits_its_slice(name, slice_name):
  config, info, sizes = _build(name, slice_name)
  model_cfg = config.model
  assert config.hf_path == ""  # the flag exists; empty means random init
  assert {k: getattr(model_cfg, k) for k in ARCH[name]} == ARCH[name]
  assert model_cfg.num_params() == NUM_PARAMS[name]
  assert (model_cfg.param_dtype, model_cfg.dtype, model_cfg.remat) == ("float32", "bfloat16", True)
  assert int(np.prod(list(sizes.values()))) == info["chips"] * config.mesh.dcn_data  # exactly the slices' chips
  assert plan.sharding_problems(config, sizes) == []  # every dimension splits as the rules ask
  p = _plan(name, slice_name)
  assert p["total_per_device"] <= 0.9 * info["hbm_bytes"], plan.format_plan(p)
  seq = plan.lengths(config)
  assert seq["prompt"] + seq["response"] == CONTEXT[name]


@pytest.mark.parametrize("name, slice_name", [*DEFAULT_SLICE.items(), ("1.5b", "2xv5p-32")])  # and 2 slices (DCN)
def test_train_step_and_decode_trace_at_full_size(name, slice_name):
  config, _, sizes = _build(name, slice_name)
  assert sizes["data"] % config.mesh.dcn_data == 0
  loss, chunk = plan.abstract_trace(config, sizes)
  assert loss.shape == () and loss.dtype == jnp.float32
  assert chunk.tokens_BxC.shape == (config.sampling.num_slots, config.sampling.chunk_size)


def test_a_mesh_that_does_not_divide_is_reported():
  config, _, _ = _build("1.5b", "v5p-32")
  problems = plan.sharding_problems(config, {"data": 1, "fsdp": 16, "tensor": 8})  # 2 kv heads, 12 heads
  assert any("kv_heads=2" in q and "tensor" in q for q in problems)
  assert any("heads=12" in q for q in problems)
  config = dataclasses.replace(config, sampling=dataclasses.replace(config.sampling, num_slots=100))
  assert any("num_slots=100" in q for q in plan.sharding_problems(config, {"data": 1, "fsdp": 16, "tensor": 2}))


@pytest.mark.parametrize("name, slice_name", CASES)
def test_plan_bytes_are_the_sums_of_the_abstract_leaves(name, slice_name):
  config, info, sizes = _build(name, slice_name)
  p = _plan(name, slice_name)
  model_cfg = config.model
  mesh = plan.abstract_mesh(sizes)
  abstract = jax.eval_shape(lambda: models.init_params(model_cfg, jax.random.PRNGKey(0)))
  p_shard = sharding.param_shardings(model_cfg, mesh, config.sharding.logical_axis_rules)
  optimizer = loop.rl_optimizer(config.rl)
  opt_abstract = jax.eval_shape(optimizer.init, abstract)
  o_shard = sharding.opt_state_shardings(optimizer, abstract, p_shard, mesh)

  assert p["params_bytes"] == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  assert p["params_bytes"] == 4 * NUM_PARAMS[name]  # float32
  assert p["params_bytes_per_device"] == _spec_bytes_per_device(abstract, p_shard, sizes)
  assert p["opt_bytes"] == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_abstract))
  assert p["opt_bytes"] == 2 * p["params_bytes"] + 4  # Adam: two float32 moments and an int32 step count
  assert p["opt_bytes_per_device"] == _spec_bytes_per_device(opt_abstract, o_shard, sizes)
  # Large params are split over fsdp x tensor (replicated over data); only norms and biases are not split.
  split = sizes["fsdp"] * sizes["tensor"]
  assert p["params_bytes"] / split <= p["params_bytes_per_device"] < 1.01 * p["params_bytes"] / split + 2**20

  # The rollout engine's state, by hand: a paged KV cache with pages for every slot at full length (bfloat16),
  # token history, 25 bytes of scalars per slot. The cache's pages split over data x fsdp, its kv heads over tensor.
  S, slots_, Z = p["seq"]["rollout_cache"], config.sampling.num_slots, config.sampling.page_size
  kv = model_cfg.n_layers * slots_ * -(-S // Z) * Z * 2 * model_cfg.n_kv_heads * model_cfg.head_dim * 2
  rest = slots_ * S * 4 + slots_ * 25
  assert p["kv_bytes"] == kv + rest
  slot_shards = sizes["data"] * sizes["fsdp"]
  assert sizes["tensor"] > 1 and model_cfg.n_kv_heads % sizes["tensor"] == 0
  assert p["kv_bytes_per_device"] == kv // (slot_shards * sizes["tensor"]) + rest // slot_shards
  # The params in the sampling layout (the compute dtype, bfloat16): split over 'tensor' only.
  sampling_shard = sharding.param_shardings(model_cfg, mesh, config.sharding.sampling_rules)
  compute = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), abstract)
  assert p["sampling_params_bytes_per_device"] == _spec_bytes_per_device(compute, sampling_shard, sizes)
  assert 2 * NUM_PARAMS[name] / sizes["tensor"] <= p["sampling_params_bytes_per_device"] < (
      1.01 * 2 * NUM_PARAMS[name] / sizes["tensor"] + 2**20)


@pytest.mark.parametrize("name", qwen_math.SIZES)
def test_plan_command_prints_those_bytes(name):
  p = _plan(name, DEFAULT_SLICE[name])
  out = subprocess.run([sys.executable, "-m", "experiments.plan",
                        f"--config=experiments/configs/qwen_math.py:{name},{DEFAULT_SLICE[name]}", "--notrace"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]

  def printed(label):
    m = re.search(rf"^\s+{label}\s+([\d,]+)\s", out.stdout, re.M)
    assert m, (label, out.stdout)
    return int(m.group(1).replace(",", ""))
  assert printed("params") == p["params_bytes_per_device"]
  assert printed("optimizer state") == p["opt_bytes_per_device"]
  assert printed("gradients") == p["params_bytes_per_device"]
  assert printed("rollout KV cache") == p["kv_bytes_per_device"]
  assert printed("params, sampling layout") == p["sampling_params_bytes_per_device"]
  assert "pages, kv heads split over fsdp, tensor" in out.stdout
  assert f"(one copy: {p['params_bytes']:,d} B)" in out.stdout
  assert "fits" in out.stdout and "every dimension splits as the rules ask" in out.stdout


def test_forward_flops_match_xla_cost_analysis():
  """The plan's FLOP formula against XLA's count of the compiled forward (one layer: XLA counts a scan body once)."""
  cfg = models.ModelConfig(vocab_size=4096, d_model=512, n_layers=1, n_heads=8, n_kv_heads=4, head_dim=32, d_ff=2048)
  tokens = jax.ShapeDtypeStruct((2, 128), jnp.int32)
  compiled = jax.jit(lambda p, t: models.forward(cfg, p, t)).lower(models.abstract_params(cfg), tokens).compile()
  xla = compiled.cost_analysis()["flops"]
  assert 2 * flops.forward_flops(cfg, 128) == pytest.approx(xla, rel=0.02)


def test_iteration_flops_by_hand():
  config, _, _ = _build("1.5b", "v5p-32")
  cfg = config.model
  f = plan.iteration_flops(config, plan.lengths(config))
  n, M = 128 * 8, flops.matmul_weights(cfg)
  attn = 4 * 28 * 12 * 128
  assert M == 28 * (1536 * 1536 * 2 + 2 * 1536 * 256 + 3 * 1536 * 8960) + 151936 * 1536
  assert f["decode"] == pytest.approx(n * 3584 * (2 * M + attn * 4096))
  segments = [512 + j * 1024 for j in range(4)]  # 3,584 tokens in budgets of 1,024: a prompt and 3 resumes
  assert f["prefill"] == pytest.approx(n * sum(2 * M * l + attn * l * l for l in segments))
  assert f["training"] == pytest.approx(4 * n * (2 * M * 4096 + attn * 4096**2))  # remat: 4 passes
  assert f["total"] == pytest.approx(f["decode"] + f["prefill"] + f["reference"] + f["training"])


def test_reference_logp_in_chunks_equals_one_pass():
  """The loop's reference pass in minibatch-sized chunks (the last one padded) gives the one-pass values."""
  cfg = models.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  tokens = np.random.RandomState(0).randint(0, 64, (11, 9)).astype(np.int32)
  fn = lambda p, b: models.token_logprobs(cfg, p, b["tokens"])
  calls = []
  chunked = trainer.in_chunks(lambda p, b: calls.append(b["tokens"].shape) or fn(p, b), params, {"tokens": tokens}, 4)
  assert calls == [(4, 9)] * 3  # 11 rows: 4 + 4 + 3 padded to 4
  np.testing.assert_allclose(chunked, np.asarray(fn(params, {"tokens": tokens})), rtol=1e-5, atol=1e-6)


def test_hf_path_separates_from_the_architecture(tmp_path):
  config = qwen_math.get_config("1.5b,v5p-32")
  config.model.hf_path = str(tmp_path)
  typed = config_lib.from_config_dict(config)
  assert typed.hf_path == str(tmp_path) and typed.model.d_model == 1536
  with pytest.raises(ValueError, match="unknown ModelConfig field"):
    models.ModelConfig.from_dict(config.model)  # why the split exists


def test_hf_checkpoint_with_another_architecture_names_the_fields(tmp_path):
  small = models.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                             qkv_bias=True, tie_embeddings=True)
  models.save_hf(str(tmp_path), small, models.init_params(small, jax.random.PRNGKey(0)))
  params = models.load_hf_matching(str(tmp_path), small)
  assert params["embed"]["embedding"].shape == (64, 32)
  other = models.ModelConfig(**{**small.__dict__, "d_ff": 128, "n_layers": 3})
  with pytest.raises(models.hf.CheckpointError, match=r"config.model.n_layers=3 .* has 2.*config.model.d_ff=128"):
    models.load_hf_matching(str(tmp_path), other)


def test_unknown_variant_is_an_error():
  for arg in ("1.5b,v9-8", "3b", "1.5b,v5p-128"):
    with pytest.raises(ValueError, match="unknown config variant"):
      qwen_math.get_config(arg)


def test_plan_activation_estimate_matches_the_compiled_train_step():
  """plan.activation_bytes against the real RL train step lowered and compiled on 8 fake devices (fsdp 4 x tensor 2)
  at a scaled-down long-context shape (4,096 tokens, vocab 32k, bfloat16, remat, blockwise attention, log-probs in
  chunks): its temporary memory per device (memory_analysis) within 20%."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  config = config_lib.from_config_dict(qwen_math.get_config("smoke"))
  model = dataclasses.replace(config.model, vocab_size=32000, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4,
                              head_dim=32, d_ff=1024, dtype="bfloat16", remat=True, attention="blockwise",
                              attention_block=512, logprob_chunk=1024)
  rl = dataclasses.replace(config.rl, prompts_per_iteration=4, minibatches=4, samples_per_prompt=2,
                           max_response_len=4000)
  config = dataclasses.replace(config, model=model, rl=rl, data=dataclasses.replace(config.data, max_prompt_len=96))
  sizes = {"data": 1, "fsdp": 4, "tensor": 2}
  seq = plan.lengths(config)
  assert seq["train"] == 4096 and plan.minibatch_rows(config) == 8
  estimate = plan.activation_bytes(config, sizes, seq)["train"]
  mesh = sharding.make_mesh(sizes)
  step, params, opt_state, batch = plan.train_step_args(config, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(config.sharding.logical_axis_rules):
    temp = jax.jit(step).lower(params, opt_state, batch).compile().memory_analysis().temp_size_in_bytes
  assert 0.8 <= estimate / temp <= 1.2, (estimate, temp)
