"""Sampling on 8 fake CPU devices (slots and pages split, params moved to the sampling layout) equals 1 device."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from k15 import models, sampling, sharding

CFG = models.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                         qkv_bias=True, tie_embeddings=True)
PROMPTS = [[(7 * i + j) % 64 for j in range(2 + i % 5)] for i in range(12)]  # 12 prompts for 8 slots: refills
CONFIGS = {
    "greedy": sampling.SamplingConfig(greedy=True, max_new_tokens=16, chunk_size=8, max_length=32, page_size=4),
    "sampled": sampling.SamplingConfig(temperature=1.0, top_k=20, max_new_tokens=16, chunk_size=8, max_length=32,
                                       page_size=4),
    "nucleus": sampling.SamplingConfig(temperature=1.0, top_p=0.9, nucleus_candidates=16, max_new_tokens=16,
                                       chunk_size=8, max_length=32, page_size=4),
}


@pytest.fixture(scope="module")
def params():
  """Random weights (std 0.3: varied greedy outputs), unit norm scales; no init compile needed."""
  rng = np.random.RandomState(0)

  def init(path, a):
    is_norm = "norm" in jax.tree_util.keystr(path)
    return jnp.asarray(np.ones(a.shape) if is_norm else rng.normal(0.0, 0.3, a.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(init, models.abstract_params(CFG))


def _run(params, scfg, mesh=None):
  engine = sampling.RolloutEngine(CFG, scfg, num_slots=8, mesh=mesh)
  requests = [sampling.Request(i, p, num_samples=1) for i, p in enumerate(PROMPTS)]
  done, _ = engine.run(params, requests, None, 0, None, jax.random.key(3))
  return engine, sorted(done, key=lambda t: t.prompt_id)


@pytest.fixture(scope="module")
def single_device(params):
  return {name: _run(params, scfg)[1] for name, scfg in CONFIGS.items()}


# Meshes of 8 devices: data parallel only (the sampling layout replicates the params: a decode loop per device),
# FSDP x tensor and data x FSDP x tensor (tensor parallel decode: one SPMD loop).
MESHES = {"data8": {"data": 8}, "fsdp4_tensor2": {"fsdp": 4, "tensor": 2},
          "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2}}


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_sharded_sampling_equals_single_device(params, single_device, mesh_name, config):
  """The params start in the training layout (FSDP over 'fsdp', tensor parallel over 'tensor') and move to the
  sampling layout once per run; the tokens are the 1-device run's, and the log-probs agree."""
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(MESHES[mesh_name])
  train_params = jax.device_put(params, sharding.param_shardings(CFG, mesh, sharding.DEFAULT_RULES))
  engine, done = _run(train_params, CONFIGS[config], mesh)
  for a, b in zip(done, single_device[config]):
    np.testing.assert_array_equal(a.response_tokens, b.response_tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert a.finish_reason == b.finish_reason
  # The cache's pages (and the slots) really are split over the slot axes, its kv heads over 'tensor'.
  kv = engine._state.kv  # pylint: disable=protected-access
  slot_shards = 8 // MESHES[mesh_name].get("tensor", 1)
  shard_shape = kv.sharding.shard_shape(kv.shape)
  assert shard_shape[1] == kv.shape[1] // slot_shards
  assert shard_shape[3] == kv.shape[3] // MESHES[mesh_name].get("tensor", 1)
  assert engine.local_loops == (mesh_name == "data8")
  # the params kept their training layout: the move made a copy
  assert train_params["layers"]["mlp"]["gate"]["kernel"].sharding.spec == sharding.logical_to_spec(
      ("layers", "embed", "mlp"), (CFG.n_layers, CFG.d_model, CFG.d_ff), mesh, sharding.DEFAULT_RULES)


@pytest.mark.parametrize("config", ["greedy", "sampled"])
def test_the_native_plug_in_on_8_devices_equals_one(params, single_device, config, needs_native_step):
  """The CPU plug-in on a mesh of 8 devices (the params replicated, each device prefilling and decoding its own
  slots over its own pages) samples what the model's passes sample on one device."""
  from k15.sampling import native  # pylint: disable=g-import-not-at-top
  engine = sampling.RolloutEngine(CFG, CONFIGS[config], num_slots=8, mesh=sharding.make_mesh({"data": 8}),
                                  backend=native.NativeBackend())
  requests = [sampling.Request(i, p, num_samples=1) for i, p in enumerate(PROMPTS)]
  done, _ = engine.run(params, requests, None, 0, None, jax.random.key(3))
  for a, b in zip(sorted(done, key=lambda t: t.prompt_id), single_device[config]):
    np.testing.assert_array_equal(a.response_tokens, b.response_tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_the_models_passes_with_the_native_attention_on_a_tensor_parallel_mesh(params, single_device,
                                                                              needs_native_step):
  """The plug-in's step="model": the model's passes split over fsdp 4 x tensor 2 as on TPU, kernels.cc's attention
  run by each device on its slots, pages and kv heads, sample what the model's passes sample on one device."""
  backend = sampling.load_backend("k15.sampling.native", CFG, jax.devices(), {"step": "model", "required": True})
  mesh = sharding.make_mesh(MESHES["fsdp4_tensor2"])
  train_params = jax.device_put(params, sharding.param_shardings(CFG, mesh, sharding.DEFAULT_RULES))
  engine = sampling.RolloutEngine(CFG, CONFIGS["greedy"], num_slots=8, mesh=mesh, backend=backend)
  requests = [sampling.Request(i, p, num_samples=1) for i, p in enumerate(PROMPTS)]
  done, _ = engine.run(train_params, requests, None, 0, None, jax.random.key(3))
  for a, b in zip(sorted(done, key=lambda t: t.prompt_id), single_device["greedy"]):
    np.testing.assert_array_equal(a.response_tokens, b.response_tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


@pytest.mark.parametrize("backend", ["model", "native"])
@pytest.mark.parametrize("stop_when_free", [9, 2])
def test_local_loops_match_one_loop(params, stop_when_free, backend, request):
  """Replicated params: each slot shard decodes in its own loop (with the model's or the native step), and the
  shards agree on stopping every few steps. Slot i (alone on device i) may generate i + 1 tokens. With no work
  waiting (9 > 8 slots) both run to the chunk's end; with work waiting for 2 free slots, one loop (SPMD) stops at
  step 2, the local loops at their next agreement (step SYNC_STEPS_WORK_WAITING). Tokens and log-probs agree where
  both ran."""
  from k15.sampling import engine as engine_lib  # pylint: disable=g-import-not-at-top
  from k15.sampling import slots  # pylint: disable=g-import-not-at-top
  if backend == "native":
    request.getfixturevalue("needs_native_step")
    from k15.sampling import native  # pylint: disable=g-import-not-at-top
    local_backend = native.NativeBackend()
  else:
    local_backend = sampling.ModelBackend()
  mesh = sharding.make_mesh({"data": 8})
  scfg = CONFIGS["greedy"]
  tokens = np.array([[(3 * i + j) % 64 for j in range(4)] for i in range(8)], np.int32)

  def chunk(local_loops):
    engine = engine_lib.RolloutEngine(CFG, scfg, 8, mesh, backend=local_backend if local_loops else None)
    weights = engine.prepare(params)
    engine.pages = engine_lib.PageTable(8, engine.num_pages, scfg.page_size, scfg.pages_per_slot, engine.shards)
    for slot in range(8):
      assert engine.pages.grow(slot, 12)
    rows = np.zeros((8, scfg.page_size), np.int32)
    rows[:, :3] = tokens[:, :3]
    positions = np.where(np.arange(scfg.page_size) < 3, np.arange(scfg.page_size), -1)[None].repeat(8, 0)
    state = engine._call(slots.init_state, CFG, scfg, 8, engine.num_pages, engine.layout)  # pylint: disable=protected-access
    kv = engine._call(slots.prefill, engine.backend, CFG, scfg, engine.layout, engine.local_loops, weights,  # pylint: disable=protected-access
                      state.kv, rows, positions.astype(np.int32), engine.pages.table_BxM)
    hist = np.zeros((8, scfg.max_length), np.int32)
    hist[:, :4] = tokens
    state = engine._call(slots.load_slots, engine.layout, state._replace(kv=kv), hist, np.arange(8, dtype=np.int32),  # pylint: disable=protected-access
                         np.full((8,), 4, np.int32), np.full((8,), 4, np.int32), np.arange(1, 9, dtype=np.int32),
                         np.zeros((8, 2), np.uint32), jax.random.key(0))
    _, out = engine._call(slots.decode_chunk, engine.backend, CFG, scfg, engine.layout, local_loops, weights, state,  # pylint: disable=protected-access
                          engine.pages.table_BxM, np.int32(stop_when_free))
    return jax.device_get(out)

  local, one = chunk(True), chunk(False)
  steps = 8 if stop_when_free == 9 else slots.SYNC_STEPS_WORK_WAITING
  np.testing.assert_array_equal(local.steps, [steps] * 8)
  np.testing.assert_array_equal(one.steps, [8 if stop_when_free == 9 else 2])
  n = int(one.steps[0])
  np.testing.assert_array_equal(local.tokens_BxC[:, :n], one.tokens_BxC[:, :n])
  np.testing.assert_allclose(local.logprobs_BxC[:, :n], one.logprobs_BxC[:, :n], atol=1e-5)
  np.testing.assert_array_equal((local.tokens_BxC >= 0).sum(axis=1), np.minimum(np.arange(1, 9), steps))


def _schedule_run(params, scfg, mesh, budget):
  """Every prompt sampled to its end, through the replay buffer in segments of `budget` tokens (None: one run)."""
  engine = sampling.RolloutEngine(CFG, scfg, num_slots=8, mesh=mesh)
  buffer, done = sampling.ReplayBuffer(), {}
  requests = [sampling.Request(i, p, num_samples=1) for i, p in enumerate(PROMPTS)]
  for it in range(8):
    finished, _ = engine.run(params, requests if it == 0 else [], buffer, it, budget, jax.random.key(3))
    done.update({t.prompt_id: t for t in finished})
    if not len(buffer):
      break
  return [done[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("mesh_name", ["fsdp4_tensor2", "data2_fsdp2_tensor2"])
def test_chunks_partial_rollouts_and_repeat_stops_on_8_devices(params, single_device, mesh_name):
  """On the tensor-parallel meshes: another chunk size, and partial rollouts (budgets of 5 tokens, resumed from the
  replay buffer) give the uninterrupted 1-device run's tokens; a repeat stop ends the same trajectories at the same
  token as on 1 device."""
  mesh = sharding.make_mesh(MESHES[mesh_name])
  greedy = CONFIGS["greedy"]
  for scfg, budget in [(dataclasses.replace(greedy, chunk_size=3), None), (greedy, 5)]:
    for a, b in zip(_schedule_run(params, scfg, mesh, budget), single_device["greedy"]):
      np.testing.assert_array_equal(a.response_tokens, b.response_tokens)
      np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
  repeat = dataclasses.replace(greedy, repeat_ngram=1, repeat_count=3)
  one = _schedule_run(params, repeat, None, None)
  eight = _schedule_run(params, repeat, mesh, None)
  assert any(t.finish_reason == "repeat" for t in one)
  for a, b in zip(eight, one):
    np.testing.assert_array_equal(a.response_tokens, b.response_tokens)
    assert a.finish_reason == b.finish_reason
