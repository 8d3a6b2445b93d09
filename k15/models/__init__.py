"""Decoder-only transformer (Llama / Qwen2 families) as pure functions over param pytrees."""
from k15.models.config import ModelConfig, RopeScaling
from k15.models.attention import KV_PAGES_LOGICAL_AXES
from k15.models.model import (abstract_params, forward, forward_paged, hidden_states, init_params, kv_pages_shape,
                              logprobs_of, param_logical_axes, token_logprobs, unstack_layers)
from k15.models.transformer import PagedCache
from k15.models.hf import load_hf, load_hf_matching, save_hf, split_hf_path
