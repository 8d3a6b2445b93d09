"""Long sequences: log-probs from logits a chunk at a time, blockwise and splash attention, sequence packing."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from k15 import models, sharding
from k15.models import attention
from k15.rl import batching, loop, losses, trainer

CFG = models.ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                         qkv_bias=True, attention="dense", logprob_chunk=0)


@pytest.fixture(scope="module")
def params():
  return models.init_params(CFG, jax.random.key(0))


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _assert_grads_close(got, want, tol):
  """Gradient trees equal within tol relative to want's largest entry (float32 rounding grows with the values)."""
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want))
  assert _max_diff(got, want) <= tol * max(scale, 1.0)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_chunked_logprobs_and_blockwise_attention_equal_the_plain_pass(params, dtype, tol):
  """The log-probs from logits 7 positions at a time and with blockwise attention (blocks of 8) equal the plain pass's
  (every logit at once, dense attention), values and gradients of a masked loss over ragged rows."""
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(0, 97, (3, 45)))
  mask = jnp.asarray((np.arange(44)[None] < np.array([[44], [20], [31]])).astype(np.float32))
  plain = dataclasses.replace(CFG, dtype=dtype)
  tiled = dataclasses.replace(plain, attention="blockwise", attention_block=8, logprob_chunk=7)
  weights = jnp.asarray(rng.normal(size=(3, 44)).astype(np.float32)) * mask
  for cfg in (plain, tiled):
    loss = lambda p, cfg=cfg: jnp.sum(losses.masked_sum(models.token_logprobs(cfg, p, tokens), weights))
    value, grad = jax.value_and_grad(loss)(params)
    if cfg is plain:
      want = (models.token_logprobs(cfg, params, tokens), value, grad)
  got = (models.token_logprobs(tiled, params, tokens), value, grad)
  np.testing.assert_allclose(got[0] * mask, want[0] * mask, atol=tol, rtol=tol)
  np.testing.assert_allclose(got[1], want[1], rtol=tol)
  _assert_grads_close(got[2], want[2], tol)


@pytest.mark.parametrize("T,block", [(64, 16), (50, 16), (40, 64)])
def test_blockwise_attention_matches_dense_with_segments(T, block):
  """Causal within each segment of a packed row (and padded to whole blocks when T is not a multiple): outputs and
  gradients of q, k and v equal dense attention's."""
  rng = np.random.RandomState(1)
  B, N, K, H = 2, 6, 2, 8
  q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, H)).astype(np.float32)) for n in (N, K, K))
  segments = jnp.asarray(np.stack([np.repeat([0, 1, 2], [T // 3, T // 3, T - 2 * (T // 3)]), np.zeros(T)]), jnp.int32)
  outs = {}
  w = jnp.asarray(rng.normal(size=(B, T, N, H)).astype(np.float32))
  for impl in ("dense", "blockwise"):
    f = lambda q, k, v, impl=impl: attention.causal_attention(q, k, v, segments, impl=impl, block=block)
    outs[impl] = (f(q, k, v), jax.grad(lambda *a, f=f: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v))
  np.testing.assert_allclose(outs["blockwise"][0], outs["dense"][0], atol=1e-5)
  assert _max_diff(outs["blockwise"][1], outs["dense"][1]) < 1e-5


def test_splash_attention_matches_blockwise_in_interpret_mode():
  """The TPU kernel (run in Pallas' interpret mode on CPU) through the same wrapper: GQA as multi-query attention
  per kv head, the causal mask and segment ids."""
  rng = np.random.RandomState(2)
  B, K, G, T, H = 2, 2, 2, 256, 64
  q = jnp.asarray(rng.normal(size=(B, K, G, T, H)).astype(np.float32)) * H ** -0.5
  k, v = (jnp.asarray(rng.normal(size=(B, K, T, H)).astype(np.float32)) for _ in range(2))
  segments = jnp.asarray(np.stack([np.repeat([0, 1], [100, 156]), np.zeros(T)]), jnp.int32)
  want = attention.blockwise_attention(q, k, v, segments, 128)
  got = attention.splash_attention(q, k, v, segments, 128, interpret=True)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_auto_takes_splash_on_tpu_and_blockwise_beyond_a_block_elsewhere(monkeypatch):
  """"auto": dense up to a block and blockwise beyond it on this CPU (the same result); on TPU the splash kernel, here
  lowered for a TPU (jax.export with an abstract TPU device): a Mosaic custom call."""
  from jax import export  # pylint: disable=g-import-not-at-top
  from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(3)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 40, n, 8)).astype(np.float32)) for n in (4, 2, 2))
  auto = attention.causal_attention(q, k, v, None, impl="auto", block=16)
  np.testing.assert_allclose(auto, attention.causal_attention(q, k, v, None, impl="blockwise", block=16), atol=0)
  with pytest.raises(ValueError, match="attention impl must be one of .* got 'flash'"):
    attention.causal_attention(q, k, v, None, impl="flash")
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  args = [jax.ShapeDtypeStruct((2, 256, n, 128), jnp.bfloat16) for n in (8, 2, 2)]
  fn = jax.jit(lambda q, k, v: attention.causal_attention(q, k, v, None, impl="auto", block=128))
  tpu = mesh_lib.AbstractDevice(device_kind="TPU v5", num_cores=1, platform="tpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=tpu)):
    text = export.export(fn, platforms=["tpu"])(*args).mlir_module()
  assert "tpu_custom_call" in text and "splash" in text


def test_a_packed_batch_gives_the_unpacked_log_probs_loss_and_gradients(params):
  """Six samples of ragged lengths packed into rows of 40 tokens (segment ids, positions restarting per sample):
  each sample's log-probs, the k1.5 loss and its gradients equal those of a row per sample."""
  rng = np.random.RandomState(4)
  lengths = np.array([12, 30, 7, 25, 18, 9], np.int32)
  tokens = np.zeros((6, 40), np.int32)
  for b, n in enumerate(lengths):
    tokens[b, :n] = rng.randint(1, 97, n)
  mask = (np.arange(39)[None] < lengths[:, None] - 1) & (np.arange(39)[None] >= 3)
  batch = {"tokens": tokens, "mask": mask.astype(np.float32), "ref_logp": rng.normal(-3, 1, (6, 39)).astype(np.float32),
           "rewards": np.array([1, 0, 1, 1, 0, 0], np.float32), "weights": np.ones(6, np.float32), "lengths": lengths}
  rl = dataclasses.make_dataclass("RL", ["loss", "tau", "log_ratio", "baseline", "form", "samples_per_prompt"])(
      "k15", 0.1, "sequence", "mean", "gradient", 3)
  packed_mb, padding = loop.pack_minibatch(batch, pad_id=0)
  assert packed_mb["packed_tokens"].shape[0] < 6 and 0 <= padding < 0.5
  cfg = dataclasses.replace(CFG, attention="blockwise", attention_block=16, logprob_chunk=16)
  loss_fn = loop.make_loss_fn(cfg, rl)
  (loss_a, _), grad_a = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
  (loss_b, _), grad_b = jax.value_and_grad(loss_fn, has_aux=True)(params, packed_mb)
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5, atol=1e-6)
  _assert_grads_close(grad_b, grad_a, 1e-5)
  plain = models.token_logprobs(cfg, params, jnp.asarray(tokens))
  packed = models.token_logprobs(cfg, params, packed_mb["packed_tokens"], packed_mb["packed_segments"])
  unpacked = np.asarray(packed)[packed_mb["unpack_rows_BxTm1"], packed_mb["unpack_cols_BxTm1"]]
  np.testing.assert_allclose(unpacked * mask, np.asarray(plain) * mask, atol=1e-5)


def test_a_16k_train_step_needs_a_fraction_of_the_plain_steps_temp_memory(capsys):
  """The RL train step at T=16,384 (vocab 32k, tiny model, 2 rows), lowered and compiled on CPU: with blockwise
  attention and log-probs a chunk of positions at a time, its temp memory is at most 0.25x the plain step's (every
  logit at once, a T x T score matrix per head)."""
  base = models.ModelConfig(vocab_size=32000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128)
  rl = dataclasses.make_dataclass("RL", ["loss", "tau", "log_ratio", "baseline", "form", "samples_per_prompt"])(
      "k15", 0.1, "sequence", "mean", "gradient", 2)
  B, T = 2, 16384
  spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
  batch = {"tokens": spec((B, T), jnp.int32), "mask": spec((B, T - 1)), "ref_logp": spec((B, T - 1)),
           "rewards": spec((B,)), "weights": spec((B,))}
  opt = optax.adam(1e-3)
  temp = {}
  for name, cfg in [("plain", dataclasses.replace(base, attention="dense", logprob_chunk=0)),
                    ("tiled", dataclasses.replace(base, attention="blockwise", attention_block=512, logprob_chunk=1024))]:
    params = models.abstract_params(cfg)
    step = trainer.train_step(loop.make_loss_fn(cfg, rl), opt)
    compiled = jax.jit(step).lower(params, jax.eval_shape(opt.init, params), batch).compile()
    temp[name] = compiled.memory_analysis().temp_size_in_bytes
  with capsys.disabled():
    print(f"\n  T=16384 train step temp memory: plain {temp['plain'] / 2**30:.2f} GiB, "
          f"tiled+blockwise {temp['tiled'] / 2**30:.2f} GiB ({temp['tiled'] / temp['plain']:.3f}x)")
  assert temp["tiled"] <= 0.25 * temp["plain"]


def test_the_rollout_cache_is_freed_before_training_and_evaluation(tmp_path, monkeypatch):
  """One RL iteration of the arith smoke config with evaluation: when the reference pass and the training steps
  start, and when evaluation starts, no live device array is the rollout engine's KV cache (as experiments.plan
  assumes: the phases' peaks do not add up)."""
  from experiments import train as main_job  # pylint: disable=import-outside-toplevel
  from experiments.configs import arith  # pylint: disable=import-outside-toplevel
  from k15 import config as config_lib  # pylint: disable=import-outside-toplevel
  from k15.rl import evaluation  # pylint: disable=import-outside-toplevel
  from k15.sampling import RolloutEngine  # pylint: disable=import-outside-toplevel
  config = arith.get_config("smoke")
  config.sft.steps, config.rl.iterations, config.eval.every, config.rl.pack = 0, 1, 1, True
  config.rl.token_budget = config.rl.max_response_len  # every group completes: the iteration trains
  config = config_lib.from_config_dict(config)
  caches, seen = [], {}  # the caches' (shape, dtype): holding the arrays would keep them alive
  run = RolloutEngine.run

  def recording_run(engine, *args, **kwargs):
    out = run(engine, *args, **kwargs)
    caches.append((engine._state.kv.shape, engine._state.kv.dtype))  # pylint: disable=protected-access
    return out

  def cache_alive():
    return any((x.shape, x.dtype) in caches for x in jax.live_arrays() if not x.is_deleted())

  def watch(name, fn):
    def watched(*args, **kwargs):
      seen.setdefault(name, cache_alive())
      return fn(*args, **kwargs)
    return watched
  monkeypatch.setattr(RolloutEngine, "run", recording_run)
  monkeypatch.setattr(loop, "in_chunks", watch("reference", loop.in_chunks))
  monkeypatch.setattr(loop, "pack_minibatch", watch("training", loop.pack_minibatch))
  monkeypatch.setattr(evaluation, "evaluate", watch("evaluation", evaluation.evaluate))
  workdir = str(tmp_path)
  trainer_ = main_job.make_trainer(config)
  tokenizer, train, eval_ = main_job.load_task(config, workdir)
  params = trainer_.init_params(jax.random.key(config.seed))
  with main_job.make_verifier(config) as verifier:
    loop.run_rl(config, workdir, trainer_, params, tokenizer, train, eval_, verifier)
  assert caches and seen == {"reference": False, "training": False, "evaluation": False}


def test_packing_wastes_little_on_long_tailed_lengths():
  """The sampler benchmark's long-tailed response lengths (log-normal, median ~50, up to 512, 16-token prompts):
  a training minibatch of 128 samples packed into rows of the longest one's length (rounded to 32, as build_batch
  does) leaves under 15% padding; a row per sample leaves most of it."""
  rng = np.random.RandomState(0)
  lengths = 16 + np.clip(np.round(rng.lognormal(math.log(51.2), 1.0, 128)), 4, 512).astype(int)
  T = 32 * -(-lengths.max() // 32)
  _, _, rows = batching.pack_rows(lengths, T)
  packed_padding = 1 - lengths.sum() / (rows * T)
  assert packed_padding < 0.15, packed_padding
  assert 1 - lengths.sum() / (len(lengths) * T) > 0.7  # unpacked


def test_segment_positions_restart_per_sample():
  segments = jnp.asarray([[0, 0, 0, 1, 1, 2, -1, -1]])
  np.testing.assert_array_equal(attention.segment_positions(segments), [[0, 1, 2, 0, 1, 0, 0, 1]])
