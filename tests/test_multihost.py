"""Two processes on localhost (4 CPU devices each) run the sharded train step and match one process."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from k15 import models
from launch import local

WORKER = os.path.join(os.path.dirname(__file__), "helpers", "multihost_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = models.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)


def test_two_processes_match_single_process(tmp_path):
  port, out = local.free_port(), str(tmp_path / "out.npz")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), "2", str(port), out], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  got = np.load(out)

  params = models.init_params(CFG, jax.random.PRNGKey(0))
  tokens = np.random.RandomState(1).randint(0, CFG.vocab_size, (8, 12))
  loss, grads = jax.value_and_grad(lambda p: -jnp.mean(models.token_logprobs(CFG, p, tokens)))(params)
  optimizer = optax.adam(1e-2)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  new_params = optax.apply_updates(params, updates)

  np.testing.assert_allclose(got["loss"], loss, rtol=1e-5)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    np.testing.assert_allclose(got[f"grad/{jax.tree_util.keystr(path)}"], g, atol=1e-5, rtol=1e-5)
  for path, p in jax.tree_util.tree_leaves_with_path(new_params):
    np.testing.assert_allclose(got[f"param/{jax.tree_util.keystr(path)}"], p, atol=1e-5, rtol=1e-5)
