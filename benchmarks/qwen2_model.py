"""The benchmarks' model: a random Qwen2-style transformers model, saved where k15 and the peers load it from.

Imports no k15, so a benchmark's child process can build it beside another commit's k15
(benchmarks/vs_commit.py).
"""


def save(path, quick):
  """A random Qwen2-style model (qkv bias, GQA, tied embeddings), seeded, saved at `path` with save_pretrained and
  returned (torch, eval mode). quick: a small one."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  size = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=256) if quick else \
      dict(hidden_size=256, num_hidden_layers=4, intermediate_size=1024, vocab_size=1024)
  cfg = transformers.Qwen2Config(num_attention_heads=8, num_key_value_heads=4, head_dim=32, tie_word_embeddings=True,
                                 rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=4096, **size)
  model = transformers.Qwen2ForCausalLM(cfg).eval()
  model.save_pretrained(path)
  return model
