"""How tokens are drawn, when a trajectory stops, and how the paged KV cache is laid out."""
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
  # top-p without top-k looks for the nucleus among the most likely `nucleus_candidates` tokens of each vocab shard
  # (no sort of the vocabulary): exact whenever they hold top_p of the mass (see `select.select_tokens`).
  nucleus_candidates: int = 1024
  max_new_tokens: int = 256  # cap on the response tokens of one trajectory, over all iterations
  chunk_size: int = 64  # decode steps per dispatch (one jitted while_loop); slots are refilled between chunks
  stop_ids: Tuple[int, ...] = ()  # token ids that end a trajectory (EOS, end-of-turn); the stop token is kept
  repeat_ngram: int = 0  # n-gram size of repeat detection; 0 = off
  repeat_count: int = 4  # stop once the newest n-gram has occurred this many times in the response
  max_length: int = 1024  # prompt + response tokens of one trajectory
  page_size: int = 16  # positions per page of the paged KV cache; prefill encodes a page of a sequence per row
  num_pages: int = 0  # pages in the cache (split over the slot shards); 0: every slot can reach max_length at once
  attention: str = "auto"  # paged attention: "kernel" (Pallas, TPU), "xla", or "auto" (the kernel on TPU)
  attention_block: int = 16  # pages per work block of the XLA paged attention (its loop's step)

  def __post_init__(self):
    object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
    if not self.greedy and self.temperature <= 0:
      raise ValueError(f"SamplingConfig.temperature must be > 0 (or greedy=True), got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
    for name in ("top_k", "repeat_ngram", "num_pages"):
      if getattr(self, name) < 0:
        raise ValueError(f"SamplingConfig.{name} must be >= 0, got {getattr(self, name)}")
    for name in ("max_new_tokens", "chunk_size", "max_length", "repeat_count", "page_size", "attention_block",
                 "nucleus_candidates"):
      if getattr(self, name) <= 0:
        raise ValueError(f"SamplingConfig.{name} must be positive, got {getattr(self, name)}")
    if self.attention not in ("auto", "kernel", "xla"):
      raise ValueError(f"SamplingConfig.attention must be 'auto', 'kernel' or 'xla', got {self.attention!r}")
    if self.max_length < 2:
      raise ValueError(f"SamplingConfig.max_length must be >= 2, got {self.max_length}")

  @property
  def pages_per_slot(self) -> int:
    """Page table entries of a slot: enough for max_length positions."""
    return -(-self.max_length // self.page_size)
