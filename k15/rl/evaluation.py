"""Held-out evaluation: sample one response per prompt, verify it, report accuracy and length."""
from collections import defaultdict

import numpy as np

from k15.rewards.verifiers import Verifier
from k15.rl import rollout


def score(tokenizer, examples, responses, verifier=None):
  """Accuracy, mean tokens, tokens per correct answer and per-level accuracy of one response per example.

  verifier: a k15.rewards.verifiers.Verifier (default: the synthetic task's exact-integer check).
  """
  verifier = verifier or Verifier()
  correct = verifier([tokenizer.decode(r) for r in responses], examples)
  lengths = np.array([len(r) for r in responses], np.float64)
  per_level = defaultdict(list)
  for ex, c in zip(examples, correct):
    per_level[-1 if ex.get("difficulty") is None else int(ex["difficulty"])].append(c)
  return {
      "accuracy": float(correct.mean()),
      "mean_tokens": float(lengths.mean()),
      "tokens_per_correct": float(lengths.sum() / max(correct.sum(), 1)),
      "per_level": {str(k): float(np.mean(v)) for k, v in sorted(per_level.items())},
  }


def evaluate(trainer, params, tokenizer, examples, config, temperature=None, seed: int = 1234, verifier=None):
  """Responses of `params` to every example at config.eval.temperature (0: greedy) unless given, scored."""
  temperature = config.eval.temperature if temperature is None else temperature
  responses = rollout.generate_responses(trainer, params, [ex["inputs_ids"] for ex in examples], tokenizer,
                                         config, temperature=temperature,
                                         max_new_tokens=config.eval.max_response_len, seed=seed)
  return score(tokenizer, examples, responses, verifier)
