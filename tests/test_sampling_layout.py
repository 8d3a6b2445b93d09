"""The sampler as an accelerator runs it, checked on 8 fake CPU devices: what crosses devices per decode step, where
the KV cache lives, attention that follows the filled lengths, compiles that stop early, top-p without a sort."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import hlo
from scipy import stats

from k15 import models, sampling, sharding
from k15.models import attention
from k15.sampling import engine as engine_lib
from k15.sampling import slots

CFG = models.ModelConfig(vocab_size=4096, d_model=128, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16, d_ff=256,
                         qkv_bias=True, tie_embeddings=True)


@pytest.fixture(scope="module")
def tp_loop():
  """The decode loop on fsdp 4 x tensor 2, the params first in the training layout: (engine, compiled loop, its
  arguments)."""
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  params = jax.jit(lambda r: models.init_params(CFG, r),
                   out_shardings=sharding.param_shardings(CFG, mesh, sharding.DEFAULT_RULES))(jax.random.key(0))
  scfg = sampling.SamplingConfig(temperature=1.0, max_new_tokens=64, chunk_size=8, max_length=1024, page_size=16)
  engine = sampling.RolloutEngine(CFG, scfg, 16, mesh)
  weights = engine.prepare(params)
  state = engine._call(slots.init_state, CFG, scfg, 16, engine.num_pages, engine.layout)  # pylint: disable=protected-access
  args = (engine.backend, CFG, scfg, engine.layout, engine.local_loops, weights, state, engine.pages.table_BxM,
          np.int32(17))
  with jax.set_mesh(mesh):
    compiled = slots.decode_chunk.lower(*args).compile()
  return engine, compiled, state


def test_a_decode_step_moves_at_most_twice_a_tensor_parallel_steps_bytes(tp_loop):
  """Per decode step (one iteration of the loop), the collectives' bytes are at most 2x a tensor-parallel ideal:
  two all-reduces of [slots per shard, d_model] per layer and one gather of [slots per shard, vocab]. The weights
  are in the sampling layout (split over 'tensor' only), the logits stay vocab-split (the sampler's reductions
  combine per-shard results), so nothing of the slots' logits or of the weights is gathered."""
  engine, compiled, _ = tp_loop
  assert not engine.local_loops
  steps = hlo.loop_collectives(compiled.as_text(), "jit(decode_chunk)/while")
  slots_per_shard = 16 // 4
  ideal = 2 * CFG.n_layers * slots_per_shard * CFG.d_model * 4 + slots_per_shard * CFG.vocab_size * 4
  moved = sum(n for _, n in steps)
  assert 0 < moved <= 2 * ideal, steps
  assert all(n < slots_per_shard * CFG.vocab_size * 4 for _, n in steps)  # no [slots, vocab] array crosses
  per_layer = [n for op, n in steps if op == "all-reduce" and n == slots_per_shard * CFG.d_model * 4]
  assert len(per_layer) >= 2 * CFG.n_layers  # the tensor-parallel all-reduces are there: the test measures them


def test_the_kv_cache_is_split_evenly_over_all_devices(tp_loop):
  """The cache held between chunks and the one the loop carries: pages over the 4 slot shards, kv heads over the 2
  tensor shards, within 1.25x of an even split over the 8 devices; no buffer of the compiled loop holds more of it."""
  engine, compiled, state = tp_loop
  kv = state.kv
  total = kv.size * kv.dtype.itemsize
  per_device = int(np.prod(kv.sharding.shard_shape(kv.shape))) * kv.dtype.itemsize
  assert per_device <= 1.25 * total / 8
  assert {s.data.nbytes for s in kv.addressable_shards} == {per_device}
  L, P, Z, C, H = kv.shape
  cache_like = [dims for lines in hlo.computations(compiled.as_text()).values() for line in lines
                for _, dims in hlo.array_shapes(line.split("=")[1] if "=" in line else "")
                if len(dims) == 5 and dims[0] == L and dims[2] == Z and dims[4] == H]
  assert cache_like and all(d[1] * d[3] <= 1.25 * P * C / 8 for d in cache_like), cache_like
  memory = compiled.memory_analysis()
  assert memory.temp_size_in_bytes < 0.5 * per_device  # no copy of the cache in the loop (1 MB per device here)


def test_each_device_makes_only_its_share_of_the_empty_cache(tp_loop):
  """The slot state a rollout phase starts from is one program in which each device writes its own share. Its
  output and scratch per device are within 1.25x of an even split over the 8 devices: the whole cache (for the 7B
  32k-token config 1.9 TB, 28 GiB a device) is never filled on one device, let alone on all."""
  engine, _, state = tp_loop
  maker = slots.state_maker(CFG, engine.scfg, 16, engine.num_pages, engine.layout)
  with jax.set_mesh(engine.mesh):
    memory = maker.lower().compile().memory_analysis()
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  assert state.kv.size * state.kv.dtype.itemsize > 0.9 * total  # the cache is what matters
  assert 0 < memory.output_size_in_bytes + memory.temp_size_in_bytes <= 1.25 * total / 8, memory


def test_attention_cost_follows_the_filled_lengths():
  """A decode step's XLA paged attention where half the slots hold 64 tokens and half 1024 costs at most 0.6x what
  it costs when all hold 1024 (the ratio of pages to read is 0.53). The cost is measured in one run of each: the
  bytes written by the ops the runtime executed (the work loop's ops once per trip it ran), from jax's profiler."""
  rng = np.random.RandomState(0)
  B, N, K, H, Z = 16, 8, 2, 64, 16
  M = 1024 // Z
  kv = jnp.asarray(rng.normal(size=(B * M, Z, 2 * K, H)).astype(np.float32))
  table = jnp.asarray(rng.permutation(B * M).reshape(B, M).astype(np.int32))
  q = jnp.asarray(rng.normal(size=(B, 1, N, H)).astype(np.float32))
  full = np.full((B, 1), 1023, np.int32)
  mixed = np.where(np.arange(B)[:, None] % 2 == 0, 63, 1023).astype(np.int32)
  step = jax.jit(lambda positions: attention.paged_attention_xla(q, kv, table, positions, 16)).lower(full).compile()
  cost = {name: hlo.executed_bytes(step, positions) for name, positions in [("full", full), ("mixed", mixed)]}
  page_bytes = Z * 2 * K * H * 4
  # Each run copied at least the pages it must read (no trip went unrecorded), and the mixed one far fewer.
  assert cost["full"] >= B * M * page_bytes and cost["mixed"] >= B // 2 * (M + 64 // Z) * page_bytes, cost
  assert cost["mixed"] <= 0.6 * cost["full"], cost


def test_a_long_tailed_rl_run_compiles_nothing_after_its_second_iteration():
  """Ten iterations of rollouts with partial rollouts on a long-tailed length law, the params changing every
  iteration (as training changes them): every device call's shapes are met in the first two iterations (the cache
  is fixed for the run, prefill and slot loads come in three sizes), so later iterations compile nothing."""
  cfg = models.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
  params = models.init_params(cfg, jax.random.key(0))
  rng = np.random.RandomState(0)
  lengths = np.clip(np.round(rng.lognormal(np.log(12), 1.0, 10 * 24)), 2, 120).astype(int)
  scfg = sampling.SamplingConfig(greedy=True, max_new_tokens=120, chunk_size=8, max_length=140, page_size=8)
  engine = sampling.RolloutEngine(cfg, scfg, 8)
  buffer = sampling.ReplayBuffer()
  train = jax.jit(lambda p, i: jax.tree.map(lambda x: x * (1 + 1e-3 * i), p))
  compiles = []
  # An executable for a new shape: compiled, or loaded from the persistent compilation cache (conftest's).
  events = ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec")
  listener = lambda event, *_, **__: compiles.append(event) if event in events else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  per_iteration = []
  try:
    for it in range(10):
      before = len(compiles)
      requests = [sampling.Request(24 * it + i, rng.randint(1, 63, rng.randint(3, 20)).tolist(),
                                   max_new_tokens=int(lengths[24 * it + i])) for i in range(24)]
      engine.run(params, requests, buffer, it, 16, jax.random.key(it))
      params = train(params, it)
      per_iteration.append(len(compiles) - before)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert per_iteration[0] > 0 and sum(per_iteration[2:]) == 0, per_iteration
  assert len(buffer) > 0  # partial rollouts were really resumed across iterations


def test_a_refill_splits_its_prefill_rows_evenly_over_the_slot_shards(monkeypatch):
  """A prefill call computes as many rows on each slot shard as on its fullest one (one shape for all), so a refill
  puts each sequence on the shard with the fewest rows so far. Four prompts of two pages each, on two shards of four
  slots: two prompts a shard, 4 rows each, a call of 2 x 4 rows (the per-shard sizes are 1, 4 and 16 rows), where
  the four on one shard would take 2 x 16."""
  cfg = models.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
  params = models.init_params(cfg, jax.random.key(0))
  scfg = sampling.SamplingConfig(greedy=True, max_new_tokens=4, chunk_size=4, max_length=32, page_size=8)
  engine = sampling.RolloutEngine(cfg, scfg, 8, sharding.make_mesh({"data": 2}, jax.devices()[:2]))
  assert engine.shards == 2
  rows, prefill = [], slots.prefill

  def counted_prefill(*args):  # its arguments end with the rows' positions and page tables
    rows.append(args[-2].shape[0])
    return prefill(*args)

  monkeypatch.setattr(slots, "prefill", counted_prefill)
  requests = [sampling.Request(i, list(range(1 + i, 17 + i))) for i in range(4)]  # 16 tokens: 15 encoded, 2 pages
  finished, stats = engine.run(params, requests, None, 0, None, jax.random.key(0))
  assert len(finished) == 4 and rows == [2 * 4]
  assert stats.prefill_tokens == 4 * 15 and stats.prefill_call_tokens == 2 * 4 * 8  # rows of a page of 8 positions


def test_size_classes_are_three():
  assert [engine_lib.size_class(n, 128) for n in (1, 8, 9, 32, 33, 128)] == [8, 8, 32, 32, 128, 128]
  with pytest.raises(ValueError, match="129 rows exceed the largest call of 128"):
    engine_lib.size_class(129, 128)


VOCAB = 152064


def test_top_p_on_a_large_vocabulary_sorts_no_vocabulary():
  """top_p=0.95 on logits of a 152k vocabulary: the compiled selection sorts nothing of vocabulary size (candidates
  come from per-shard top-k of at most nucleus_candidates), also with the vocab split over 'tensor'."""
  scfg = sampling.SamplingConfig(temperature=0.8, top_p=0.95)
  logits = jax.ShapeDtypeStruct((8, VOCAB), jnp.float32)
  keys = jax.ShapeDtypeStruct((8,), jax.random.key(0).dtype)
  select = jax.jit(sampling.select_tokens, static_argnums=2)
  texts = [select.lower(logits, keys, scfg).compile().as_text()]
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.SAMPLING_RULES):
    split = jax.ShapeDtypeStruct((8, VOCAB), jnp.float32,
                                 sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor")))
    texts.append(select.lower(split, keys, scfg).compile().as_text())
  for text in texts:
    sorted_shapes = hlo.sorts(text)
    assert all(max(max(dims) for dims in shapes) < VOCAB for shapes in sorted_shapes), sorted_shapes
    assert "TopK" in text or "topk" in text.lower()


def _nucleus(logits, temperature, top_p):
  """The reference nucleus sampler's distribution: sort the whole vocabulary, keep the smallest top set whose mass
  reaches top_p, renormalize (float64)."""
  z = logits.astype(np.float64) / temperature
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p, kind="stable")
  before = np.cumsum(p[order]) - p[order]
  keep = np.zeros(len(p), bool)
  keep[order[before < top_p]] = True
  q = np.where(keep, p, 0.0)
  return q / q.sum()


@pytest.mark.parametrize("split", [False, True])
def test_top_p_draws_follow_a_reference_nucleus_sampler(split):
  """On fixed logits of an 8k vocabulary (a nucleus of tens of tokens, candidates 256 < vocab), the draws' frequencies
  fit the reference nucleus distribution (chi-square, total variation) and never leave it; with the vocab split
  over 'tensor' (each shard's own top candidates) too."""
  V, draws, rounds = 8000, 6000, 4
  rng = np.random.RandomState(1)
  logits = (rng.standard_normal(V) * 2.5).astype(np.float32)
  scfg = sampling.SamplingConfig(temperature=0.9, top_p=0.8, nucleus_candidates=256)
  want = _nucleus(logits, 0.9, 0.8)
  select = jax.jit(sampling.select_tokens, static_argnums=2)
  batch = jnp.broadcast_to(jnp.asarray(logits), (draws, V))
  counts = np.zeros(V, np.int64)
  for r in range(rounds):
    keys = jax.random.split(jax.random.key(r), draws)
    if split:
      mesh = sharding.make_mesh({"data": 4, "tensor": 2})
      with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.SAMPLING_RULES):
        on_mesh = jax.device_put(batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "tensor")))
        tokens = select(on_mesh, keys, scfg)
    else:
      tokens = select(batch, keys, scfg)
    counts += np.bincount(np.asarray(tokens), minlength=V)
  draws *= rounds
  support = want > 0
  assert 20 < support.sum() < 256
  assert counts[~support].sum() == 0, "a token outside the nucleus was drawn"
  assert stats.chisquare(counts[support], want[support] * draws).pvalue > 1e-3
  assert 0.5 * np.abs(counts / draws - want).sum() < 0.03
