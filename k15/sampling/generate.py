"""`generate`: sample completions of a list of prompts (one engine run, no replay buffer)."""
from typing import List, Optional, Sequence

from jax.sharding import Mesh

from k15 import sharding
from k15.models import ModelConfig
from k15.sampling.config import SamplingConfig
from k15.sampling.engine import Request, RolloutEngine, slot_axes_of
from k15.sampling.replay import Trajectory


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], sampling_cfg: SamplingConfig, rng,
             num_slots: Optional[int] = None, mesh: Optional[Mesh] = None, rules=sharding.SAMPLING_RULES,
             backend=None) -> List[Trajectory]:
  """One completion per prompt, in prompt order: response_tokens, logprobs (log pi, T=1, untruncated),
  finish_reason ("eos", "repeat" or "max_length"). num_slots defaults to one per prompt; it is rounded up to
  a multiple of the mesh's slot shards; fewer slots than prompts refill slots as completions finish. mesh, rules,
  backend: `RolloutEngine`'s."""
  shards = 1 if mesh is None else slot_axes_of(mesh, rules)[1]
  num_slots = -(-(num_slots or len(prompts)) // shards) * shards
  engine = RolloutEngine(cfg, sampling_cfg, num_slots, mesh, rules, backend)
  requests = [Request(i, list(p)) for i, p in enumerate(prompts)]
  finished, _ = engine.run(params, requests, None, iteration=0, token_budget=None, rng=rng)
  return sorted(finished, key=lambda t: t.prompt_id)
