"""HF checkpoints: load_hf + forward match transformers; save_hf round-trips; bad checkpoints fail clearly."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from k15 import models  # noqa: E402
from k15.models.hf import CheckpointError  # noqa: E402

VOCAB = 101


def _randomize(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.1)  # HF zero-inits biases and ones-inits norms: randomize so every tensor matters
  return model.eval()


def tiny_qwen2(path, seed=0, max_shard_size=None):
  cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=True,
                                 rope_theta=10000.0, rms_norm_eps=1e-6)
  model = _randomize(transformers.Qwen2ForCausalLM(cfg), seed)
  kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(path, **kwargs)
  return model


def tiny_llama(path, seed=1):
  cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                                 num_key_value_heads=3, head_dim=16, intermediate_size=80,
                                 tie_word_embeddings=False, rope_theta=500000.0, attention_bias=False,
                                 rms_norm_eps=1e-5)
  model = _randomize(transformers.LlamaForCausalLM(cfg), seed)
  model.save_pretrained(path)
  return model


def _tokens(batch=3, length=17):
  return np.random.RandomState(0).randint(0, VOCAB, (batch, length))


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("builder,kwargs", [(tiny_qwen2, {}), (tiny_qwen2, {"max_shard_size": "40KB"}),
                                            (tiny_llama, {})])
def test_load_hf_matches_transformers(tmp_path, builder, kwargs):
  model = builder(str(tmp_path), **kwargs)
  if kwargs:  # the sharded variant really is several files with an index
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
  cfg, params = models.load_hf(str(tmp_path))
  assert cfg.qkv_bias == (builder is tiny_qwen2) and cfg.tie_embeddings == (builder is tiny_qwen2)
  tokens = _tokens()
  ours = models.forward(cfg, params, jnp.asarray(tokens))
  assert ours.dtype == jnp.float32
  np.testing.assert_allclose(ours, _hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_token_logprobs_matches_transformers(tmp_path):
  model = tiny_llama(str(tmp_path))
  cfg, params = models.load_hf(str(tmp_path))
  tokens = _tokens()
  logp = torch.log_softmax(torch.tensor(_hf_logits(model, tokens)), -1)[:, :-1]
  expected = torch.gather(logp, -1, torch.tensor(tokens)[:, 1:, None])[..., 0].numpy()
  np.testing.assert_allclose(models.token_logprobs(cfg, params, jnp.asarray(tokens)), expected, atol=1e-4)


@pytest.mark.parametrize("builder", [tiny_qwen2, tiny_llama])
def test_save_hf_round_trips_through_transformers(tmp_path, builder):
  model = builder(str(tmp_path / "src"))
  cfg, params = models.load_hf(str(tmp_path / "src"))
  models.save_hf(str(tmp_path / "out"), cfg, params, max_shard_bytes=60_000)
  assert os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  tokens = _tokens()
  np.testing.assert_allclose(_hf_logits(reloaded, tokens), _hf_logits(model, tokens), atol=1e-5)
  cfg2, params2 = models.load_hf(str(tmp_path / "out"))
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(a, b)


def test_bfloat16_load(tmp_path):
  model = tiny_qwen2(str(tmp_path))
  cfg, params = models.load_hf(str(tmp_path), dtype="bfloat16")
  assert params["embed"]["embedding"].dtype == jnp.bfloat16
  ours = models.forward(cfg, params, jnp.asarray(_tokens()))
  assert ours.dtype == jnp.float32
  np.testing.assert_allclose(ours, _hf_logits(model, _tokens()), atol=0.1)


def test_unsupported_architecture(tmp_path):
  tiny_qwen2(str(tmp_path))
  with open(tmp_path / "config.json") as f:
    config = json.load(f)
  config["architectures"] = ["MistralForCausalLM"]
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(CheckpointError, match="unsupported architecture.*MistralForCausalLM"):
    models.load_hf(str(tmp_path))


def test_mis_shaped_tensor_is_named(tmp_path):
  from safetensors.numpy import load_file, save_file
  tiny_qwen2(str(tmp_path))
  tensors = load_file(str(tmp_path / "model.safetensors"))
  name = "model.layers.1.mlp.up_proj.weight"
  tensors[name] = tensors[name][:-1]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"up_proj.weight.*shape \(95, 64\), expected \(96, 64\)"):
    models.load_hf(str(tmp_path))


def test_missing_tensor_is_named(tmp_path):
  from safetensors.numpy import load_file, save_file
  tiny_qwen2(str(tmp_path))
  tensors = load_file(str(tmp_path / "model.safetensors"))
  del tensors["model.layers.0.self_attn.k_proj.bias"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match="missing tensor 'model.layers.0.self_attn.k_proj.bias'"):
    models.load_hf(str(tmp_path))
