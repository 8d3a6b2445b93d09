"""Offline prompt curation (k1.5 report 2.3.4, 3.5; RECIPE.md section 3).

Three filters and a label, in order of cost:
  1. question kind: multiple-choice, true/false and proof questions are dropped (pattern-based): their answers
     are guessable or not checkable by an answer verifier;
  2. easy to hack: a reference model answering directly, with no chain of thought, gets it right within 8 tries;
  3. difficulty: the pass rate of n samples (report: 10, high temperature) with chain of thought, mapped to
     integer levels (1 = always solved) for the curriculum; the pass rate is kept beside it.
Rewards come from a `reward_fn(texts, prompts) -> rewards in [0, 1]`, so any verifier (math pool, code sandbox,
the arithmetic task's exact match) plugs in.
"""
import collections
import dataclasses
import re
from typing import Callable, Optional, Sequence

import numpy as np

RewardFn = Callable[[Sequence[str], Sequence[dict]], Sequence[float]]

_OPTION_LINE = re.compile(r"^\s*(?:\(([A-Ea-e])\)|([A-E])[.):])\s+\S", re.MULTILINE)
_KINDS = {
    "multiple_choice": re.compile(
        r"\bwhich of the following\b|\b(?:answer )?choices?:|\boptions?:|\bchoose (?:the|one|from)\b"
        r"|\bselect (?:the|one)\b[^.?!]*\b(?:correct|best|following)\b|\(A\)[^\n]*\(B\)", re.IGNORECASE),
    "true_false": re.compile(
        r"\btrue or false\b|\bT/F\b|\b(?:true|false)\s*/\s*(?:true|false)\b|\bprove or disprove\b"
        r"|\bis (?:it|this|the (?:following )?statement) (?:true|false|correct)\b"
        r"|\b(?:determine|decide|state) (?:whether|if) [^.?!]*\b(?:true|false)\b|\byes or no\b", re.IGNORECASE),
    "proof": re.compile(
        r"\bprove\b|\bshow that\b|\bdemonstrate that\b|\b(?:give|write|provide) a (?:\w+ )?proof\b"
        r"|\bprove that\b", re.IGNORECASE),
}


def excluded_kind(question: str) -> Optional[str]:
  """"multiple_choice", "true_false" or "proof" when the question is of a kind curation drops, else None."""
  options = {a or b for a, b in _OPTION_LINE.findall(question)}
  if {"A", "B"} <= {o.upper() for o in options}:  # option lines "A. ...", "(b) ..."
    return "multiple_choice"
  for kind in ("true_false", "multiple_choice", "proof"):  # "prove or disprove" is a true/false question
    if _KINDS[kind].search(question):
      return kind
  return None


@dataclasses.dataclass(frozen=True)
class CurationConfig:
  """How the reference model is sampled and how pass rates become labels."""
  n_samples: int = 10  # samples per prompt for the pass rate (report: 10)
  temperature: float = 1.0  # high, so the pass rate reflects the distribution, not the mode
  max_new_tokens: int = 512  # chain-of-thought budget
  cot_template: str = "{question}\nThink step by step.\n"
  hack_tries: int = 8  # direct answers per prompt for the hackability check (report: 8)
  direct_template: str = "{question}\nAnswer:"  # asks for the answer with no room for reasoning
  direct_prefix: str = "Answer:"  # prepended to a direct answer before scoring, so verifiers find the marker
  direct_max_new_tokens: int = 16
  levels: int = 5  # difficulty labels 1..levels
  num_slots: int = 64  # concurrent sequences in the sampler
  stop_ids: tuple = ()  # e.g. (tokenizer.eos_id,); the tokenizer's eos is always added


def difficulty_label(pass_rate: float, levels: int) -> int:
  """1 for pass rate 1, `levels` for pass rate 0, equal-width bins between."""
  return 1 + min(levels - 1, int(np.floor((1.0 - pass_rate) * levels + 1e-9)))


def sample_responses(model_cfg, params, tokenizer, texts: Sequence[str], n: int, temperature: float,
                     max_new_tokens: int, rng, num_slots: int = 64, stop_ids=()) -> list[list[str]]:
  """n sampled completions (decoded, stop tokens dropped) of each prompt text; temperature 0 is greedy."""
  from k15 import sampling  # pylint: disable=g-import-not-at-top  # JAX: only when sampling
  prompts = [tokenizer.encode(t) for t in texts]
  stops = tuple(sorted(set(stop_ids) | {tokenizer.eos_id}))
  max_length = 16 * -(-(max(len(p) for p in prompts) + max_new_tokens) // 16)
  greedy = temperature == 0  # a greedy SamplingConfig ignores its temperature
  cfg = sampling.SamplingConfig(greedy=greedy, temperature=1.0 if greedy else temperature,
                                max_new_tokens=max_new_tokens, stop_ids=stops, max_length=max_length,
                                chunk_size=min(64, max_new_tokens))
  flat = [p for p in prompts for _ in range(n)]
  trajs = sampling.generate(model_cfg, params, flat, cfg, rng, num_slots=min(num_slots, len(flat)))
  texts_out = [tokenizer.decode([int(x) for x in t.response_tokens if int(x) not in stops]) for t in trajs]
  return [texts_out[i * n:(i + 1) * n] for i in range(len(prompts))]


def _rewards(reward_fn: RewardFn, responses: list[list[str]], prompts: Sequence[dict]) -> np.ndarray:
  """[P, n] rewards; one reward_fn call for the whole batch (verifiers parallelize within it)."""
  n = len(responses[0])
  flat = reward_fn([r for rs in responses for r in rs], [p for p in prompts for _ in range(n)])
  return np.asarray(flat, np.float64).reshape(len(prompts), n)


def pass_rates(model_cfg, params, tokenizer, prompts: Sequence[dict], reward_fn: RewardFn,
               config: CurationConfig, rng) -> np.ndarray:
  """Fraction of n chain-of-thought samples per prompt with reward 1."""
  texts = [config.cot_template.format(question=p["question"]) for p in prompts]
  responses = sample_responses(model_cfg, params, tokenizer, texts, config.n_samples, config.temperature,
                               config.max_new_tokens, rng, config.num_slots, config.stop_ids)
  return (_rewards(reward_fn, responses, prompts) >= 1.0).mean(axis=1)


def guessable(model_cfg, params, tokenizer, prompts: Sequence[dict], reward_fn: RewardFn,
              config: CurationConfig, rng) -> np.ndarray:
  """True where one of `hack_tries` direct answers (first line only: no reasoning) earns reward 1."""
  texts = [config.direct_template.format(question=p["question"]) for p in prompts]
  responses = sample_responses(model_cfg, params, tokenizer, texts, config.hack_tries, config.temperature,
                               config.direct_max_new_tokens, rng, config.num_slots, config.stop_ids)
  guesses = [[config.direct_prefix + r.split("\n", 1)[0] for r in rs] for rs in responses]
  return (_rewards(reward_fn, guesses, prompts) >= 1.0).any(axis=1)


def curate(prompts: Sequence[dict], model_cfg, params, tokenizer, reward_fn: RewardFn,
           config: CurationConfig, rng) -> tuple[list[dict], dict]:
  """The kept prompts, each with "difficulty" (label) and "pass_rate", and counts of what was dropped and why."""
  import jax  # pylint: disable=g-import-not-at-top
  counts = collections.Counter(excluded_kind(p["question"]) or "kept" for p in prompts)
  candidates = [p for p in prompts if excluded_kind(p["question"]) is None]
  if candidates:
    hack_rng, pass_rng = jax.random.split(rng)
    hackable = guessable(model_cfg, params, tokenizer, candidates, reward_fn, config, hack_rng)
    counts["guessable"] = int(hackable.sum())
    candidates = [p for p, h in zip(candidates, hackable) if not h]
  counts["kept"] = len(candidates)
  if not candidates:
    return [], dict(counts)
  rates = pass_rates(model_cfg, params, tokenizer, candidates, reward_fn, config, pass_rng)
  kept = [dict(p, difficulty=difficulty_label(r, config.levels), pass_rate=float(r))
          for p, r in zip(candidates, rates)]
  return kept, dict(counts)
