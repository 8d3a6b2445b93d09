"""Sharded gradient steps: one jitted step for any loss, on a mesh with logical axis rules.

Every process holds the same host batch (it is derived from the same seed and rollouts), and each device
takes its slice, so one code path serves 1 device, 8 fake devices and multi-host pods.
"""
import collections
import contextlib
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from k15 import models, sharding


# Steps the host may dispatch ahead of the devices. Unbounded run-ahead (a loop that reads metrics every 50 steps)
# queues enough multi-device programs to deadlock XLA:CPU's client on 8 fake devices: its launch threads block on
# a per-device in-flight limit while the programs that would free it wait for a thread. Two keep the devices busy.
STEPS_IN_FLIGHT = 2


class DivergenceError(RuntimeError):
  """Training produced non-finite losses, gradients or updates more often than allowed; nothing of them was kept."""


def train_step(loss_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
  """step(params, opt_state, batch) -> (params, opt_state, metrics): one gradient step on loss_fn(params, batch) ->
  (loss, metrics); the metrics gain the gradient's global norm. Pure: Trainer.make_step jits it on a mesh,
  experiments/plan.py traces it abstractly.

  The divergence guard: a step whose loss, gradient norm or update norm is not finite (an update too large for
  float32 has an infinite norm) changes nothing, params and optimizer state stay as they were, and
  metrics["skipped"] is 1; the callers count skipped steps and stop a run that has too many.
  """
  def step(params, opt_state, batch):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
    keep = lambda new, old: jnp.where(ok, new, old)
    new_params = jax.tree.map(keep, optax.apply_updates(params, updates), params)
    metrics = dict(metrics, grad_norm=grad_norm, skipped=1 - ok.astype(jnp.int32))
    return new_params, jax.tree.map(keep, new_opt_state, opt_state), metrics
  return step


class Trainer:
  """Holds the mesh, rules and shardings of a run; builds jitted steps and places arrays."""

  def __init__(self, model_cfg: models.ModelConfig, mesh, rules=sharding.DEFAULT_RULES,
               sampling_rules=sharding.SAMPLING_RULES):
    self.cfg, self.mesh, self.rules = model_cfg, mesh, tuple(tuple(r) for r in rules)
    self.sampling_rules = tuple(tuple(r) for r in sampling_rules)  # the sampler's layout on the same mesh
    self.param_shardings = sharding.param_shardings(model_cfg, mesh, self.rules)

  @contextlib.contextmanager
  def context(self):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def init_params(self, rng):
    with self.context():
      return jax.jit(lambda r: models.init_params(self.cfg, r), out_shardings=self.param_shardings)(rng)

  def place_params(self, params):
    """Params -> the training shardings. With several processes, process-local arrays go through host memory:
    jax cannot fill a sharding that spans other hosts from one process's device."""
    if jax.process_count() > 1:
      local = lambda x: x if isinstance(x, jax.Array) and not x.is_fully_addressable else np.asarray(x)
      params = jax.tree.map(local, params)
    return jax.device_put(params, self.param_shardings)

  def init_opt_state(self, optimizer, params):
    """The optimizer's state for placed params (the model's, or a tree holding more, e.g. a value head): its
    param-shaped leaves take their param's sharding."""
    abstract, shardings = models.abstract_params(self.cfg), self.param_shardings
    if jax.tree.structure(params) != jax.tree.structure(abstract):
      abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
      shardings = jax.tree.map(lambda x: x.sharding, params)
    shardings = sharding.opt_state_shardings(optimizer, abstract, shardings, self.mesh)
    with self.context():
      return jax.jit(optimizer.init, out_shardings=shardings)(params)

  def shard_batch(self, batch: dict):
    """Host numpy arrays -> global arrays split over the data axes (replicated if the batch does not divide)."""
    def put(x):
      x = np.asarray(x)
      s = sharding.batch_sharding(self.mesh, x.ndim, self.rules, batch_size=x.shape[0])
      return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    return {k: put(v) for k, v in batch.items()}

  def make_step(self, loss_fn: Callable, optimizer: optax.GradientTransformation):
    """step(params, opt_state, batch) -> (params, opt_state, metrics); loss_fn(params, batch) -> (loss, metrics).

    params and opt_state are donated: callers keep only what the step returns.
    """
    jitted = jax.jit(train_step(loss_fn, optimizer), donate_argnums=(0, 1))
    in_flight = collections.deque()  # the metrics of the steps dispatched and maybe not done

    def run(params, opt_state, batch):
      with self.context():
        out = jitted(params, opt_state, self.shard_batch(batch))
      in_flight.append(out[2])
      if len(in_flight) > STEPS_IN_FLIGHT:
        jax.block_until_ready(in_flight.popleft())
      return out
    return run

  def make_eval(self, fn: Callable):
    """A jitted fn(params, batch) under the mesh, e.g. reference log-probs; returns numpy on every process
    (outputs sharded over several hosts are gathered)."""
    jitted = jax.jit(fn)

    def run(params, batch):
      with self.context():
        return sharding.to_host(jitted(params, self.shard_batch(batch)))
    return run


def in_chunks(fn: Callable, params, batch: dict, rows: int) -> np.ndarray:
  """fn(params, chunk) over chunks of `rows` rows of `batch` (the last padded with zero rows, dropped again).

  One compiled shape, and the memory of one chunk: the float32 logits of a whole iteration's rows would not fit
  a chip with a 150k vocab. fn is row-wise (e.g. a Trainer.make_eval of log-probs).
  """
  n = len(next(iter(batch.values())))
  out = []
  for start in range(0, n, rows):
    chunk = {k: v[start:start + rows] for k, v in batch.items()}
    m = len(next(iter(chunk.values())))
    chunk = {k: np.concatenate([v, np.zeros((rows - m,) + v.shape[1:], v.dtype)]) for k, v in chunk.items()}
    out.append(np.asarray(fn(params, chunk))[:m])
  return np.concatenate(out)


def train_steps(trainer: Trainer, params, loss_fn: Callable, optimizer: optax.GradientTransformation,
                batch_fn: Callable, num_examples: int, *, steps: int, batch_size: int, seed: int,
                logger=None, log_every: int = 50, show: tuple = ("loss",), max_bad_steps: int = 0):
  """`steps` gradient steps of loss_fn, each on batch_fn(indices) for batch_size example indices drawn by a seeded
  rng (with replacement only when there are fewer examples); a fresh optimizer state. Returns the new params
  (params are donated). logger: a MetricsLogger, written every log_every steps and at the last.

  More than max_bad_steps steps skipped by the divergence guard (train_step) raise DivergenceError, checked at each
  log step and at the end, so that a diverged run is never saved.
  """
  step_fn = trainer.make_step(loss_fn, optimizer)
  opt_state = trainer.init_opt_state(optimizer, params)
  rng = np.random.default_rng(seed)
  skipped = 0  # a device scalar: counting costs no host sync per step
  for step in range(1, steps + 1):
    idx = rng.choice(num_examples, size=batch_size, replace=num_examples < batch_size)
    params, opt_state, metrics = step_fn(params, opt_state, batch_fn(idx))
    skipped = skipped + metrics["skipped"]
    if step % log_every == 0 or step == steps:
      if logger is not None:
        logger.write(step, jax.device_get(metrics), show=show)
      if int(skipped) > max_bad_steps:
        raise DivergenceError(f"training diverged by step {step}: {int(skipped)} steps had a non-finite loss, "
                              f"gradient or update (at most {max_bad_steps} allowed); lower the learning rate")
  return params
