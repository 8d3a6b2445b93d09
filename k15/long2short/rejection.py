"""Shortest rejection sampling (report 2.4): sample each prompt n times, keep the shortest correct response.

The kept (prompt, response) pairs are an SFT set (k15.rl.sft.sft_train); the same sampled groups also feed
the DPO pairs (k15.long2short.dpo).
"""
import numpy as np

from k15.rl import rollout


def shortest_correct(lengths_PxG, correct_PxG) -> np.ndarray:
  """Per prompt, the index of its shortest correct response (the lowest index among ties); -1 if none is correct."""
  lengths = np.asarray(lengths_PxG)
  correct = np.asarray(correct_PxG) == 1
  if lengths.shape != correct.shape or lengths.ndim != 2:
    raise ValueError(f"lengths {lengths.shape} and correct {correct.shape} must be the same PxG shape")
  # Wrong responses get an infinite length so argmin (first of ties) only sees the correct ones.
  masked = np.where(correct, lengths.astype(np.float64), np.inf)
  return np.where(correct.any(axis=1), np.argmin(masked, axis=1), -1)


def sample_groups(trainer, params, tokenizer, examples, rollout_cfg, verifier, *, n: int, seed: int,
                  max_new_tokens: int):
  """n responses per example at rollout_cfg.temperature (a RolloutConfig), each scored by `verifier` (a
  k15.rewards.verifiers.Verifier: any prompt set, any reward).

  Returns (responses, lengths_PxG, correct_PxG): responses[p][g] is a token list without eos; lengths
  count those tokens.
  """
  if n < 1:
    raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
  prompts = [ex["inputs_ids"] for ex in examples for _ in range(n)]
  flat = rollout.generate_responses(trainer, params, prompts, tokenizer, rollout_cfg,
                                    temperature=rollout_cfg.temperature, max_new_tokens=max_new_tokens, seed=seed)
  responses = [flat[p * n:(p + 1) * n] for p in range(len(examples))]
  lengths = np.array([[len(r) for r in group] for group in responses], np.int32)
  correct = verifier([tokenizer.decode(r) for r in flat], [ex for ex in examples for _ in range(n)])
  return responses, lengths, correct.reshape(len(examples), n).astype(np.float32)


def rejection_sft_set(examples, responses, lengths_PxG, correct_PxG, eos_id: int):
  """(prompts, responses + eos) of the shortest correct response of every prompt that has one."""
  best = shortest_correct(lengths_PxG, correct_PxG)
  prompts, targets = [], []
  for ex, group, b in zip(examples, responses, best):
    if b >= 0:
      prompts.append(list(ex["inputs_ids"]))
      targets.append(list(group[b]) + [eos_id])  # the model must learn to stop there
  return prompts, targets
