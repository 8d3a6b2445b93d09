"""seqio Tasks over the arithmetic JSONL files, read back as plain Python."""
import os
import shutil

import pytest

from k15.data import arith
from k15.data import tasks
from k15.data import tokenizer as tok_lib


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp("arith"))
  paths = arith.prepare_arith_data(out_dir, n_train=12, n_eval=5, seed=0, levels=(1, 3, 5), vocab_size=128,
                                   direct_prob=0.5)
  names = tasks.register_arith_tasks(out_dir, paths["spm"], name_prefix="test_arith")
  return out_dir, paths, names


def test_examples_survive_the_pipeline(data):
  _, paths, names = data
  assert names == {"train": "test_arith_train", "eval": "test_arith_eval"}
  tok = tok_lib.SentencePieceTokenizer(paths["spm"])
  for kind in ("train", "eval"):
    records = arith.read_jsonl(paths[kind])
    got = tasks.load_examples(names[kind])
    assert [g["id"] for g in got] == [r["id"] for r in records]
    for g, r in zip(got, records):
      assert (g["answer"], g["difficulty"]) == (r["answer"], r["difficulty"])
      assert g["inputs_text"] == arith.prompt_text(r["question"])
      assert g["targets_text"] == r["warmup"]  # the long trace, or the bare answer for direct examples
      assert g["inputs_ids"] == tok.encode(g["inputs_text"])  # seqio's tokenizer and ours agree
      assert g["targets_ids"] == tok.encode(r["warmup"]) + [tok.eos_id]
  assert {g["targets_text"].startswith("Plan:") for g in tasks.load_examples(names["train"])} == {True, False}


def test_eval_task_uses_the_validation_split(data):
  _, _, names = data
  assert len(tasks.load_examples(names["eval"], split="validation")) == 5
  with pytest.raises(ValueError, match="split .train. unknown"):
    tasks.load_examples(names["eval"], split="train")


def test_reregistering_replaces_the_task(data):
  out_dir, paths, _ = data
  tasks.register_arith_tasks(out_dir, paths["spm"], name_prefix="test_arith_again")
  for field in ("cot_short", "cot_long"):
    tasks.register_arith_tasks(out_dir, paths["spm"], name_prefix="test_arith_again", target_field=field)
    got = tasks.load_examples("test_arith_again_eval")
    assert [g["targets_text"] for g in got] == [r[field] for r in arith.read_jsonl(paths["eval"])]


def test_malformed_line_and_missing_file(data, tmp_path):
  out_dir, paths, _ = data
  shutil.copy(paths["train"], tmp_path / "train.jsonl")
  with pytest.raises(FileNotFoundError, match="eval.jsonl"):
    tasks.register_arith_tasks(str(tmp_path), paths["spm"], name_prefix="test_bad")
  lines = open(paths["eval"]).read().splitlines()
  with open(tmp_path / "eval.jsonl", "w") as f:
    f.write(lines[0] + "\n" + lines[1][:-3] + "\n")
  tasks.register_arith_tasks(str(tmp_path), paths["spm"], name_prefix="test_bad")
  with pytest.raises(ValueError, match=r"eval\.jsonl:2: malformed JSON"):
    tasks.load_examples("test_bad_eval")
  assert os.path.exists(os.path.join(out_dir, "eval.jsonl"))  # the good data is untouched
