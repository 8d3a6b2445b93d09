"""Sharded loss and gradients on 8 fake CPU devices equal the single-device values."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from k15 import models, sharding

CFG = models.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)


def next_token_loss(params, tokens):
  return -jnp.mean(models.token_logprobs(CFG, params, tokens))


@pytest.fixture(scope="module")
def reference():
  params = models.init_params(CFG, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 12), 0, CFG.vocab_size)
  loss, grads = jax.jit(jax.value_and_grad(next_token_loss))(params, tokens)
  return params, tokens, loss, grads


@pytest.mark.parametrize("mesh_sizes", [{"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 4}, {"data": 2, "fsdp": -1}])
def test_sharded_loss_and_grads_match_single_device(reference, mesh_sizes):
  assert jax.device_count() == 8
  params, tokens, loss_ref, grads_ref = reference
  mesh = sharding.make_mesh(mesh_sizes)
  p_shard = sharding.param_shardings(CFG, mesh)
  b_shard = sharding.batch_sharding(mesh, 2)
  params_s = jax.device_put(params, p_shard)
  tokens_s = jax.device_put(tokens, b_shard)
  step = jax.jit(jax.value_and_grad(next_token_loss), in_shardings=(p_shard, b_shard),
                 out_shardings=(sharding.replicated(mesh), p_shard))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    loss, grads = step(params_s, tokens_s)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads, grads_ref)

  # The params really are sharded: the MLP kernel is split over fsdp (and tensor when present).
  gate = params_s["layers"]["mlp"]["gate"]["kernel"]
  tensor = mesh.shape["tensor"]
  assert gate.sharding.spec == P(None, "fsdp", "tensor" if tensor > 1 else None)
  L, D, F = gate.shape
  assert gate.addressable_shards[0].data.shape == (L, D // mesh.shape["fsdp"], F // tensor)
  assert tokens_s.addressable_shards[0].data.shape[0] == 8 // (mesh.shape["data"] * mesh.shape["fsdp"])


def test_opt_state_follows_params():
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  p_shard = sharding.param_shardings(CFG, mesh)
  o_shard = sharding.opt_state_shardings(optax.adam(1e-3), models.abstract_params(CFG), p_shard, mesh)
  adam = o_shard[0]
  assert adam.count.spec == P()
  assert adam.mu["layers"]["mlp"]["gate"]["kernel"].spec == p_shard["layers"]["mlp"]["gate"]["kernel"].spec
  assert adam.nu["embed"]["embedding"].spec == p_shard["embed"]["embedding"].spec


def test_axis_that_does_not_divide_stays_replicated():
  mesh = sharding.make_mesh({"tensor": 8})
  # kv_heads=2 cannot be split 8 ways: that dimension stays replicated instead of failing.
  spec = sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (32, 2, 8), mesh, sharding.DEFAULT_RULES)
  assert spec == P(None, None, None)
  spec = sharding.logical_to_spec(("embed", "mlp"), (32, 64), mesh, sharding.DEFAULT_RULES)
  assert spec == P(None, "tensor")


def test_mesh_errors():
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.make_mesh({"data": -1, "fsdp": -1})
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.make_mesh({"model": 2})
  with pytest.raises(ValueError, match="does not divide"):
    sharding.make_mesh({"fsdp": 3, "data": -1})
  with pytest.raises(ValueError, match="no sharding rule"):
    sharding.logical_to_spec(("bogus",), (4,), sharding.make_mesh({"data": -1}), sharding.DEFAULT_RULES)


def test_initialize_distributed_is_noop_on_one_process():
  assert sharding.initialize_distributed() is False


def test_train_steps_run_at_most_two_ahead_of_the_devices(monkeypatch):
  """The host waits for step n - 2 after dispatching step n: XLA:CPU's client deadlocked on 8 fake devices when a
  loop queued dozens of sharded steps."""
  from k15.rl import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  waited = []
  monkeypatch.setattr(trainer_lib.jax, "block_until_ready", lambda x: waited.append(x) or x)
  trainer = trainer_lib.Trainer(CFG, sharding.make_mesh({"fsdp": 4, "tensor": 2}))
  def loss_fn(p, b):
    loss = next_token_loss(p, b["tokens"])
    return loss, {"loss": loss}
  step = trainer.make_step(loss_fn, optax.sgd(0.1))
  params = trainer.init_params(jax.random.PRNGKey(0))
  opt_state = trainer.init_opt_state(optax.sgd(0.1), params)
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (8, 12), 0, CFG.vocab_size))
  dispatched = []
  for _ in range(5):
    params, opt_state, metrics = step(params, opt_state, {"tokens": tokens})
    dispatched.append(metrics)
  assert trainer_lib.STEPS_IN_FLIGHT == 2 and [id(m) for m in waited] == [id(m) for m in dispatched[:3]]


def test_two_slice_hybrid_mesh_orders_devices_by_slice_and_keeps_params_within_each():
  """mesh.dcn_data=2 over fake devices of two slices (interleaved ids, as slices enumerate): 'data' runs across
  the slices, fsdp within each; then, on the real devices in that order, every param shard lives once in each slice
  (a full replica per slice: only gradients cross the data-center network) and each slice takes half the batch."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  @dataclasses.dataclass(frozen=True)
  class FakeDevice:
    id: int
    slice_index: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"

  fakes = [FakeDevice(i, slice_index=i % 2, process_index=i // 2) for i in range(8)]
  order = sharding.device_array({"data": 1, "fsdp": -1, "tensor": 1}, fakes, dcn_data=2)
  assert order.shape == (2, 4, 1)
  assert [[d.slice_index for d in row] for row in order[:, :, 0]] == [[0] * 4, [1] * 4]
  assert [d.id for d in order.reshape(-1)] == [0, 2, 4, 6, 1, 3, 5, 7]
  with pytest.raises(ValueError, match="mesh.dcn_data=4: the 8 devices are on 2 slices"):
    sharding.device_array({"data": -1}, fakes, dcn_data=4)

  real = {d.id: d for d in jax.devices()}
  mesh = jax.sharding.Mesh(np.vectorize(lambda d: real[d.id], otypes=[object])(order), sharding.MESH_AXES)
  slice_of = {real[d.id]: d.slice_index for d in fakes}
  params = jax.device_put(models.init_params(CFG, jax.random.PRNGKey(0)), sharding.param_shardings(CFG, mesh))
  split = 0
  for x in jax.tree.leaves(params):
    holders = {}
    for shard in x.addressable_shards:
      holders.setdefault(str(shard.index), []).append(slice_of[shard.device])
    assert all(sorted(s) == [0] * (len(s) // 2) + [1] * (len(s) // 2) for s in holders.values()), x.shape
    split += len(holders) == 4  # split 4 ways over fsdp within a slice
  assert split > 0
  batch = jax.device_put(np.arange(16).reshape(8, 2), sharding.batch_sharding(mesh, 2))
  rows = {0: set(), 1: set()}
  for shard in batch.addressable_shards:
    rows[slice_of[shard.device]].update(np.asarray(shard.data)[:, 0] // 2)
  assert rows == {0: {0, 1, 2, 3}, 1: {4, 5, 6, 7}}
