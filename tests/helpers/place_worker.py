"""One process of a launch.local run: params placed from process-local arrays and gathered back, and a
Trainer.make_eval output gathered across processes, checked against the same computation on one device.

Usage: python -m launch.local --num_processes=2 --devices_per_process=4 -- python tests/helpers/place_worker.py [HF_DIR]
With HF_DIR (save_hf of CFG's init with PRNGKey(3)), also loads it with load_hf_matching on every process.
"""
import sys

import jax
import numpy as np

from k15 import models, sharding
from k15.rl.trainer import Trainer

CFG = models.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                         qkv_bias=True)


def main():
  assert sharding.initialize_distributed()
  assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.device_count())
  trainer = Trainer(CFG, sharding.make_mesh({"data": 2, "fsdp": 4}))
  local = models.init_params(CFG, jax.random.PRNGKey(3))  # on this process's first device only
  placed = trainer.place_params(local)
  assert not placed["embed"]["embedding"].is_fully_addressable  # really spans both processes
  for a, b in zip(jax.tree.leaves(sharding.to_host(placed)), jax.tree.leaves(local)):
    np.testing.assert_array_equal(a, np.asarray(b))
  tokens = np.random.RandomState(0).randint(0, CFG.vocab_size, (8, 6))
  logp = trainer.make_eval(lambda p, b: models.token_logprobs(CFG, p, b["tokens"]))(placed, {"tokens": tokens})
  assert isinstance(logp, np.ndarray) and logp.shape == (8, 5)
  np.testing.assert_allclose(logp, np.asarray(models.token_logprobs(CFG, local, tokens)), rtol=1e-5, atol=1e-5)
  if len(sys.argv) > 1:  # a Hugging Face checkpoint of CFG: read on each process's own CPU, then placed
    from_hf = trainer.place_params(models.load_hf_matching(sys.argv[1], CFG))
    assert not from_hf["layers"]["mlp"]["up"]["kernel"].is_fully_addressable
    for a, b in zip(jax.tree.leaves(sharding.to_host(from_hf)), jax.tree.leaves(sharding.to_host(placed))):
      np.testing.assert_allclose(a, b, rtol=1e-6)  # the checkpoint was saved from the same init
  print(f"process {jax.process_index()}: placed and gathered OK", flush=True)


if __name__ == "__main__":
  main()
