"""Hugging Face safetensors checkpoints (Qwen2ForCausalLM, LlamaForCausalLM) to and from k15 params.

Torch is not needed: tensors are read and written with `safetensors.flax`. Layer tensors are stacked
into the leading 'layers' axis of k15's scanned params.
"""
import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np

from k15.models import rope as rope_lib
from k15.models.config import ROPE_TYPES, ModelConfig, RopeScaling

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM")
_MAX_POSITIONS = 32768  # what an export of a model without rope scaling declares
_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model: names the file and tensor."""


def config_from_hf(hf: dict, path: str = "config.json", dtype: str = "float32") -> ModelConfig:
  archs = hf.get("architectures") or []
  if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
    raise CheckpointError(f"{path}: unsupported architecture {archs}; supported: {list(SUPPORTED_ARCHITECTURES)}")
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if hf.get("mlp_bias"):
    raise CheckpointError(f"{path}: mlp_bias=True is not supported")
  qwen = archs[0] == "Qwen2ForCausalLM"
  n_heads = hf["num_attention_heads"]
  return ModelConfig(
      vocab_size=hf["vocab_size"],
      d_model=hf["hidden_size"],
      n_layers=hf["num_hidden_layers"],
      n_heads=n_heads,
      n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
      d_ff=hf["intermediate_size"],
      rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
      rope_scaling=rope_scaling_from_hf(hf, rope, path),
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      qkv_bias=True if qwen else bool(hf.get("attention_bias", False)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      param_dtype=dtype,
      dtype=dtype,
  )


def rope_scaling_from_hf(hf: dict, rope: dict, path: str = "config.json"):
  """The RopeScaling of a config.json (None: plain rotary), its defaults filled as transformers fills them
  (`RotaryEmbeddingConfigMixin.standardize_rope_params`)."""
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return None
  if kind not in ROPE_TYPES:
    raise CheckpointError(f"{path}: rope scaling type {kind!r} is not supported; supported: "
                          f"{['default', *ROPE_TYPES]}")
  if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise CheckpointError(f"{path}: partial_rotary_factor != 1 is not supported")
  max_positions = hf.get("max_position_embeddings")
  # transformers: a top-level original_max_position_embeddings first, then the rope dict's, then max_position_embeddings
  original = hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or max_positions
  factor = rope.get("factor")
  if factor is None and kind == "yarn" and max_positions and original:  # yarn's factor may be implicit
    factor = max_positions / original
  if factor is None:
    raise CheckpointError(f"{path}: rope scaling {kind!r} has no factor")
  number = lambda key: None if rope.get(key) is None else float(rope[key])
  fields = dict(type=kind, factor=float(factor), max_position_embeddings=max_positions)
  if kind in ("yarn", "llama3"):
    fields["original_max_position_embeddings"] = original
  if kind == "llama3":
    fields.update(low_freq_factor=number("low_freq_factor"), high_freq_factor=number("high_freq_factor"))
  if kind == "yarn":
    attention = number("attention_factor")
    if attention is None and rope.get("mscale") and rope.get("mscale_all_dim"):
      attention = rope_lib.yarn_mscale(factor, rope["mscale"]) / rope_lib.yarn_mscale(factor, rope["mscale_all_dim"])
    fields.update(beta_fast=number("beta_fast"), beta_slow=number("beta_slow"), attention_factor=attention,
                  truncate=rope.get("truncate"))
  try:
    return RopeScaling(**fields)
  except ValueError as e:
    raise CheckpointError(f"{path}: rope scaling {rope}: {e}") from None


def rope_scaling_to_hf(scaling: RopeScaling) -> tuple:
  """(config.json's rope_scaling, its max_position_embeddings) of a RopeScaling; transformers reads both."""
  out = {"rope_type": scaling.type}
  out.update({k: v for k, v in dataclasses.asdict(scaling).items()
              if v is not None and k not in ("type", "max_position_embeddings")})
  max_positions = scaling.max_position_embeddings
  if max_positions is None:
    original = scaling.original_max_position_embeddings
    max_positions = int(original * scaling.factor) if original else _MAX_POSITIONS
  return out, max_positions


def config_to_hf(cfg: ModelConfig, architecture: str) -> dict:
  if architecture not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"unsupported architecture {architecture!r}; supported: {list(SUPPORTED_ARCHITECTURES)}")
  if architecture == "Qwen2ForCausalLM" and not cfg.qkv_bias:
    raise ValueError("Qwen2ForCausalLM always has qkv bias; use LlamaForCausalLM for qkv_bias=False")
  hf = {
      "architectures": [architecture],
      "model_type": "qwen2" if architecture == "Qwen2ForCausalLM" else "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim,
      "intermediate_size": cfg.d_ff,
      "rope_theta": cfg.rope_theta,
      "rms_norm_eps": cfg.rms_norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings,
      "hidden_act": "silu",
      "max_position_embeddings": _MAX_POSITIONS,
      "torch_dtype": cfg.param_dtype,
  }
  if architecture == "LlamaForCausalLM":
    hf["attention_bias"] = cfg.qkv_bias
  if cfg.rope_scaling is not None:
    hf["rope_scaling"], hf["max_position_embeddings"] = rope_scaling_to_hf(cfg.rope_scaling)
  return hf


def _tensor_map(cfg: ModelConfig):
  """(hf name, k15 path, hf->k15, k15->hf) for every tensor; '{i}' marks a per-layer tensor."""
  D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  T = lambda a: a.T
  heads_in = lambda n: (lambda w: w.T.reshape(D, n, H), lambda k: k.reshape(D, n * H).T)
  heads_bias = lambda n: (lambda b: b.reshape(n, H), lambda b: b.reshape(n * H))
  o_maps = (lambda w: w.T.reshape(N, H, D), lambda k: k.reshape(N * H, D).T)
  ident = (lambda a: a, lambda a: a)
  entries = [
      ("model.embed_tokens.weight", ("embed", "embedding"), *ident),
      ("model.norm.weight", ("final_norm", "scale"), *ident),
      ("model.layers.{i}.input_layernorm.weight", ("layers", "attn_norm", "scale"), *ident),
      ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"), *ident),
      ("model.layers.{i}.self_attn.q_proj.weight", ("layers", "attn", "q_kernel"), *heads_in(N)),
      ("model.layers.{i}.self_attn.k_proj.weight", ("layers", "attn", "k_kernel"), *heads_in(K)),
      ("model.layers.{i}.self_attn.v_proj.weight", ("layers", "attn", "v_kernel"), *heads_in(K)),
      ("model.layers.{i}.self_attn.o_proj.weight", ("layers", "attn", "o_kernel"), *o_maps),
      ("model.layers.{i}.mlp.gate_proj.weight", ("layers", "mlp", "gate", "kernel"), T, T),
      ("model.layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up", "kernel"), T, T),
      ("model.layers.{i}.mlp.down_proj.weight", ("layers", "mlp", "down", "kernel"), T, T),
  ]
  if cfg.qkv_bias:
    entries += [
        ("model.layers.{i}.self_attn.q_proj.bias", ("layers", "attn", "q_bias"), *heads_bias(N)),
        ("model.layers.{i}.self_attn.k_proj.bias", ("layers", "attn", "k_bias"), *heads_bias(K)),
        ("model.layers.{i}.self_attn.v_proj.bias", ("layers", "attn", "v_bias"), *heads_bias(K)),
    ]
  if not cfg.tie_embeddings:
    entries.append(("lm_head.weight", ("lm_head", "kernel"), T, T))
  return entries


def _hf_shapes(cfg: ModelConfig):
  D, N, K, H, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  return {
      "embed_tokens.weight": (V, D), "norm.weight": (D,), "input_layernorm.weight": (D,),
      "post_attention_layernorm.weight": (D,), "q_proj.weight": (N * H, D), "k_proj.weight": (K * H, D),
      "v_proj.weight": (K * H, D), "o_proj.weight": (D, N * H), "gate_proj.weight": (F, D),
      "up_proj.weight": (F, D), "down_proj.weight": (D, F), "q_proj.bias": (N * H,), "k_proj.bias": (K * H,),
      "v_proj.bias": (K * H,), "lm_head.weight": (V, D),
  }


def _expected_shape(cfg, name):
  shapes = _hf_shapes(cfg)
  for suffix, shape in shapes.items():
    if name.endswith(suffix):
      return shape
  raise KeyError(name)


def _set(tree: dict, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _tensor_files(path: str) -> dict:
  """Maps each tensor name to the safetensors file holding it."""
  index = os.path.join(path, _INDEX)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {name: os.path.join(path, fname) for name, fname in weight_map.items()}
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise CheckpointError(f"{path}: no *.safetensors files and no {_INDEX}")
  from safetensors import safe_open
  out = {}
  for fname in files:
    with safe_open(os.path.join(path, fname), framework="flax") as f:
      out.update({name: os.path.join(path, fname) for name in f.keys()})
  return out


def load_hf(path: str, dtype: str = "float32"):
  """Reads a Qwen2 / Llama HF checkpoint directory: returns (ModelConfig, params)."""
  from safetensors import safe_open
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise CheckpointError(f"{path}: no config.json")
  with open(config_path) as f:
    cfg = config_from_hf(json.load(f), config_path, dtype)
  files = _tensor_files(path)
  handles = {}

  def read(name):
    if name not in files:
      raise CheckpointError(f"{path}: missing tensor {name!r}")
    fname = files[name]
    if fname not in handles:
      handles[fname] = safe_open(fname, framework="flax")
    arr = handles[fname].get_tensor(name)
    expected = _expected_shape(cfg, name)
    if tuple(arr.shape) != expected:
      raise CheckpointError(f"{fname}: tensor {name!r} has shape {tuple(arr.shape)}, expected {expected} "
                            f"from config.json")
    return arr.astype(jnp.float32)

  params = {}
  for hf_name, k15_path, to_k15, _ in _tensor_map(cfg):
    if "{i}" in hf_name:
      value = jnp.stack([to_k15(read(hf_name.format(i=i))) for i in range(cfg.n_layers)])
    else:
      value = to_k15(read(hf_name))
    _set(params, k15_path, value.astype(cfg.jnp_param_dtype))
  return cfg, params


def save_hf(path: str, cfg: ModelConfig, params, architecture: str = None,
            max_shard_bytes: int = 5 * 2**30):
  """Writes config.json and safetensors files that `transformers` loads.

  Tensors are split into several files (with model.safetensors.index.json) beyond max_shard_bytes.
  """
  from safetensors.numpy import save_file
  architecture = architecture or ("Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM")
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg, architecture), f, indent=2)
  tensors = {}
  for hf_name, k15_path, _, to_hf in _tensor_map(cfg):
    value = _get(params, k15_path)
    if "{i}" in hf_name:
      for i in range(cfg.n_layers):
        tensors[hf_name.format(i=i)] = to_hf(value[i])
    else:
      tensors[hf_name] = to_hf(value)
  # float32 on disk: numpy has no bfloat16 for safetensors; transformers casts on load.
  tensors = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in tensors.items()}
  shards, current, size = [], {}, 0
  for name, arr in tensors.items():
    if current and size + arr.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = arr
    size += arr.nbytes
  shards.append(current)
  for stale in os.listdir(path):
    if stale.endswith(".safetensors") or stale == _INDEX:
      os.remove(os.path.join(path, stale))
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return
  weight_map = {}
  for n, shard in enumerate(shards, 1):
    fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
    weight_map.update({name: fname for name in shard})
  with open(os.path.join(path, _INDEX), "w") as f:
    json.dump({"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map},
              f, indent=2)


# Fields a checkpoint's config.json must agree on with the experiment's config.model; dtypes and remat are
# the run's choice.
_ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                        "rope_theta", "rope_scaling", "rms_norm_eps", "qkv_bias", "tie_embeddings")


def split_hf_path(model_fields) -> tuple:
  """config.model -> (ModelConfig, hf_path or None): hf_path, where the weights start, is not an architecture
  field, so it is taken out before ModelConfig.from_dict (which rejects unknown keys)."""
  fields = dict(model_fields)
  hf_path = fields.pop("hf_path", None) or None
  return ModelConfig.from_dict(fields), hf_path


def load_hf_matching(path: str, cfg: ModelConfig):
  """Params of the HF checkpoint at `path`, which must have cfg's architecture (a mismatch names the fields).

  Tensors are read into host (CPU) memory: one accelerator could not hold a 7B model's float32 copy.
  """
  import jax
  with jax.default_device(jax.local_devices(backend="cpu")[0]):  # this process's own CPU
    hf_cfg, params = load_hf(path, dtype=cfg.param_dtype)
  diff = [f"config.model.{f}={getattr(cfg, f)!r} but {path}/config.json has {getattr(hf_cfg, f)!r}"
          for f in _ARCHITECTURE_FIELDS if getattr(cfg, f) != getattr(hf_cfg, f)]
  if diff:
    raise CheckpointError("config.model.hf_path: the checkpoint does not match the config: " + "; ".join(diff))
  return params
