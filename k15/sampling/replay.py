"""Trajectory records and the replay buffer of partial rollouts (k1.5 report 2.6.2).

A trajectory cut by an iteration's token budget waits in the buffer and is continued in a later
iteration by re-encoding prompt + response-so-far with the then-current params. Each response token
remembers the iteration that generated it, so the loss can tell the newest (on-policy) segment from
older context.
"""
import collections
import dataclasses
from typing import Iterator, List, Optional, Tuple

import numpy as np

FINISH_REASONS = ("eos", "repeat", "max_length", "budget")


@dataclasses.dataclass
class Trajectory:
  """One sampled response to a prompt, finished (finish_reason set) or partial (finish_reason None)."""
  prompt_id: int
  sample_index: int  # which of the prompt's k samples
  prompt_tokens: np.ndarray  # int32
  response_tokens: np.ndarray  # int32, the stop token included
  logprobs: np.ndarray  # float32 log pi(token) under the params of the iteration that sampled it (T=1, no truncation)
  token_iterations: np.ndarray  # int32, the iteration that generated each response token
  finish_reason: Optional[str] = None  # one of FINISH_REASONS; None while partial
  max_new_tokens: Optional[int] = None  # this trajectory's response cap, when not the sampling config's

  def __post_init__(self):
    self.prompt_tokens = np.asarray(self.prompt_tokens, np.int32)
    self.response_tokens = np.asarray(self.response_tokens, np.int32)
    self.logprobs = np.asarray(self.logprobs, np.float32)
    self.token_iterations = np.asarray(self.token_iterations, np.int32)
    n = len(self.response_tokens)
    if len(self.logprobs) != n or len(self.token_iterations) != n:
      raise ValueError(f"trajectory ({self.prompt_id}, {self.sample_index}): {n} response tokens but "
                       f"{len(self.logprobs)} logprobs and {len(self.token_iterations)} iteration labels")
    if self.finish_reason is not None and self.finish_reason not in FINISH_REASONS:
      raise ValueError(f"finish_reason must be one of {FINISH_REASONS} or None, got {self.finish_reason!r}")

  @property
  def tokens(self) -> np.ndarray:
    """Prompt and response, one sequence."""
    return np.concatenate([self.prompt_tokens, self.response_tokens])

  @property
  def segments(self) -> List[Tuple[int, int, int]]:
    """(iteration, start, stop) response-token ranges, in order."""
    its, out, start = self.token_iterations, [], 0
    for stop in range(1, len(its) + 1):
      if stop == len(its) or its[stop] != its[start]:
        out.append((int(its[start]), start, stop))
        start = stop
    return out


class ReplayBuffer:
  """Partial trajectories in FIFO order; `state_dict` is plain numpy (for orbax checkpoints)."""

  def __init__(self, trajectories=()):
    self._items = collections.deque()
    for t in trajectories:
      self.add(t)

  def add(self, trajectory: Trajectory):
    if trajectory.finish_reason is not None:
      raise ValueError(f"only partial trajectories go to the replay buffer; this one finished with "
                       f"{trajectory.finish_reason!r}")
    self._items.append(trajectory)

  def pop_all(self) -> List[Trajectory]:
    items = list(self._items)
    self._items.clear()
    return items

  def __len__(self) -> int:
    return len(self._items)

  def __iter__(self) -> Iterator[Trajectory]:
    return iter(list(self._items))

  def state_dict(self) -> dict:
    """Flat numpy arrays: per-trajectory fields and concatenated token arrays with their lengths."""
    items = list(self._items)
    cat = lambda name, dtype: (np.concatenate([getattr(t, name) for t in items]).astype(dtype) if items
                               else np.zeros((0,), dtype))
    return {
        "prompt_id": np.array([t.prompt_id for t in items], np.int64),
        "sample_index": np.array([t.sample_index for t in items], np.int64),
        "max_new_tokens": np.array([-1 if t.max_new_tokens is None else t.max_new_tokens for t in items],
                                   np.int64),
        "prompt_lengths": np.array([len(t.prompt_tokens) for t in items], np.int64),
        "response_lengths": np.array([len(t.response_tokens) for t in items], np.int64),
        "prompt_tokens": cat("prompt_tokens", np.int32),
        "response_tokens": cat("response_tokens", np.int32),
        "logprobs": cat("logprobs", np.float32),
        "token_iterations": cat("token_iterations", np.int32),
    }

  @classmethod
  def from_state_dict(cls, state: dict) -> "ReplayBuffer":
    state = {k: np.asarray(v) for k, v in state.items()}
    p_off = np.concatenate([[0], np.cumsum(state["prompt_lengths"])]).astype(np.int64)
    r_off = np.concatenate([[0], np.cumsum(state["response_lengths"])]).astype(np.int64)
    items = []
    for i in range(len(state["prompt_id"])):
      r = slice(r_off[i], r_off[i + 1])
      cap = int(state["max_new_tokens"][i])
      items.append(Trajectory(
          prompt_id=int(state["prompt_id"][i]), sample_index=int(state["sample_index"][i]),
          prompt_tokens=state["prompt_tokens"][p_off[i]:p_off[i + 1]], response_tokens=state["response_tokens"][r],
          logprobs=state["logprobs"][r], token_iterations=state["token_iterations"][r],
          max_new_tokens=None if cap < 0 else cap))
    return cls(items)
