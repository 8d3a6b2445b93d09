"""Decoder-only transformer (Llama / Qwen2 families) as pure functions over param pytrees."""
from k15.models.config import ModelConfig
from k15.models.model import (abstract_params, forward, forward_with_cache, init_params, logprobs_of,
                              param_logical_axes, token_logprobs)
from k15.models.transformer import KV_CACHE_LOGICAL_AXES, KVCache
from k15.models.hf import load_hf, load_hf_matching, save_hf, split_hf_path
