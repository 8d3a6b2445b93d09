"""The sampling loop: paged KV cache, batched prefill, chunked decode, slot refill, partial rollouts, replay buffer,
repeat stop."""
from k15.sampling.backend import ModelBackend, load_backend
from k15.sampling.config import SamplingConfig
from k15.sampling.engine import Request, RolloutEngine, RolloutStats
from k15.sampling.generate import generate
from k15.sampling.repeat import find_repeat
from k15.sampling.replay import FINISH_REASONS, ReplayBuffer, Trajectory
from k15.sampling.select import select_tokens
