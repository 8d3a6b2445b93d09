"""RL on prompt files through a seqio Mixture with math-verify rewards (RECIPE.md sections 3 and 6).

  python -m experiments.train --config=experiments/configs/math_mixture.py:smoke --workdir=/tmp/k15_math

Ships pointing at the repository's small fixture files (GSM8K-style and MATH-style JSONL) with a tiny random
model, so it runs anywhere; for real prompt sets, copy this file and set prompts.tasks / prompts.eval_tasks to
your files, data.tokenizer_path to the model's tokenizer and the model fields (or start from a checkpoint).
"""
import os

import ml_collections

from experiments.configs import arith

_FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "prompts")
_MATH_FIELDS = {"question": "problem", "answer": "solution", "difficulty": "level"}  # MATH's field names


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """arg: "" or "smoke" (fewer iterations)."""
  if arg not in ("", "smoke"):
    raise ValueError(f"unknown config variant {arg!r}; use '' or 'smoke'")
  c = arith.get_config("smoke")  # tiny model, mesh, sampling and checkpoint settings
  c.model.vocab_size = 256  # must be >= the tokenizer's vocab
  c.data.source = "prompts"
  c.data.tokenizer_path = ""  # SentencePiece .model or HF tokenizer.json; empty: train one on the prompt files
  c.data.tokenizer_vocab_size = 256

  c.prompts = ml_collections.ConfigDict()
  c.prompts.name = "k15_math_mixture"  # the seqio Mixture's name
  c.prompts.tasks = [  # one seqio Task per file; field_map maps our fields to the file's
      {"path": os.path.join(_FIXTURES, "gsm8k_style.jsonl"), "domain": "math"},
      {"path": os.path.join(_FIXTURES, "math_style.jsonl"), "domain": "math", "field_map": _MATH_FIELDS},
  ]
  c.prompts.domain_rates = {}  # {domain: rate} across domains; empty: each task by its size
  c.prompts.template = "Question: {question}\nPut the final answer in \\boxed{{}}.\nAnswer:"  # around the question
  c.prompts.num_train = 32  # prompts drawn from the Mixture at its rates: the RL prompt pool
  c.prompts.max_prompt_len = 128  # longer prompts are an error naming the prompt
  c.prompts.eval_tasks = list(c.prompts.tasks)  # held-out prompt files (here: the fixtures again)

  c.sft.steps = 0  # prompt files carry no long-CoT traces: RL starts from the model as given
  c.rl.reward = "math"  # math-verify in a worker pool
  c.rl.math_timeout_s = 5.0  # per-item timeout of the verifier pool
  c.rl.math_workers = 1
  c.rl.curriculum = ()  # prompts without difficulty labels (GSM8K) leave the curriculum off
  c.rl.iterations = 2 if arg == "smoke" else 10
  c.rl.prompts_per_iteration = 4
  c.rl.max_response_len = 48
  c.rl.token_budget = 32
  c.eval.max_response_len = 48
  c.eval.sampled_temperature = 0.0  # greedy evaluation only
  return c
