"""Model merging for long2short (report 2.4): a weighted average of a long-CoT and a short-CoT checkpoint."""
import dataclasses

import jax
import jax.numpy as jnp


def merge_params(params_a, params_b, weights=(0.5, 0.5)):
  """w_a * params_a + w_b * params_b, leaf by leaf, with the structure and dtypes of params_a.

  The weights must be non-negative and sum to 1 (no silent renormalization: a typo in a config should fail).
  The average is computed in float32 and cast back, so bfloat16 checkpoints merge without extra rounding.
  Trees must match exactly: same paths, and every leaf the same shape and dtype; the error names the leaf.
  """
  w_a, w_b = (float(w) for w in weights)
  if w_a < 0 or w_b < 0 or abs(w_a + w_b - 1.0) > 1e-6:
    raise ValueError(f"merge weights must be non-negative and sum to 1, got {tuple(weights)}")
  leaves_a, treedef_a = jax.tree_util.tree_flatten_with_path(params_a)
  leaves_b, treedef_b = jax.tree_util.tree_flatten_with_path(params_b)
  paths_a = [jax.tree_util.keystr(p) for p, _ in leaves_a]
  paths_b = [jax.tree_util.keystr(p) for p, _ in leaves_b]
  if treedef_a != treedef_b:
    only_a = ", ".join(sorted(set(paths_a) - set(paths_b))) or "none"
    only_b = ", ".join(sorted(set(paths_b) - set(paths_a))) or "none"
    raise ValueError(f"param trees differ: only in a: {only_a}; only in b: {only_b} (tree a {treedef_a}, "
                     f"tree b {treedef_b})")
  merged = []
  for path, (_, a), (_, b) in zip(paths_a, leaves_a, leaves_b):
    if a.shape != b.shape or a.dtype != b.dtype:
      raise ValueError(f"param {path}: a is {a.dtype}{list(a.shape)} but b is {b.dtype}{list(b.shape)}")
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"param {path}: cannot average a {a.dtype} leaf")
    merged.append((w_a * jnp.asarray(a, jnp.float32) + w_b * jnp.asarray(b, jnp.float32)).astype(a.dtype))
  return jax.tree_util.tree_unflatten(treedef_a, merged)


def merge_checkpoints(path_a: str, path_b: str, out_path: str, weights=(0.5, 0.5)):
  """Merges two HF checkpoint directories of the same architecture into out_path; returns (cfg, params).

  Both config.json files must describe the same model (every ModelConfig field); the error names the fields.
  """
  from k15 import models  # safetensors and the model only here: merge_params works on any pytree
  cfg_a, params_a = models.load_hf(path_a)
  cfg_b, params_b = models.load_hf(path_b)
  if cfg_a != cfg_b:
    diff = {f.name: (getattr(cfg_a, f.name), getattr(cfg_b, f.name)) for f in dataclasses.fields(cfg_a)
            if getattr(cfg_a, f.name) != getattr(cfg_b, f.name)}
    raise ValueError(f"cannot merge {path_a} and {path_b}: different architectures, (a, b) per field: {diff}")
  merged = merge_params(params_a, params_b, weights)
  models.save_hf(out_path, cfg_a, merged)
  return cfg_a, merged
