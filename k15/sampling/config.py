"""How tokens are drawn and when a trajectory stops."""
import dataclasses
from typing import Tuple


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Sampling hyperparameters; hashable, so it is a static argument of the jitted loops.

  Ends of a trajectory: a stop id ("eos"), a repeated n-gram ("repeat"), a length cap ("max_length":
  the response reached max_new_tokens or prompt + response filled max_length), or the per-iteration
  token budget of `RolloutEngine.run` ("budget"; such partials go to the replay buffer).
  """
  temperature: float = 1.0  # logits are divided by this before top-k / top-p; ignored when greedy
  top_p: float = 1.0  # nucleus: keep the smallest set of tokens with this much mass; 1.0 = off
  top_k: int = 0  # keep the k most likely tokens; 0 = off
  greedy: bool = False  # argmax decoding; temperature, top_p and top_k are ignored
  max_new_tokens: int = 256  # cap on the response tokens of one trajectory, over all iterations
  chunk_size: int = 64  # decode steps per dispatch (one jitted while_loop); slots are refilled between chunks
  stop_ids: Tuple[int, ...] = ()  # token ids that end a trajectory (EOS, end-of-turn); the stop token is kept
  repeat_ngram: int = 0  # n-gram size of repeat detection; 0 = off
  repeat_count: int = 4  # stop once the newest n-gram has occurred this many times in the response
  max_length: int = 1024  # KV-cache length: prompt + response tokens of one trajectory
  attn_bucket: int = 64  # the cache holds the longest sequence + a chunk rounded up to this (one compile per size)
  # The decode step: "native" (k15.sampling.native: C++ for CPU, float32), "xla" (k15.sampling.step: any
  # backend), or "auto" (native where it can run: CPU, float32, a C++ compiler; else xla).
  decode_kernel: str = "auto"
  # The native step's (and prefill's) matmuls: "float32" (float32 FMAs; prefill's in XLA), "bf16x6" (AMX tiles: each
  # operand as 3 bfloat16 pieces, 6 products: float32's accuracy), "int8x9" (AMX int8 tiles: 3 slices of each weight
  # under a scale per column, 4 of each activation row, 9 products: float32's accuracy relative to each weight
  # column's largest value; faster), "bf16x3" (2 pieces, 3
  # products: 16 bits of each operand, log-probs within ~1e-3; faster), or "auto" (int8x9 on a CPU with AMX, else
  # float32). See k15/sampling/native/kernels.cc.
  native_matmul: str = "auto"

  def __post_init__(self):
    object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
    if not self.greedy and self.temperature <= 0:
      raise ValueError(f"SamplingConfig.temperature must be > 0 (or greedy=True), got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
    for name in ("top_k", "repeat_ngram"):
      if getattr(self, name) < 0:
        raise ValueError(f"SamplingConfig.{name} must be >= 0, got {getattr(self, name)}")
    for name in ("max_new_tokens", "chunk_size", "max_length", "attn_bucket", "repeat_count"):
      if getattr(self, name) <= 0:
        raise ValueError(f"SamplingConfig.{name} must be positive, got {getattr(self, name)}")
    if self.decode_kernel not in ("auto", "native", "xla"):
      raise ValueError(f"SamplingConfig.decode_kernel must be 'auto', 'native' or 'xla', got {self.decode_kernel!r}")
    if self.native_matmul not in ("auto", "float32", "bf16x3", "bf16x6", "int8x9"):
      raise ValueError("SamplingConfig.native_matmul must be 'auto', 'float32', 'bf16x3', 'bf16x6' or 'int8x9', "
                       f"got {self.native_matmul!r}")
    if self.max_length < 2:
      raise ValueError(f"SamplingConfig.max_length must be >= 2, got {self.max_length}")
