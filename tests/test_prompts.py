"""Prompt files (JSONL, Parquet) in the formats of real sets, their errors, and seqio Tasks / a Mixture over them."""
import collections
import json
import os
import re

import pytest

from k15.config import PromptFile
from k15.data import prompts
from k15.rewards.math import extract_answer

MATH_FIELDS = {"question": "problem", "answer": "solution", "difficulty": "level"}


def test_gsm8k_style_file(prompt_files):
  ps = prompts.read_prompts(prompt_files["gsm8k_style"], domain="math")
  assert len(ps) == 4
  assert all(set(p) == set(prompts.FIELDS) for p in ps)
  assert [extract_answer(p["answer"]) for p in ps] == ["12", "29", "42", "8"]  # the reference's final answer
  assert {p["domain"] for p in ps} == {"math"} and {p["difficulty"] for p in ps} == {None}
  assert ps[0]["id"] == prompts.prompt_id(ps[0]["question"]) and len({p["id"] for p in ps}) == 4


def test_math_style_file_with_field_map(prompt_files):
  ps = prompts.read_prompts(prompt_files["math_style"], domain="math", field_map=MATH_FIELDS)
  assert [p["difficulty"] for p in ps] == [1, 2, 3]  # "Level N"
  assert [extract_answer(p["answer"]) for p in ps] == [r"\frac{5}{6}", "5", "(-2, 2)"]
  assert ps[1]["question"] == "Solve for $x$: $2x - 7 = 3$."


def test_code_style_file(prompt_files):
  # The records' own domain wins over the file's default.
  ps = prompts.read_prompts(prompt_files["code_style"], domain="math")
  assert [p["domain"] for p in ps] == ["code", "code"]
  assert ps[0]["test_cases"][1] == {"input": "-5 5\n", "output": "0\n"}
  # The second record stores its tests as a JSON string, as APPS does.
  assert ps[1]["test_cases"] == [{"fn_name": "reverse_words", "args": ["a b c"], "expected": "c b a"},
                                 {"fn_name": "reverse_words", "args": ["one"], "expected": "one"}]
  assert ps[1]["answer"] == ""


@pytest.mark.parametrize("bad_line, message", [
    ('{"question": "q3", "answer": "1"', "malformed JSON line"),
    ('["q3", "1"]', "expected an object"),
    ('{"answer": "1"}', "missing or empty question"),
    ('{"question": "q3"}', "a prompt needs a reference answer or test cases"),
    ('{"question": "q3", "answer": "1", "difficulty": "hard"}', "difficulty must be an int"),
    ('{"question": "q3", "test_cases": [{"input": "1"}]}', "test case 0 needs input and output"),
    ('{"question": "q3", "test_cases": "[oops"}', "test_cases is not valid JSON"),
])
def test_a_bad_line_is_an_error_naming_file_and_line(tmp_path, bad_line, message):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"question": "q1", "answer": "1"}\n\n' + bad_line + "\n")  # line 2 is blank, line 3 is bad
  with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:3: {message}"):
    prompts.read_prompts(str(path))


def test_parquet_matches_jsonl(tmp_path, prompt_files):
  import pyarrow as pa
  import pyarrow.parquet as pq
  rows = [json.loads(line) for line in open(prompt_files["code_style"])]
  for r in rows:  # Parquet columns need one type: tests as JSON strings, as parquet exports of APPS keep them
    if not isinstance(r["test_cases"], str):
      r["test_cases"] = json.dumps(r["test_cases"])
  path = str(tmp_path / "code.parquet")
  pq.write_table(pa.Table.from_pylist(rows), path)
  assert prompts.read_prompts(path) == prompts.read_prompts(prompt_files["code_style"])
  rows[0]["difficulty"], rows[1]["difficulty"] = "Level 1", "hard"  # a string column; row 2 is unreadable
  pq.write_table(pa.Table.from_pylist(rows), path)
  with pytest.raises(ValueError, match=f"^{re.escape(path)}:row 2: difficulty"):
    prompts.read_prompts(path)


def test_mixture_rates_split_domains_by_task_size():
  rates = prompts.mixture_rates({"a": 4, "b": 2, "c": 3}, {"a": "math", "b": "math", "c": "code"},
                                {"math": 0.6, "code": 0.4})
  assert rates == pytest.approx({"a": 0.4, "b": 0.2, "c": 0.4})
  assert prompts.mixture_rates({"a": 4, "c": 3}, {"a": "math", "c": "code"}, None) == {"a": 4.0, "c": 3.0}
  with pytest.raises(ValueError, match="domain_rates cover"):
    prompts.mixture_rates({"a": 4}, {"a": "math"}, {"math": 0.5, "code": 0.5})


def test_mixture_over_two_files_yields_both(tmp_path, monkeypatch, prompt_files):
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  math_file, code_file = prompt_files["math_style"], prompt_files["code_style"]
  tasks = {"test_prompts_math": PromptFile(math_file, "math", MATH_FIELDS),
           "test_prompts_code": PromptFile(code_file, "code")}
  name = prompts.register_prompt_mixture("test_prompts_mix", tasks, domain_rates={"math": 0.75, "code": 0.25},
                                         template="Question: {question}\nAnswer:")
  assert name == "test_prompts_mix"
  examples = prompts.load_prompts("test_prompts_mix", 400, seed=0)
  by_domain = collections.Counter(p["domain"] for p in examples)
  assert set(by_domain) == {"math", "code"}
  assert 0.18 < by_domain["code"] / len(examples) < 0.32  # rate 0.25; binomial sd ~0.022
  truth = {p["question"]: p
           for p in prompts.read_prompts(math_file, "math", MATH_FIELDS) + prompts.read_prompts(code_file)}
  for p in examples:  # every field survives the trip through TensorFlow
    assert p["inputs"] == f"Question: {p['question']}\nAnswer:"
    assert {k: p[k] for k in prompts.FIELDS} == truth[p["question"]]
  assert {p["question"] for p in examples} == set(truth)  # every prompt of both files shows up


def test_task_with_a_vocabulary_tokenizes_inputs(tmp_path, monkeypatch, prompt_files):
  from k15.data import tokenizer as tokenizer_lib
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  texts = [p["question"] for p in prompts.read_prompts(prompt_files["gsm8k_style"])]
  tok = tokenizer_lib.train_sentencepiece(texts * 20, str(tmp_path / "spm"), vocab_size=120)
  prompts.register_prompt_task("test_prompts_tok", prompt_files["gsm8k_style"], spm_path=str(tmp_path / "spm.model"))
  examples = prompts.load_prompts("test_prompts_tok", 8, seed=1)
  for p in examples:
    assert all(isinstance(i, int) for i in p["inputs"])
    assert tok.decode(p["inputs"]) == p["question"]
