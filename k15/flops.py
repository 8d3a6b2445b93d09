"""FLOPs of the model from its shapes, for planning and benchmarks. A multiply-add counts 2, as computed.

Per token the matmuls cost 2 * M, M the matmul weights (`matmul_weights`); attention over c positions costs
4 * L * N * H * c (q.k and p.v), where c is the whole sequence for a full pass (the causal mask skips no work) and
the whole cache capacity for a decode step. Parameter counts are ModelConfig.num_params().
"""
from k15.models import ModelConfig


def matmul_weights(cfg: ModelConfig) -> int:
  """M: the params a token meets in matmuls: every param but the norms, the q/k/v biases and an untied
  embedding table (a lookup; the logits projection is counted once either way)."""
  D, L = cfg.d_model, cfg.n_layers
  biases = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim if cfg.qkv_bias else 0
  lookup = 0 if cfg.tie_embeddings else cfg.vocab_size * D
  return cfg.num_params() - L * (2 * D + biases) - D - lookup


def attention_flops(cfg: ModelConfig, context: int) -> int:
  """One token's attention over `context` positions, all layers."""
  return 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * context


def token_flops(cfg: ModelConfig, context: int) -> int:
  """One token through the model (a decode step's row) with `context` positions to attend over."""
  return 2 * matmul_weights(cfg) + attention_flops(cfg, context)


def forward_flops(cfg: ModelConfig, length: int) -> int:
  """One forward pass over a sequence of `length` tokens (attention scores for all length^2 pairs)."""
  return length * token_flops(cfg, length)
