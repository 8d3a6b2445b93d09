"""Labelled (question, reference, response, correct) examples for reward models, on the synthetic arithmetic task.

Each example takes a problem of k15/data/arith.py and writes a response: a trace of the problem (its short or long
CoT without the final line) and a final answer in one of these forms (the "form" field):

  canonical   "Answer: 7", what the exact verifier reads
  words       "Answer: seven", "Answer: minus one"
  fraction    "Answer: 14/2"
  decimal     "Answer: 7.0", "Answer: 6.50"
  expression  "Answer: 3+4", "Answer: 2*5-3"
  text        the answer inside a sentence: "So the answer is 7.", "x = 7", "Final answer: 7 (done)"
  truncated   the trace cut off before any final answer

Every form but truncated is correct or wrong with equal odds. A wrong answer looks right: a value near the true one
(off by one or two), an intermediate result of the chain, or, for fractions and decimals, a value that is not a
whole number (15/2, 7.5); with some probability the trace's last step is changed to agree with it. The label comes
from the exact verifier (k15.rewards.arith) on the canonical value of what is written: the integer "7" for "14/2",
"15/2" (not an integer, so wrong) for "15/2"; a truncated response has no answer and is wrong.

The CoT RM's target (`cot_target`) is a short trace ending in the JSON verdict, in one of two styles (TRACES).
"value" names the written value at once:
  Final answer: 14/2
  Value: 7
  Reference: 7
  Match: yes
  {"correct": true}
"steps" computes it in single steps, as the task's own traces do, so that a small judge need not do two operations
in one token:
  Final answer: 3*2+2      Final answer: 14/2
  Value: 3*2=6, 6+2=8      Reference: 7
  Reference: 8             Check: 7*2=14, numerator 14
  Match: yes               Match: yes
  {"correct": true}        {"correct": true}
A fraction is checked by multiplying the reference by its denominator: a product, which the judge learns, where the
quotient is a division it would have to invert. Each "Match" compares two numbers on the lines just above it.
"""
import fractions
import os
import re
from typing import Optional, Sequence

import numpy as np

from k15.data import arith, jsonl
from k15.data import tokenizer as tokenizer_lib
from k15.rewards.arith import arith_reward
from k15.rewards.reward_model import TEMPLATE, verdict_line

FORMS = ("canonical", "words", "fraction", "decimal", "expression", "text", "truncated")
FORM_WEIGHTS = (2.0, 1.5, 1.5, 1.0, 1.5, 1.5, 1.0)  # relative frequency of each form
LONG_TRACE_PROB = 0.3  # responses with the long trace (else the short one)
TRACES = ("value", "steps")  # styles of the CoT RM's target
FIELDS = ("id", "question", "answer", "response", "final", "value", "correct", "form", "difficulty")
# Forced single pieces of the judge's tokenizer: the arithmetic task's, and the JSON verdict's.
SYMBOLS = arith.SYMBOLS + ["{", "}", '"', ":", "."]

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
  """English words of an integer in (-1000, 1000): -1 -> "minus one", 42 -> "forty-two"."""
  if n < 0:
    return "minus " + number_words(-n)
  if n >= 1000:
    raise ValueError(f"number_words covers |n| < 1000, got {n}")
  if n < 20:
    return _ONES[n]
  if n < 100:
    return _TENS[n // 10 - 2] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
  rest = n % 100
  return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def canonical(value: Optional[fractions.Fraction]) -> Optional[str]:
  """The canonical text of a value: "7" for an integer, "15/2" otherwise; None for no answer."""
  if value is None:
    return None
  return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def label(value: Optional[fractions.Fraction], reference: str) -> bool:
  """Correct by the exact verifier on the canonical value (no answer: wrong)."""
  text = canonical(value)
  return text is not None and arith_reward(f"Answer: {text}", reference) == 1.0


def _wrong_value(true: int, intermediates: Sequence[int], rng: np.random.Generator) -> int:
  """A plausible wrong integer: off by one or two, or an intermediate result of the chain."""
  others = [v for v in intermediates if v != true]
  if others and rng.random() < 0.35:
    return int(rng.choice(others))
  return true + int(rng.choice([-2, -1, 1, 2]))


def _write(form: str, value: int, correct: bool, rng: np.random.Generator) -> tuple[str, fractions.Fraction]:
  """(the final answer as written, its value) of an integer target `value` in a form; a wrong fraction or decimal
  may be a non-integer next to it."""
  F = fractions.Fraction
  if form == "canonical":
    return str(value), F(value)
  if form == "words":
    return number_words(value), F(value)
  if form == "fraction":
    k = int(rng.integers(2, 10))
    if not correct and rng.random() < 0.5:  # a non-integer next to the value
      num = value * k + int(rng.integers(1, k))
      return f"{num}/{k}", F(num, k)
    return f"{value * k}/{k}", F(value)
  if form == "decimal":
    if not correct and rng.random() < 0.5:
      half = F(2 * value + 1, 2)
      return f"{float(half):.{int(rng.integers(1, 3))}f}", half
    return f"{value}.{'0' * int(rng.integers(1, 3))}", F(value)
  if form == "expression":
    kind = rng.integers(3)
    if kind == 0:  # a+b
      a = int(rng.integers(0, 10))
      return f"{a}+{value - a}" if value - a >= 0 else f"{a}-{a - value}", F(value)
    if kind == 1:  # a-b
      b = int(rng.integers(1, 10))
      return f"{value + b}-{b}", F(value)
    a = int(rng.integers(2, 6))  # a*b+c or a*b-c
    b = int(rng.integers(1, 4))
    c = value - a * b
    return f"{a}*{b}{'+' if c >= 0 else '-'}{abs(c)}", F(value)
  raise ValueError(f"unknown form {form!r}")


_TEXT_FRAMES = ("So the answer is {x}.", "The answer is {x}", "x = {x}", "Final answer: {x} (done)",
                "Answer: it is {x}.", "The result is {x}, which is the answer.", "Answer: {x} units")


def make_pair(problem: dict, form: str, want_correct: bool, rng: np.random.Generator) -> dict:
  """One labelled response to an arithmetic problem (arith.make_example's dict)."""
  long = rng.random() < LONG_TRACE_PROB
  trace = (problem["cot_long"] if long else problem["cot_short"]).rsplit("\nAnswer:", 1)[0]
  true = int(problem["answer"])
  steps = [int(s.split("=")[1]) for s in problem["cot_short"].split("\n")[0].split(", ")]
  if form == "truncated":
    cut = int(rng.integers(1, len(trace) + 1))
    response, final, value = trace[:cut], None, None
  else:
    target = true if want_correct else _wrong_value(true, steps[:-1], rng)
    written, value = _write("canonical" if form == "text" else form, target, want_correct, rng)
    if not want_correct and value == true:  # a fraction or decimal fell back on the true value: never a wrong label
      written, value = str(target), fractions.Fraction(target)
    if form == "text":
      line = _TEXT_FRAMES[int(rng.integers(len(_TEXT_FRAMES)))].format(x=written)
    else:
      line = f"Answer: {written}"
    if not want_correct and rng.random() < 0.5 and value.denominator == 1:  # the trace's last step agrees
      head, _, last = trace.rpartition(f"={steps[-1]}")
      trace = head + f"={int(value)}" + last if head else trace
    response, final = f"{trace}\n{line}", written
  return dict(id=f"{problem['id']}-{form}-{int(rng.integers(1 << 30))}", question=problem["question"],
              answer=problem["answer"], response=response, final=final, value=canonical(value),
              correct=label(value, problem["answer"]), form=form, difficulty=problem["difficulty"])


def expression_steps(expression: str) -> str:
  """The steps of an expression of _write, left to right (a '*' only comes first): "3*2+2" -> "3*2=6, 6+2=8"."""
  first = re.match(r"-?\d+", expression)
  rest = re.findall(r"([-+*])(\d+)", expression[first.end():]) if first else []
  if not first or first.group() + "".join(op + n for op, n in rest) != expression:
    raise ValueError(f"not an expression of integers and + - *: {expression!r}")
  steps, acc = [], int(first.group())
  for op, n in rest:
    result = acc * int(n) if op == "*" else acc + int(n) if op == "+" else acc - int(n)
    steps.append(f"{acc}{op}{n}={result}")
    acc = result
  return ", ".join(steps) or str(acc)


def cot_target(pair: dict, trace: str = "value") -> str:
  """The CoT RM's target: the final answer as written, its value ("steps": computed step by step; a fraction: the
  reference times the denominator), the reference, whether they match, the verdict."""
  if trace not in TRACES:
    raise ValueError(f"unknown CoT trace {trace!r}; one of {TRACES}")
  if pair["final"] is None:
    return f"Final answer: none\n{verdict_line(False)}"
  head, reference = f"Final answer: {pair['final']}\n", pair["answer"]
  if trace == "steps" and pair["form"] == "fraction":
    numerator, denominator = pair["final"].split("/")
    product = int(reference) * int(denominator)
    lines = f"Reference: {reference}\nCheck: {reference}*{denominator}={product}, numerator {numerator}\n"
  else:
    if trace == "steps" and pair["form"] == "expression":
      value = expression_steps(pair["final"])
    else:
      value = pair["value"] if "/" not in pair["value"] else "not a whole number"
    lines = f"Value: {value}\nReference: {reference}\n"
  return f"{head}{lines}Match: {'yes' if pair['correct'] else 'no'}\n{verdict_line(pair['correct'])}"


def generate_pairs(problems: Sequence[dict], n: int, seed: int) -> list[dict]:
  """n labelled pairs over the problems (each used about n / len(problems) times), forms drawn by FORM_WEIGHTS."""
  rng = np.random.default_rng(seed)
  p = np.asarray(FORM_WEIGHTS) / sum(FORM_WEIGHTS)
  pairs = []
  for i in range(n):
    problem = problems[int(rng.integers(len(problems)))] if i >= len(problems) else problems[i]
    form = FORMS[int(rng.choice(len(FORMS), p=p))]
    pairs.append(make_pair(problem, form, bool(rng.random() < 0.5), rng))
  return pairs


def prepare_rm_data(out_dir: str, n_train: int, n_eval: int, seed: int, levels: Sequence[int] = (1, 2, 3, 4),
                    vocab_size: int = 256, n_problems: int = 0) -> dict[str, str]:
  """Writes train.jsonl and eval.jsonl (pairs of disjoint problems) and spm.model (trained on the judge's inputs and
  CoT targets of the train pairs). Returns {"train": path, "eval": path, "spm": path}."""
  n_problems = min(n_problems or max(n_train, n_eval) + n_eval, sum(arith.LEVELS[l].capacity() for l in levels))
  train_p, eval_p = arith.split_train_eval(arith.generate(n_problems, seed, levels), min(n_eval, n_problems // 3))
  train, eval_ = generate_pairs(train_p, n_train, seed), generate_pairs(eval_p, n_eval, seed + 1)
  paths = {k: os.path.join(out_dir, f) for k, f in
           (("train", "train.jsonl"), ("eval", "eval.jsonl"), ("spm", "spm.model"))}
  jsonl.write(paths["train"], train)
  jsonl.write(paths["eval"], eval_)
  corpus = [TEMPLATE.format(question=p["question"], reference=p["answer"], response=p["response"])
            + "\n".join(cot_target(p, trace) for trace in TRACES) for p in train]  # either style: one tokenizer
  tokenizer_lib.train_sentencepiece(corpus, os.path.join(out_dir, "spm"), vocab_size, user_defined_symbols=SYMBOLS)
  return paths


def read_pairs(path: str) -> list[dict]:
  pairs = [ex for _, ex in jsonl.records(path)]
  for i, ex in enumerate(pairs):
    missing = [k for k in FIELDS if k not in ex]
    if missing:
      raise ValueError(f"{path}:{i + 1}: missing field(s) {missing}")
  return pairs
