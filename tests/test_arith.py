"""The arithmetic task: generator, traces, splits, JSONL files, data preparation and the verifier."""
import collections
import itertools
import re

import pytest

from k15.data import arith
from k15.data import tokenizer as tok_lib
from k15.rewards.arith import arith_reward, extract_answer

_STEP = re.compile(r"(-?\d+)([-+*/])(\d+)=(-?\d+)")


@pytest.fixture(scope="module")
def examples():
  return arith.generate(600, seed=0)


def _eval_question(question):
  """Independent truth: Python's own precedence rules."""
  expr = re.fullmatch(r"Compute ([-+*\d]+)\.", question).group(1)
  return eval(expr)  # pylint: disable=eval-used  # digits and + - * only, checked by the regex


def test_hand_worked_traces():
  ex = arith.make_example([37, 8, 12], ["+", "-"], difficulty=3, recheck=False)
  assert ex["question"] == "Compute 37+8-12."
  assert ex["answer"] == "33"
  assert ex["cot_long"] == ("Plan: 2 steps, left to right.\n37+8=45\n45-12=33\n"
                            "Check: 45-8=37, 33+12=45.\nAnswer: 33")
  assert ex["cot_short"] == "37+8=45, 45-12=33\nAnswer: 33"
  ex = arith.make_example([5, 7, 3], ["-", "*"], difficulty=5, recheck=True)
  assert ex["answer"] == "-16"
  assert ex["cot_long"] == ("Plan: 2 steps, * first.\n7*3=21, now 5-21\n5-21=-16\n"
                            "Check: 21/3=7, -16+21=5.\nAgain: 7*3=21, 5-21=-16.\nAnswer: -16")
  assert ex["cot_short"] == "7*3=21, 5-21=-16\nAnswer: -16"
  assert arith.make_example([4, 9], ["-"], 1, False)["cot_long"].startswith("Plan: 1 step, left")
  assert ex["warmup"] == ex["cot_long"]
  direct = arith.make_example([5, 7, 3], ["-", "*"], difficulty=5, recheck=True, direct=True)
  assert direct["warmup"] == "Answer: -16"
  assert {k: v for k, v in direct.items() if k != "warmup"} == {k: v for k, v in ex.items() if k != "warmup"}


def test_generate_is_deterministic_and_seeded(examples):
  assert arith.generate(600, seed=0) == examples
  assert arith.generate(600, seed=1) != examples


def test_answers_and_every_step_are_correct(examples):
  for ex in examples:
    assert int(ex["answer"]) == _eval_question(ex["question"]), ex
    for trace in (ex["cot_long"], ex["cot_short"]):
      assert extract_answer(trace) == ex["answer"]
      assert trace.endswith(f"Answer: {ex['answer']}")
      steps = _STEP.findall(trace)
      assert steps
      for a, op, b, c in steps:
        a, b, c = int(a), int(b), int(c)
        if op == "/":  # a check undoes a '*' step: exact division by a factor in 2..9
          assert 2 <= b <= 9 and a == b * c, (trace, a, op, b, c)
        else:
          assert {"+": a + b, "-": a - b, "*": a * b}[op] == c, (trace, a, op, b, c)


def test_levels_shape_the_questions(examples):
  for ex in examples:
    level = arith.LEVELS[ex["difficulty"]]
    numbers = [int(x) for x in re.findall(r"\d+", ex["question"])]
    assert len(numbers) == level.n_operands
    assert max(numbers) < 10 ** level.digits
    assert ("*" in ex["question"]) == level.mul
    if level.digits == 2:
      assert max(numbers) >= 10  # so level 2 never repeats a level-1 question
    if level.bounded:
      ops = re.findall(r"[+-]", ex["question"])
      assert all(0 <= r <= 9 for r in _running_results(numbers, ops)), ex["question"]


def test_distinct_questions_ids_and_even_levels(examples):
  assert len({ex["question"] for ex in examples}) == len(examples)
  assert len({ex["id"] for ex in examples}) == len(examples)
  # 600 over 7 levels: level 1 holds 90 questions, the other 510 go evenly to the rest (the first ones get 86).
  assert collections.Counter(ex["difficulty"] for ex in examples) == {1: 86, 2: 86, 3: 86, 4: 86, 5: 86, 6: 85, 7: 85}
  assert arith.example_id("Compute 1+2.") == arith.make_example([1, 2], ["+"], 1, False)["id"]


def test_recheck_fraction(examples):
  frac = sum("Again:" in ex["cot_long"] for ex in examples) / len(examples)
  assert 0.3 <= frac <= 0.5
  assert not any("Again:" in ex["cot_long"] for ex in arith.generate(50, seed=0, recheck_prob=0.0))


def test_direct_fraction_leaves_the_questions_alone(examples):
  mixed = arith.generate(600, seed=0, direct_prob=0.5)
  assert [ex["question"] for ex in mixed] == [ex["question"] for ex in examples]
  direct = [ex for ex in mixed if ex["warmup"] != ex["cot_long"]]
  assert 0.4 <= len(direct) / len(mixed) <= 0.6
  assert all(ex["warmup"] == f"Answer: {ex['answer']}" for ex in direct)
  assert all(ex["warmup"] == ex["cot_long"] for ex in examples)  # direct_prob 0: every target reasons
  assert all(ex["warmup"] != ex["cot_long"] for ex in arith.generate(50, seed=0, direct_prob=1.0))
  with pytest.raises(ValueError, match="direct_prob"):
    arith.generate(5, seed=0, direct_prob=1.5)


def _running_results(operands, ops):
  acc, out = operands[0], []
  for op, b in zip(ops, operands[1:]):
    acc = acc + b if op == "+" else acc - b
    out.append(acc)
  return out


@pytest.mark.parametrize("level", [arith.Level(2, 1), arith.Level(2, 2), arith.Level(3, 1),
                                   arith.Level(2, 2, mul=True), arith.Level(3, 1, mul=True),
                                   arith.Level(2, 1, bounded=True), arith.Level(4, 1, bounded=True)])
def test_capacity_matches_enumeration(level):
  questions = set()
  for operands in itertools.product(range(10 ** level.digits), repeat=level.n_operands):
    for ops in itertools.product("+-*", repeat=level.n_operands - 1):
      if ops.count("*") != level.mul:
        continue
      if level.bounded and (0 in operands[1:] or
                            not all(0 <= r < 10 ** level.digits for r in _running_results(operands, ops))):
        continue
      free = [x for i, x in enumerate(operands) if not (i > 0 and ops[i - 1] == "*")]
      factors_ok = all(2 <= operands[i + 1] <= 9 for i, o in enumerate(ops) if o == "*")
      if factors_ok and max(free) >= level.low:
        questions.add(arith._expr(operands, ops))  # pylint: disable=protected-access
  assert level.capacity() == len(questions)


def test_small_level_is_exhausted_then_others_fill_in():
  # a in 0..9, then +b (1 <= b <= 9-a) or -b (1 <= b <= a): 9 ways for every a
  assert arith.LEVELS[1].capacity() == 90
  full = arith.generate(90, seed=3, levels=[1])
  assert len({ex["question"] for ex in full}) == 90
  mixed = arith.generate(500, seed=3, levels=[1, 2])
  assert collections.Counter(ex["difficulty"] for ex in mixed) == {1: 90, 2: 410}
  with pytest.raises(ValueError, match="91"):
    arith.generate(91, seed=3, levels=[1])
  with pytest.raises(ValueError, match="unknown level"):
    arith.generate(5, seed=0, levels=[9])


def test_level_shares():
  # 1000 by shares 0.5/0.3/0.2 wants 500/300/200; level 1 holds 90, and the 410 it leaves go 0.3:0.2 to the others.
  mixed = arith.generate(1000, seed=3, levels=[1, 2, 7], level_shares=[0.5, 0.3, 0.2])
  assert collections.Counter(ex["difficulty"] for ex in mixed) == {1: 90, 2: 300 + 246, 7: 200 + 164}
  # 7 by 0.5/0.3/0.2 is 3.5/2.1/1.4: the remaining one goes to the largest fraction.
  assert collections.Counter(ex["difficulty"] for ex in arith.generate(7, seed=0, levels=[3, 4, 2],
                                                                       level_shares=[0.5, 0.3, 0.2])) == {3: 4, 4: 2, 2: 1}
  assert {ex["difficulty"] for ex in arith.generate(20, seed=0, levels=[2, 3], level_shares=[0, 1])} == {3}
  for bad in ([0.5], [0.5, -0.1], [0, 0]):
    with pytest.raises(ValueError, match="level_shares"):
      arith.generate(10, seed=0, levels=[2, 3], level_shares=bad)


def test_split_is_disjoint_balanced_and_dedupes(examples):
  n_eval = 20 * len(arith.LEVELS)
  train, eval_ = arith.split_train_eval(list(examples) + examples[:30], n_eval=n_eval)
  assert not {ex["question"] for ex in train} & {ex["question"] for ex in eval_}
  assert len(train) + len(eval_) == len(examples)
  assert collections.Counter(ex["difficulty"] for ex in eval_) == {l: 20 for l in arith.LEVELS}


def test_jsonl_round_trip_and_errors(examples, tmp_path):
  path = str(tmp_path / "a.jsonl")
  arith.write_jsonl(path, examples[:5])
  assert arith.read_jsonl(path) == examples[:5]
  lines = open(path).read().splitlines()
  bad = str(tmp_path / "bad.jsonl")
  with open(bad, "w") as f:
    f.write("\n".join(lines[:2] + ['{"id": "x", "question": '] + lines[2:]) + "\n")
  with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
    arith.read_jsonl(bad)
  with open(bad, "w") as f:
    f.write(lines[0] + "\n\n" + '{"id": "x", "question": "Compute 1+1.", "difficulty": 1}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:3: missing field\(s\) \['answer', 'cot_long', 'cot_short', 'warmup'\]"):
    arith.read_jsonl(bad)


def test_prompt_template():
  assert arith.prompt_text("Compute 1+2.") == "Compute 1+2.\nThink step by step.\n"


def test_prepare_arith_data_token_budget(tmp_path):
  paths = arith.prepare_arith_data(str(tmp_path), n_train=1200, n_eval=120, seed=0, levels=tuple(arith.LEVELS),
                                   vocab_size=256)
  train, eval_ = arith.read_jsonl(paths["train"]), arith.read_jsonl(paths["eval"])
  assert (len(train), len(eval_)) == (1200, 120)
  assert not {ex["question"] for ex in train} & {ex["question"] for ex in eval_}
  tok = tok_lib.load_tokenizer(paths["spm"])
  assert tok.vocab_size <= 256
  assert [tok.decode([i]) for i in tok.encode("-905*7")] == list("-905*7")
  lengths = collections.defaultdict(list)
  for ex in train + eval_:
    text = arith.prompt_text(ex["question"])
    assert tok.decode(tok.encode(ex["cot_long"])) == ex["cot_long"]
    lengths["prompt"].append(len(tok.encode(text)))
    lengths[("long", ex["difficulty"])].append(len(tok.encode(ex["cot_long"])))
    lengths[("short", ex["difficulty"])].append(len(tok.encode(ex["cot_short"])))
  assert max(lengths["prompt"]) <= 32
  longs = [x for k, v in lengths.items() if k[0] == "long" and k[1] != 7 for x in v]
  assert min(longs) >= 25 and max(longs) <= 110
  assert min(lengths["long", 7]) > max(longs) and max(lengths["long", 7]) <= 220  # the long chains: a long tail
  for level in arith.LEVELS:  # every short trace is shorter than every long one: room for long2short
    assert max(lengths["short", level]) < min(lengths["long", level])


# The verifier.

@pytest.mark.parametrize("text,expected", [
    ("Answer: 33", "33"),
    ("Answer: -131", "-131"),
    ("Answer :   7 ", "7"),
    ("Answer:\n12", "12"),
    ("Answer: +5", "5"),
    ("Answer: 007", "7"),
    ("Answer: 33.\nThat is all.", "33"),  # a full stop and trailing text are fine
    ("Answer: 4\nwait\nAnswer: 5", "5"),  # the last answer counts
    ("Answer: 4\nAnswer: five", None),  # ... even when it is not a number
    ("Answer: 3.5", None),
    ("Answer: 12abc", None),
    ("Answer: 1/2", None),
    ("Answer: -", None),
    ("Answer: 0=8", None),  # garbled: the integer must end its line
    ("Answer: 7 8", None),
    ("37+8=45", None),
    ("", None),
])
def test_extract_answer(text, expected):
  assert extract_answer(text) == expected


def test_arith_reward():
  assert arith_reward("45-12=33\nAnswer: 33", "33") == 1.0
  assert arith_reward("Answer: -7", "-7") == 1.0
  assert arith_reward("Answer: 7", "-7") == 0.0
  assert arith_reward("Answer: 33\nAnswer: 34", "33") == 0.0
  assert arith_reward("no answer here, 33", "33") == 0.0
  assert arith_reward("Answer: 033", " 33\n") == 1.0
