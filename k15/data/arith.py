"""Synthetic verifiable task: multi-step integer arithmetic with difficulty levels.

Sized for a tiny transformer on a CPU: chains of up to five one-digit operands whose running result stays a
single digit ("Compute 7+2-5-3."; ~110 distinct step facts, so warm-up is fast and longer chains are harder only
through their length), then two-digit operands and '*' ("Compute 37+8*3.") at the top levels.
Each example carries traces that end in "Answer: <int>":

  cot_long   a plan, one line per step, a check of every step by its inverse operation and, in a seeded fraction
             of examples, a redundant re-computation (length that long2short can remove later);
  cot_short  the step results only;
  warmup     the warm-up's SFT target: cot_long, or in a seeded fraction of examples (`direct_prob`) the bare
             "Answer: <int>" with no reasoning. Like a base model, the warm-up model then sometimes answers
             without thinking, which fails on long chains; RL has to learn from rewards that reasoning pays.

Multiplication binds tighter than + and -; it is done first, then the rest left to right.
"""
import dataclasses
import hashlib
import os
from typing import Iterable, Optional, Sequence

import numpy as np

from k15.data import jsonl
from k15.data import tokenizer as tokenizer_lib

PROMPT_TEMPLATE = "{question}\nThink step by step.\n"
FIELDS = ("id", "question", "answer", "difficulty", "cot_long", "cot_short", "warmup")
# Forced single pieces of the arithmetic tokenizer, so every number is spelled digit by digit.
SYMBOLS = ["\n", "+", "-", "*", "/", "="] + [str(d) for d in range(10)]


@dataclasses.dataclass(frozen=True)
class Level:
  """One difficulty level."""
  n_operands: int
  digits: int  # operands are < 10**digits and the largest has exactly this many digits
  mul: bool = False  # one '*' whose right operand (the factor) is a digit in [2, 9]
  bounded: bool = False  # every running result stays in [0, 10**digits) (no '*')

  def __post_init__(self):
    if self.bounded and self.mul:
      raise ValueError("a bounded level has no '*'")

  @property
  def low(self) -> int:
    """The largest operand (factors aside) is at least this: levels never share a question."""
    return 10 ** (self.digits - 1) if self.digits > 1 else 0

  def capacity(self) -> int:
    """The number of distinct questions this level can produce."""
    if self.bounded:  # count chains by their running value: ways_v after each step
      top = 10 ** self.digits
      ways = [1 if v >= self.low else 0 for v in range(top)]
      for _ in range(self.n_operands - 1):
        new = [0] * top
        for v, w in enumerate(ways):
          for b in range(1, top):  # no zero steps: "+0" teaches nothing
            for c in (v + b, v - b):
              if 0 <= c < top:
                new[c] += w
        ways = new
      return sum(ways)
    n_free = self.n_operands - self.mul  # operands other than the factor
    tuples = (10 ** self.digits) ** n_free - self.low ** n_free
    if not self.mul:
      return tuples * 2 ** (self.n_operands - 1)
    slots = self.n_operands - 1
    return slots * 8 * tuples * 2 ** (slots - 1)


LEVELS = {  # one-digit operands first: a tiny model learns the step format fast, longer chains are harder
    1: Level(n_operands=2, digits=1, bounded=True),
    2: Level(n_operands=3, digits=1, bounded=True),
    3: Level(n_operands=4, digits=1, bounded=True),
    4: Level(n_operands=5, digits=1, bounded=True),
    5: Level(n_operands=2, digits=2),
    6: Level(n_operands=3, digits=2, mul=True),
    7: Level(n_operands=10, digits=1, bounded=True),  # long chains: a few of them make response lengths long-tailed
}
RECHECK_PROB = 0.4  # fraction of long traces with a redundant re-computation


def prompt_text(question: str) -> str:
  """The text fed to the model for a question (the one template of this task)."""
  return PROMPT_TEMPLATE.format(question=question)


def example_id(question: str) -> str:
  """Stable across runs and generation order: a hash of the question."""
  return "arith-" + hashlib.sha1(question.encode()).hexdigest()[:12]


def _sample_bounded(level: Level, rng: np.random.Generator) -> tuple[list[int], list[str]]:
  """Each step picks uniformly among the nonzero (op, operand) pairs that keep the running result in range."""
  top = 10 ** level.digits
  acc = int(rng.integers(0, top))
  operands, ops = [acc], []
  for _ in range(level.n_operands - 1):
    k = int(rng.integers(0, top - 1))  # top-1-acc ways up, acc ways down: top-1 in all
    op, b = ("+", k + 1) if k < top - 1 - acc else ("-", k - (top - 1 - acc) + 1)
    acc = acc + b if op == "+" else acc - b
    operands.append(b)
    ops.append(op)
  return operands, ops


def _sample_expression(level: Level, rng: np.random.Generator) -> tuple[list[int], list[str]]:
  if level.bounded:
    return _sample_bounded(level, rng)
  while True:
    operands = [int(x) for x in rng.integers(0, 10 ** level.digits, size=level.n_operands)]
    ops = [str(o) for o in rng.choice(["+", "-"], size=level.n_operands - 1)]
    free = list(operands)
    if level.mul:
      k = int(rng.integers(0, len(ops)))
      ops[k] = "*"
      operands[k + 1] = int(rng.integers(2, 10))  # 2-9: the check divides by it
      del free[k + 1]
    if max(free) >= level.low:
      return operands, ops


def _expr(operands: Sequence[int], ops: Sequence[str]) -> str:
  return str(operands[0]) + "".join(f"{o}{x}" for o, x in zip(ops, operands[1:]))


def _apply(a: int, op: str, b: int) -> int:
  return a + b if op == "+" else a - b if op == "-" else a * b


def _inverse(a: int, op: str, b: int, c: int) -> str:
  """The check of a step a op b = c: undo it and get a back."""
  undo = {"+": "-", "-": "+", "*": "/"}[op]
  return f"{c}{undo}{b}={a}"


def _solve(operands: Sequence[int], ops: Sequence[str]) -> tuple[list[tuple[int, str, int, int]], Optional[str]]:
  """The steps (a, op, b, a op b) in evaluation order, and the rewritten expression after a '*' step."""
  operands, ops, steps, rewritten = list(operands), list(ops), [], None
  if "*" in ops:
    k = ops.index("*")
    c = operands[k] * operands[k + 1]
    steps.append((operands[k], "*", operands[k + 1], c))
    operands[k:k + 2] = [c]
    del ops[k]
    rewritten = _expr(operands, ops)
  acc = operands[0]
  for op, b in zip(ops, operands[1:]):
    c = _apply(acc, op, b)
    steps.append((acc, op, b, c))
    acc = c
  return steps, rewritten


def make_example(operands: Sequence[int], ops: Sequence[str], difficulty: int, recheck: bool,
                 direct: bool = False) -> dict:
  """One example from an expression; `recheck` adds the redundant re-computation to the long trace, `direct`
  makes the warm-up target the bare answer."""
  question = f"Compute {_expr(operands, ops)}."
  steps, rewritten = _solve(operands, ops)
  answer = str(steps[-1][3])
  lines = [f"{a}{op}{b}={c}" for a, op, b, c in steps]
  n = len(steps)
  order = "* first" if rewritten else "left to right"
  long_lines = [f"Plan: {n} step{'s' if n > 1 else ''}, {order}."]
  for i, line in enumerate(lines):
    long_lines.append(f"{line}, now {rewritten}" if i == 0 and rewritten and n > 1 else line)
  long_lines.append("Check: " + ", ".join(_inverse(*s) for s in steps) + ".")
  if recheck:
    long_lines.append("Again: " + ", ".join(lines) + ".")
  long_lines.append(f"Answer: {answer}")
  cot_long = "\n".join(long_lines)
  return dict(
      id=example_id(question), question=question, answer=answer, difficulty=int(difficulty),
      cot_long=cot_long, cot_short=", ".join(lines) + f"\nAnswer: {answer}",
      warmup=f"Answer: {answer}" if direct else cot_long)


def _split(n: int, weights: Sequence[float]) -> list[int]:
  """n split in proportion to weights, remainders to the largest fractions (ties: the first)."""
  raw = n * np.asarray(weights, np.float64) / np.sum(weights)
  counts = np.floor(raw).astype(np.int64)
  for i in np.argsort(counts - raw, kind="stable")[:n - int(counts.sum())]:
    counts[i] += 1
  return counts.tolist()


def _allocate(n: int, levels: Sequence[int], shares: Sequence[float]) -> dict[int, int]:
  """n split over levels in proportion to shares; a level short of distinct questions passes its excess to the
  others (in proportion to theirs)."""
  share_of, counts, left = dict(zip(levels, shares)), {l: 0 for l in levels}, n
  open_levels = [l for l in levels if share_of[l] > 0]
  while left and open_levels:
    for l, want in zip(list(open_levels), _split(left, [share_of[l] for l in open_levels])):
      take = min(want, LEVELS[l].capacity() - counts[l])
      counts[l] += take
      left -= take
      if counts[l] == LEVELS[l].capacity():
        open_levels.remove(l)
  if left:
    raise ValueError(f"levels {list(levels)} hold only {n - left} distinct questions, asked for {n}")
  return counts


def generate(n: int, seed: int, levels: Sequence[int] = tuple(LEVELS), recheck_prob: float = RECHECK_PROB,
             direct_prob: float = 0.0, level_shares: Sequence[float] = ()) -> list[dict]:
  """n examples with distinct questions, spread over `levels` (capped by each level's size), shuffled.

  level_shares: each level's share of the examples, in the order of `levels`; () for an even spread.
  Deterministic in (n, seed, levels, recheck_prob, direct_prob, level_shares); the questions do not depend on
  direct_prob.
  """
  if not 0.0 <= direct_prob <= 1.0:
    raise ValueError(f"direct_prob must be in [0, 1], got {direct_prob}")
  unknown = sorted(set(levels) - set(LEVELS))
  if unknown:
    raise ValueError(f"unknown level(s) {unknown}; known levels: {sorted(LEVELS)}")
  shares = list(level_shares) or [1.0] * len(levels)
  if len(shares) != len(levels) or min(shares) < 0 or sum(shares) <= 0:
    raise ValueError(f"level_shares {tuple(level_shares)}: one share >= 0 per level of {list(levels)}, not all 0")
  share_of = dict(zip(levels, shares))
  levels = sorted(share_of)
  rng = np.random.default_rng(seed)
  direct = np.random.default_rng([seed, 1]).random(n) < direct_prob  # its own stream: same questions for any prob
  examples = []
  for level, count in _allocate(n, levels, [share_of[l] for l in levels]).items():
    seen = set()
    while len(seen) < count:  # rejection sampling; a full level costs ~capacity*log(capacity) draws
      operands, ops = _sample_expression(LEVELS[level], rng)
      key = _expr(operands, ops)
      if key not in seen:
        seen.add(key)
        examples.append(make_example(operands, ops, level, recheck=bool(rng.random() < recheck_prob),
                                     direct=bool(direct[len(examples)])))
  return [examples[i] for i in rng.permutation(len(examples))]


def split_train_eval(examples: Sequence[dict], n_eval: int) -> tuple[list[dict], list[dict]]:
  """Dedupes by question, then takes n_eval examples balanced over difficulty (in the given order) as eval."""
  unique, seen = [], set()
  for ex in examples:
    if ex["question"] not in seen:
      seen.add(ex["question"])
      unique.append(ex)
  by_level: dict[int, list[dict]] = {}
  for ex in unique:
    by_level.setdefault(ex["difficulty"], []).append(ex)
  queues = [iter(v) for _, v in sorted(by_level.items())]
  eval_ids = set()
  while len(eval_ids) < n_eval and queues:
    for q in list(queues):  # round robin over levels
      ex = next(q, None)
      if ex is None:
        queues.remove(q)
      elif len(eval_ids) < n_eval:
        eval_ids.add(ex["id"])
  if len(eval_ids) < n_eval:
    raise ValueError(f"asked for {n_eval} eval examples, only {len(unique)} distinct questions")
  return ([ex for ex in unique if ex["id"] not in eval_ids], [ex for ex in unique if ex["id"] in eval_ids])


write_jsonl = jsonl.write


def read_jsonl(path: str, required: Sequence[str] = FIELDS) -> list[dict]:
  """Examples of a JSONL file; a malformed line or a missing field raises naming the file and line."""
  examples = []
  for where, ex in jsonl.records(path):
    if not isinstance(ex, dict):
      raise ValueError(f"{where}: expected a JSON object, got {type(ex).__name__}")
    missing = [k for k in required if k not in ex]
    if missing:
      raise ValueError(f"{where}: missing field(s) {missing}")
    if "difficulty" in ex and (not isinstance(ex["difficulty"], int) or isinstance(ex["difficulty"], bool)):
      raise ValueError(f"{where}: difficulty must be an int, got {ex['difficulty']!r}")
    examples.append(ex)
  return examples


def build_corpus(examples: Iterable[dict]) -> list[str]:
  """Texts for tokenizer training: every prompt and both traces."""
  texts = []
  for ex in examples:
    texts += [prompt_text(ex["question"]), ex["cot_long"], ex["cot_short"]]
  return texts


def prepare_arith_data(out_dir: str, n_train: int, n_eval: int, seed: int,
                       levels: Sequence[int] = tuple(LEVELS), vocab_size: int = 256,
                       direct_prob: float = 0.0, level_shares: Sequence[float] = ()) -> dict[str, str]:
  """Writes train.jsonl, eval.jsonl (disjoint questions) and spm.model (trained on the train corpus).

  Returns {"train": path, "eval": path, "spm": path}.
  """
  train, eval_ = split_train_eval(generate(n_train + n_eval, seed, levels, direct_prob=direct_prob,
                                           level_shares=level_shares), n_eval)
  paths = {k: os.path.join(out_dir, f) for k, f in
           (("train", "train.jsonl"), ("eval", "eval.jsonl"), ("spm", "spm.model"))}
  write_jsonl(paths["train"], train)
  write_jsonl(paths["eval"], eval_)
  tokenizer_lib.train_sentencepiece(build_corpus(train), os.path.join(out_dir, "spm"), vocab_size,
                                    user_defined_symbols=SYMBOLS)
  return paths
