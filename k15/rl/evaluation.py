"""Held-out evaluation: sample one response per prompt, verify it, report accuracy and length."""
from collections import defaultdict

import numpy as np

from k15.rl import rollout

SEED = 1234  # the sampling seed of every evaluation: variants are compared on the same draws


def score(tokenizer, examples, responses, verifier):
  """Accuracy, mean tokens, tokens per correct answer and per-level accuracy of one response per example.

  verifier: a k15.rewards.verifiers.Verifier.
  """
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


def evaluate_at(trainer, params, tokenizer, examples, rollout_cfg, verifier, *, temperature: float,
                max_new_tokens: int):
  """Responses of `params` to every example at `temperature` (0: greedy), scored."""
  responses = rollout.generate_responses(trainer, params, [ex["inputs_ids"] for ex in examples], tokenizer,
                                         rollout_cfg, temperature=temperature, max_new_tokens=max_new_tokens,
                                         seed=SEED)
  return score(tokenizer, examples, responses, verifier)


def evaluate(trainer, params, tokenizer, examples, rollout_cfg, eval_cfg, verifier, *, sampled: bool = False):
  """The evaluation of an EvalConfig: at eval_cfg.temperature, and with `sampled` also the accuracy of one
  sample at eval_cfg.sampled_temperature (when that is not 0) as "sampled_accuracy"."""
  result = evaluate_at(trainer, params, tokenizer, examples, rollout_cfg, verifier,
                       temperature=eval_cfg.temperature, max_new_tokens=eval_cfg.max_response_len)
  if sampled and eval_cfg.sampled_temperature:
    result["sampled_accuracy"] = evaluate_at(
        trainer, params, tokenizer, examples, rollout_cfg, verifier, temperature=eval_cfg.sampled_temperature,
        max_new_tokens=eval_cfg.max_response_len)["accuracy"]
  return result
