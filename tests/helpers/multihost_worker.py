"""One process of a 2-process run on localhost: a sharded next-token train step on a global 8-device mesh.

Usage: python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz
"""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import flax.linen as nn  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from k15 import models, sharding  # noqa: E402

CFG = models.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)


def loss_fn(params, tokens):
  return -jnp.mean(models.token_logprobs(CFG, params, tokens))


def main():
  process_id, num_processes, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
  assert sharding.initialize_distributed(f"localhost:{port}", num_processes, process_id)
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  p_shard = sharding.param_shardings(CFG, mesh)
  b_shard = sharding.batch_sharding(mesh, 2)
  params = jax.jit(lambda: models.init_params(CFG, jax.random.PRNGKey(0)), out_shardings=p_shard)()
  tokens_np = np.random.RandomState(1).randint(0, CFG.vocab_size, (8, 12))
  tokens = jax.make_array_from_callback(tokens_np.shape, b_shard, lambda idx: tokens_np[idx])
  optimizer = optax.adam(1e-2)
  o_shard = sharding.opt_state_shardings(optimizer, models.abstract_params(CFG), p_shard, mesh)
  opt_state = jax.jit(optimizer.init, out_shardings=o_shard)(params)

  @jax.jit
  def train_step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    new_params, _, loss, grads = train_step(params, opt_state, tokens)
  assert not new_params["layers"]["mlp"]["up"]["kernel"].is_fully_addressable  # really spans both processes
  grads, new_params = multihost_utils.process_allgather((grads, new_params), tiled=True)
  loss = float(multihost_utils.process_allgather(loss, tiled=True))
  if process_id == 0:
    flat = {f"grad/{jax.tree_util.keystr(k)}": v for k, v in jax.tree_util.tree_leaves_with_path(grads)}
    flat.update({f"param/{jax.tree_util.keystr(k)}": v
                 for k, v in jax.tree_util.tree_leaves_with_path(new_params)})
    np.savez(out, loss=loss, **flat)


if __name__ == "__main__":
  main()
