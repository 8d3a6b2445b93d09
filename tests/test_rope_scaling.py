"""Rope scaling of long-context checkpoints against transformers: the full pass, the sampler's paged passes, export.

Each tiny random model has max_position_embeddings (or original_max_position_embeddings) 32 and runs to 80 positions,
where every scaling type changes the logits. config.json files are written as the Hub's long-context checkpoints
write them (Qwen2.5: {"type": "yarn", ...}; Llama-3.1: {"rope_type": "llama3", ...}; a top-level rope_theta).
transformers keeps a dynamic model's frequencies from one call to the next, so every reference is a freshly loaded
model.
"""
import dataclasses
import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from k15 import config as config_lib  # noqa: E402
from k15 import models, sampling  # noqa: E402
from k15.models.hf import CheckpointError  # noqa: E402

VOCAB, CONTEXT, LENGTH = 101, 32, 80
ROPE = {  # type -> (max_position_embeddings, config.json's rope_scaling)
    "linear": (CONTEXT, {"type": "linear", "factor": 4.0}),
    "dynamic": (CONTEXT, {"type": "dynamic", "factor": 4.0}),
    "yarn": (CONTEXT, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": CONTEXT}),
    "llama3": (4 * CONTEXT, {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": CONTEXT}),
}
ARCHS = ("qwen2", "llama")


def _write_checkpoint(path, arch, kind, rope=None):
  """A random tiny model saved by transformers, its config.json rewritten with `rope` (default: ROPE[kind])."""
  max_positions, default_rope = ROPE[kind]
  common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, max_position_embeddings=max_positions)
  if arch == "qwen2":
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(tie_word_embeddings=True, **common))
  else:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(head_dim=16, rope_theta=500000.0, **common))
  torch.manual_seed(ARCHS.index(arch))
  with torch.no_grad():
    for name, p in model.named_parameters():
      # Norm scales around 1 and large weights: greedy decoding stays varied, and rope scaling moves the logits.
      p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.15)
  model.save_pretrained(path)
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  theta = config.pop("rope_parameters")["rope_theta"]
  config.update(rope_theta=theta, rope_scaling=dict(rope or default_rope))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """(arch, kind) -> a checkpoint directory, written once."""
  paths = {}

  def get(arch, kind):
    if (arch, kind) not in paths:
      paths[arch, kind] = _write_checkpoint(str(tmp_path_factory.mktemp(f"{arch}_{kind}")), arch, kind)
    return paths[arch, kind]
  return get


def _hf(path):
  return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _hf_logits(path, tokens):
  with torch.no_grad():
    return _hf(path)(torch.tensor(tokens)).logits.numpy()


def _tokens(batch=2, length=LENGTH):
  return np.random.RandomState(0).randint(0, VOCAB, (batch, length))


def _unscaled_logits(cfg, params, tokens):
  return np.asarray(models.forward(dataclasses.replace(cfg, rope_scaling=None), params, jnp.asarray(tokens)))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["linear", "yarn", "llama3"])
def test_forward_matches_transformers_beyond_the_original_context(checkpoint, arch, kind):
  path = checkpoint(arch, kind)
  cfg, params = models.load_hf(path)
  assert cfg.rope_scaling.type == kind
  tokens = _tokens()
  expected = _hf_logits(path, tokens)
  np.testing.assert_allclose(models.forward(cfg, params, jnp.asarray(tokens)), expected, atol=1e-4, rtol=0)
  assert np.abs(_unscaled_logits(cfg, params, tokens) - expected).max() > 0.1  # the scaling matters here


def _generate(path, prompt, new_tokens):
  """transformers' greedy generate: (the sequence, the logits of each new token)."""
  with torch.no_grad():
    ids = torch.tensor([prompt])
    out = _hf(path).generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
  return out.sequences[0].numpy(), torch.stack(out.logits, 1)[0].numpy()


@pytest.mark.parametrize("arch,kind", [("qwen2", k) for k in ROPE] + [("llama", "dynamic")])
def test_sampler_and_full_pass_match_transformers_generate(checkpoint, arch, kind):
  """k15's sampler (paged prefill over several pages, chunked decode) reproduces transformers' greedy generate
  beyond the original context, and the full pass gives generate's logits at every new token. For dynamic the
  prompt fits in max_position_embeddings, the regime where k15 and transformers' cache agree (`k15.models.rope`)."""
  path = checkpoint(arch, kind)
  cfg, params = models.load_hf(path)
  P = 24 if kind == "dynamic" else 40
  prompt = _tokens(1, P)[0].tolist()
  sequence, logits = _generate(path, prompt, LENGTH - P)
  assert len(set(sequence[P:].tolist())) >= 6, "degenerate reference: the test would prove little"
  ours = np.asarray(models.forward(cfg, params, jnp.asarray(sequence[None, :-1])))[0, P - 1:]
  np.testing.assert_allclose(ours, logits, atol=1e-4, rtol=0)
  assert np.abs(_unscaled_logits(cfg, params, sequence[None, :-1])[0, P - 1:] - logits).max() > 0.1
  if kind == "dynamic":  # the documented difference: transformers' uncached forward rotates every token with length T
    assert np.abs(_hf_logits(path, sequence[None, :-1])[0, P - 1:] - logits).max() > 0.1

  scfg = sampling.SamplingConfig(greedy=True, max_new_tokens=LENGTH - P, chunk_size=7, max_length=LENGTH,
                                 page_size=8)
  traj, = sampling.generate(cfg, params, [prompt], scfg, jax.random.key(0), num_slots=2)
  np.testing.assert_array_equal(traj.response_tokens, sequence[P:])
  expected_logp = torch.log_softmax(torch.tensor(logits), -1).numpy()[np.arange(LENGTH - P), sequence[P:]]
  np.testing.assert_allclose(traj.logprobs, expected_logp, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_dynamic_forward_within_the_context_matches_transformers(checkpoint, arch):
  path = checkpoint(arch, "dynamic")
  cfg, params = models.load_hf(path)
  tokens = _tokens(length=CONTEXT)
  np.testing.assert_allclose(models.forward(cfg, params, jnp.asarray(tokens)), _hf_logits(path, tokens), atol=1e-4,
                             rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", list(ROPE))
def test_save_hf_round_trips(checkpoint, tmp_path, arch, kind):
  path = checkpoint(arch, kind)
  cfg, params = models.load_hf(path)
  models.save_hf(str(tmp_path), cfg, params)
  with open(os.path.join(path, "config.json")) as f, open(tmp_path / "config.json") as g:
    source, exported = json.load(f), json.load(g)
  assert exported["max_position_embeddings"] == source["max_position_embeddings"]
  tokens = _tokens()
  np.testing.assert_allclose(_hf_logits(str(tmp_path), tokens), _hf_logits(path, tokens), atol=1e-5, rtol=0)
  assert models.load_hf(str(tmp_path))[0] == cfg


def test_rope_scaling_defaults_and_derived_values(tmp_path):
  """As transformers fills them: yarn's implicit factor and original context, its attention factor from mscale."""
  path = _write_checkpoint(str(tmp_path), "qwen2", "yarn", {"rope_type": "yarn", "factor": None, "mscale": 0.7,
                                                             "mscale_all_dim": 1.0, "beta_fast": 16})
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  config.update(max_position_embeddings=4 * CONTEXT, original_max_position_embeddings=CONTEXT)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  cfg, params = models.load_hf(path)
  scaling = cfg.rope_scaling
  assert (scaling.factor, scaling.original_max_position_embeddings, scaling.beta_fast) == (4.0, CONTEXT, 16.0)
  assert scaling.attention_factor == pytest.approx((0.07 * np.log(4) + 1) / (0.1 * np.log(4) + 1))
  tokens = _tokens()
  np.testing.assert_allclose(models.forward(cfg, params, jnp.asarray(tokens)), _hf_logits(path, tokens), atol=1e-4,
                             rtol=0)


@pytest.mark.parametrize("rope,message", [
    ({"rope_type": "longrope", "factor": 4.0}, "rope scaling type 'longrope' is not supported"),
    ({"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0}, "rope_scaling.high_freq_factor is required"),
    ({"type": "linear"}, "rope scaling 'linear' has no factor"),
])
def test_bad_rope_scaling_names_the_file(tmp_path, rope, message):
  path = str(tmp_path)
  _write_checkpoint(path, "llama", "linear", rope)
  with pytest.raises(CheckpointError, match=re.escape(f"{path}/config.json: ") + f".*{message}"):
    models.load_hf(path)


def test_rope_scaling_in_an_experiment_config(checkpoint):
  """config.model.rope_scaling is typed and checked (errors name the key) and must match an hf_path checkpoint."""
  from experiments.configs import arith  # pylint: disable=g-import-not-at-top
  config = arith.get_config("smoke")
  config.model.rope_scaling = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
  assert config_lib.from_config_dict(config).model.rope_scaling == models.RopeScaling(
      "yarn", 4.0, original_max_position_embeddings=64)
  config.model.rope_scaling.type = "ntk"
  with pytest.raises(config_lib.ConfigError, match=r"config.model.rope_scaling: rope_scaling.type must be one of"):
    config_lib.from_config_dict(config)
  path = checkpoint("llama", "linear")
  cfg, _ = models.load_hf(path)
  with pytest.raises(CheckpointError, match=r"config.model.rope_scaling=None but .*config.json has RopeScaling"):
    models.load_hf_matching(path, dataclasses.replace(cfg, rope_scaling=None))


def test_native_plug_in_falls_back_for_scaled_rope(caplog):
  """kernels.cc computes plain rotary angles: for a scaled config the sampler takes the model's passes, and says so."""
  from k15.sampling import native  # pylint: disable=g-import-not-at-top
  native.backend._warn_once.cache_clear()  # pylint: disable=protected-access
  cfg = models.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=32,
                           rope_scaling=models.RopeScaling("linear", 2.0))
  with caplog.at_level(logging.WARNING):
    assert sampling.load_backend("k15.sampling.native", cfg, jax.devices()) == sampling.ModelBackend()
  assert "native CPU kernels are unavailable: it computes plain rotary embeddings, not rope scaling 'linear'" in (
      caplog.text)
  with pytest.raises(ValueError, match="not rope scaling 'linear'"):
    native.make_backend(cfg, jax.devices(), required=True)
