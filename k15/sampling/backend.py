"""Where the sampler's device computations come from: the model's own paged passes, or a plug-in.

A backend is a hashable object (a static argument of the jitted sampling functions) with three methods:
  prepare(cfg, params) -> weights: what prefill and step read, built once per rollout run from the params (a
    backend that splits over a mesh also has `weights_like(cfg, tree)`, the weights' tree from one shaped like the
    params: the engine lays the weights out by the rules through it);
  prefill(cfg, scfg, weights, kv, tokens_RxT, positions_RxT, table_RxM) -> kv: rows' keys and values into the cache;
  step(cfg, scfg, weights, kv, tokens_B, positions_B, table_BxM) -> (logits_BxV, LogitStats, kv): one decode step.
and one attribute, `splits_over_mesh`: whether it runs as one SPMD program over a mesh whose tensor axes split
the weights (else it needs the weights replicated, and each device decodes its slots in a loop of its own).
The cache is `k15.models.attention`'s paged layout; the host's page table says which pages each row reads.
"""
import dataclasses
import importlib
from typing import Callable, Optional

import jax
from absl import logging

from k15 import models
from k15.sampling.select import logit_stats


@dataclasses.dataclass(frozen=True)
class ModelBackend:
  """The model's paged passes (`k15.models.forward_paged`): any platform; the Pallas kernel's attention on TPU.

  attention: a plug-in's paged attention (a function with `k15.models.attention.paged_attention_xla`'s contract)
  in place of the one `SamplingConfig.attention` names. scan_layers: the passes loop over the params' layer stack;
  by default each layer's weights are arrays of their own (`models.unstack_layers`), which the passes read in
  place, where a loop over the stack copies each layer's slice of every weight in every step (on CPU the decode
  step took 1.13-1.22x the time with the loop; compile time grows with depth instead: docs/sampler.md).
  """
  attention: Optional[Callable] = None
  scan_layers: bool = False
  splits_over_mesh = True

  def weights_like(self, cfg, tree):
    return tree if self.scan_layers else models.unstack_layers(cfg, tree)

  def prepare(self, cfg, params):
    """The params in the compute dtype (the passes cast every weight to it; decode reads half the bytes of float32
    params in bfloat16), each layer's apart unless `scan_layers`."""
    return self.weights_like(cfg, jax.tree.map(lambda x: x.astype(cfg.jnp_dtype), params))

  def _paged(self, cfg, scfg, params, kv, tokens_RxT, positions_RxT, table_RxM, logits):
    return models.forward_paged(cfg, params, tokens_RxT, positions_RxT, models.PagedCache(kv, table_RxM),
                                logits=logits, impl=self.attention or scfg.attention,
                                pages_per_block=scfg.attention_block, unstacked=not self.scan_layers)

  def prefill(self, cfg, scfg, params, kv, tokens_RxT, positions_RxT, table_RxM):
    return self._paged(cfg, scfg, params, kv, tokens_RxT, positions_RxT, table_RxM, logits=False)[1].kv_LxPxZxCxH

  def step(self, cfg, scfg, params, kv, tokens_B, positions_B, table_BxM):
    logits, cache = self._paged(cfg, scfg, params, kv, tokens_B[:, None], positions_B[:, None], table_BxM, logits=True)
    logits_BxV = logits[:, 0]
    return logits_BxV, logit_stats(logits_BxV), cache.kv_LxPxZxCxH


def load_backend(name: str, cfg: models.ModelConfig, devices, options=None):
  """The backend `name` names: "model" (`ModelBackend`), or the module path of a plug-in whose
  `make_backend(cfg, devices, **options)` returns one, or None where it cannot run on `devices` (then the
  model's)."""
  if name == "model":  # a plug-in's options left in a config switched to "model" are not its: named, ignored
    options = dict(options or {})
    others = sorted(set(options) - {"scan_layers"})
    if others:
      logging.warning("sampling backend 'model' takes backend_options 'scan_layers' only; ignoring %s", others)
    return ModelBackend(scan_layers=bool(options.get("scan_layers", False)))
  try:
    module = importlib.import_module(name)
  except ImportError as e:
    raise ValueError(f"sampling backend {name!r}: not 'model' and not an importable plug-in module ({e})") from e
  return module.make_backend(cfg, list(devices), **dict(options or {})) or ModelBackend()
