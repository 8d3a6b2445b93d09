"""The model's hyperparameters.

Shape letters used in names across k15 (nanodo style):
  B batch, T sequence (query) length, S cache length, D d_model, N query heads, K key/value heads,
  G query heads per kv head (N // K), H head_dim, F d_ff, V vocab, L layers.
"""
import dataclasses
from typing import Optional

import jax.numpy as jnp

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")  # rope scaling as transformers defines it (`k15.models.rope`)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rotary frequencies of a long-context checkpoint: HF's `rope_scaling` / `rope_parameters` (`k15.models.rope`).

  Fields left None take transformers' defaults.
  """
  type: str  # one of ROPE_TYPES
  factor: float  # how many times the trained context the frequencies stretch to
  original_max_position_embeddings: Optional[int] = None  # yarn, llama3: the context the model was trained at
  # HF's max_position_embeddings: for dynamic, the length beyond which the base grows; for the others only what an
  # export declares (None: original_max_position_embeddings * factor).
  max_position_embeddings: Optional[int] = None
  low_freq_factor: Optional[float] = None  # llama3: wavelengths above original / low_freq_factor are scaled
  high_freq_factor: Optional[float] = None  # llama3: wavelengths below original / high_freq_factor are kept
  beta_fast: Optional[float] = None  # yarn: rotations over the original context above which a dimension is kept (32)
  beta_slow: Optional[float] = None  # yarn: ... below which it is interpolated (1)
  attention_factor: Optional[float] = None  # yarn: scale of queries and keys (0.1 * ln(factor) + 1)
  truncate: Optional[bool] = None  # yarn: round the blend's ends to whole dimensions (True)

  def __post_init__(self):
    if self.type not in ROPE_TYPES:
      raise ValueError(f"rope_scaling.type must be one of {list(ROPE_TYPES)}, got {self.type!r}")
    if not self.factor >= 1.0:
      raise ValueError(f"rope_scaling.factor must be >= 1, got {self.factor}")
    needs = {"dynamic": ("max_position_embeddings",), "yarn": ("original_max_position_embeddings",),
             "llama3": ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor")}
    for name in needs.get(self.type, ()):
      if getattr(self, name) is None:
        raise ValueError(f"rope_scaling.{name} is required for type {self.type!r}")
    for name in ("original_max_position_embeddings", "max_position_embeddings"):
      if getattr(self, name) is not None and getattr(self, name) <= 0:
        raise ValueError(f"rope_scaling.{name} must be positive, got {getattr(self, name)}")
    if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
      raise ValueError(f"rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
                       f"low_freq_factor={self.low_freq_factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only transformer of the Llama / Qwen2 families."""
  vocab_size: int = 1024
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 8
  n_kv_heads: int = 4  # grouped-query attention; must divide n_heads
  head_dim: int = 32  # explicit: Qwen2 and Llama allow head_dim != d_model // n_heads
  d_ff: int = 1024  # SwiGLU hidden width
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = None  # None: plain rotary embeddings
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = False  # Qwen2: True, Llama: False
  tie_embeddings: bool = False  # logits = h @ embed.T when True
  param_dtype: str = "float32"  # "float32" or "bfloat16"
  dtype: str = "float32"  # compute dtype; logits are always float32
  remat: bool = False  # rematerialize each layer in the backward pass
  # Full passes (training, reference log-probs): "dense" (T x T scores), "blockwise" (flash-style, no T x T
  # matrix), "splash" (Pallas, TPU), "auto" (splash on TPU; else dense up to attention_block tokens, blockwise beyond).
  attention: str = "auto"
  attention_block: int = 512  # query and key block of blockwise and splash attention
  logprob_chunk: int = 1024  # log-probs from the logits of this many positions at a time (0: all at once)

  def __post_init__(self):
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):  # a config dict, JSON
      fields = dict(self.rope_scaling)
      known = {f.name for f in dataclasses.fields(RopeScaling)}
      unknown = sorted(set(fields) - known)
      if unknown:
        raise ValueError(f"unknown rope_scaling field(s) {unknown}; known fields: {sorted(known)}")
      object.__setattr__(self, "rope_scaling", RopeScaling(**fields))
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for rotary embeddings")
    if self.attention not in ("auto", "dense", "blockwise", "splash"):
      raise ValueError(f"ModelConfig.attention must be 'auto', 'dense', 'blockwise' or 'splash', got {self.attention!r}")
    if self.attention_block <= 0 or self.logprob_chunk < 0:
      raise ValueError(f"ModelConfig.attention_block must be positive and logprob_chunk >= 0, got "
                       f"{self.attention_block} and {self.logprob_chunk}")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in ("float32", "bfloat16"):
        raise ValueError(f"ModelConfig.{name} must be 'float32' or 'bfloat16', got {getattr(self, name)!r}")

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @classmethod
  def from_dict(cls, d) -> "ModelConfig":
    """Builds a config from a mapping (e.g. an ml_collections ConfigDict); unknown keys are an error."""
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
    return cls(**d)

  def num_params(self) -> int:
    """Parameter count, computed from the shapes (used by planning and FLOP estimates)."""
    D, N, K, H, F, V, L = (self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff,
                           self.vocab_size, self.n_layers)
    attn = D * N * H + 2 * D * K * H + N * H * D + (N * H + 2 * K * H if self.qkv_bias else 0)
    per_layer = attn + 3 * D * F + 2 * D
    return L * per_layer + V * D * (1 if self.tie_embeddings else 2) + D
