"""Rotary position embeddings: the frequencies of every rope type, computed here only.

The model's full and paged passes (`transformer.rotary`) take their cos and sin from `rotary_cos_sin`. Each scaling
type (`ModelConfig.rope_scaling`) is transformers' (`modeling_rope_utils._compute_*_parameters`), in float32 as it
computes them:
- linear: every inverse frequency divided by `factor`.
- llama3: low frequencies (wavelengths beyond original / low_freq_factor) divided by `factor`, high ones kept, a
  smooth blend between.
- yarn: per dimension, a blend of the original and the interpolated (/ factor) frequency, and an attention factor
  by which cos and sin are multiplied: queries and keys are scaled alike, attention logits by its square.
- dynamic (NTK-aware): the base grows with the sequence length L beyond max_position_embeddings (M):
  theta * (factor * L / M - (factor - 1)) ** (H / (H - 2)).
Only dynamic depends on the sequence length; only yarn scales attention.

Dynamic and the KV cache. transformers recomputes a dynamic model's frequencies from the largest position of each
forward call (over the whole batch), and its generate never re-rotates a cached key: the token decoded at position p
of a single sequence has its query and key rotated with the frequencies of length p + 1. k15 applies that rule to
every token, in the full pass and in the paged passes alike: the token at position p uses length p + 1, whatever
else shares its call. So the sampler's cache, its log-probs, a resumed trajectory's re-encoded prefix and the
training pass all agree, and k15 equals transformers' generate of one sequence whose prompt fits in M. Beyond M,
these results of transformers differ from k15's: an uncached forward over T > M tokens (it rotates every token with
length T), generate from a prompt longer than M (its prompt keys use the prompt's length), and batched generate
over prompts of different lengths (a row uses the batch's largest position).
"""
import math

import jax
import jax.numpy as jnp

from k15.models.config import ModelConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's attention scale for a context stretched `factor` times (transformers' get_mscale)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def attention_factor(cfg: ModelConfig) -> float:
  """The factor cos and sin are multiplied by (yarn; 1 for the other types)."""
  s = cfg.rope_scaling
  if s is None or s.type != "yarn":
    return 1.0
  return s.attention_factor if s.attention_factor is not None else yarn_mscale(s.factor)


def inverse_frequencies(cfg: ModelConfig, seq_len=None) -> jax.Array:
  """float32 [..., H/2]: each pair of dimensions' rotation per position. `seq_len` (lengths of any shape, which
  lead the result's shape) is read by 'dynamic' only, which needs it."""
  H, theta, s = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
  exponents = jnp.arange(0, H, 2, dtype=jnp.float32) / H
  inv_freq = 1.0 / (theta ** exponents)
  if s is None:
    return inv_freq
  if s.type == "linear":
    return inv_freq / s.factor
  if s.type == "dynamic":
    if seq_len is None:
      raise ValueError("rope_scaling type 'dynamic': the frequencies depend on the sequence length; give seq_len")
    M = s.max_position_embeddings
    length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), M)
    base = theta * ((s.factor * length / M) - (s.factor - 1)) ** (H / (H - 2))
    return 1.0 / (base[..., None] ** exponents)
  if s.type == "llama3":
    context = s.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > context / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    smooth = (context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= context / s.high_freq_factor) & (wavelen <= context / s.low_freq_factor)
    return jnp.where(medium, smoothed, scaled)
  if s.type == "yarn":
    context = s.original_max_position_embeddings
    beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1

    def dimension_of(rotations):  # the dimension that turns `rotations` times over the original context
      return H * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension_of(beta_fast), dimension_of(beta_slow)
    if s.truncate is None or s.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, H - 1)
    if low == high:
      high += 0.001  # transformers' guard against a zero-width ramp
    ramp = jnp.clip((jnp.arange(H // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # share of the original (extrapolated) frequency
    pos_freqs = theta ** exponents
    return (1.0 / (s.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
  raise ValueError(f"rope_scaling type {s.type!r} has no frequencies")


def rotary_cos_sin(cfg: ModelConfig, positions_BxT):
  """(cos, sin), float32 BxTx(H/2), of each position's rotation angles, times the attention factor."""
  inv_freq = inverse_frequencies(cfg, positions_BxT + 1)  # the length at a token is its position + 1 (dynamic)
  angles_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq
  scale = attention_factor(cfg)
  return jnp.cos(angles_BxTxH2) * scale, jnp.sin(angles_BxTxH2) * scale
