"""seqio Tasks over the arithmetic task's JSONL files, and a plain-Python reader of any Task.

The only data module that imports seqio/TensorFlow; `load_examples` hands back lists of dicts so the RL loop
never touches TF.
"""
import functools
import os
from typing import Optional

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from k15.data import arith
from k15.data import tokenizer as tokenizer_lib

# The split each task's source offers (one file per task).
_SPLITS = {"train": ("train.jsonl", "train"), "eval": ("eval.jsonl", "validation")}
_PROMPT_PREFIX, _PROMPT_SUFFIX = arith.PROMPT_TEMPLATE.split("{question}")


def _jsonl_dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None, *, path: str, own_split: str):
  """All records of one JSONL file; read eagerly in Python so a bad line fails with its file and line."""
  del shuffle_files, seed  # one small file: the Task shuffles examples itself
  if split != own_split:  # seqio does not check splits of a FunctionDataSource
    raise ValueError(f"split {split!r} unknown; this task reads {path} as split {own_split!r}")
  examples = arith.read_jsonl(path)
  if not examples:
    raise ValueError(f"{path}: no examples")
  return tf.data.Dataset.from_tensor_slices({
      "id": [ex["id"] for ex in examples],
      "question": [ex["question"] for ex in examples],
      "answer": [str(ex["answer"]) for ex in examples],
      "difficulty": tf.constant([ex["difficulty"] for ex in examples], tf.int32),
      "cot_long": [ex["cot_long"] for ex in examples],
      "cot_short": [ex["cot_short"] for ex in examples],
      "warmup": [ex["warmup"] for ex in examples],
  })


def _to_features(dataset: tf.data.Dataset, target_field: str) -> tf.data.Dataset:
  """inputs = the prompt (arith.prompt_text), targets = a trace; id, answer, difficulty pass through."""
  def fn(ex):
    return {
        "inputs": tf.strings.join([_PROMPT_PREFIX, ex["question"], _PROMPT_SUFFIX]),
        "targets": ex[target_field],
        "id": ex["id"], "answer": ex["answer"], "difficulty": ex["difficulty"],
    }
  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def register_arith_tasks(data_dir: str, spm_path: str, name_prefix: str = "arith",
                         target_field: str = "warmup") -> dict[str, str]:
  """Registers `<prefix>_train` (split "train") and `<prefix>_eval` (split "validation"); returns their names.

  Re-registering a name replaces the earlier task. targets are the warm-up traces; `target_field="cot_short"`
  gives the short-CoT variant, "cot_long" the long traces only.
  """
  if target_field not in ("warmup", "cot_long", "cot_short"):
    raise ValueError(f"target_field must be 'warmup', 'cot_long' or 'cot_short', got {target_field!r}")
  # seqio pads with id 0 and stops decoding at the model's eos; a model trained otherwise would be misread.
  if tokenizer_lib.SentencePieceTokenizer(spm_path).pad_id != 0:
    raise ValueError(f"{spm_path}: seqio needs pad_id 0")
  vocab = seqio.SentencePieceVocabulary(spm_path)
  output_features = {
      "inputs": seqio.Feature(vocab, add_eos=False),  # the response follows the prompt directly
      "targets": seqio.Feature(vocab, add_eos=True),  # so SFT teaches the model to stop
  }
  names = {}
  for kind, (filename, split) in _SPLITS.items():
    path = os.path.join(data_dir, filename)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found; write it with k15.data.arith.prepare_arith_data")
    name = f"{name_prefix}_{kind}"
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(functools.partial(_jsonl_dataset_fn, path=path, own_split=split),
                                          splits=[split]),
        output_features=output_features,
        preprocessors=[
            functools.partial(_to_features, target_field=target_field),
            seqio.preprocessors.tokenize,  # keeps the text as inputs_pretokenized / targets_pretokenized
            seqio.preprocessors.append_eos,
        ])
    names[kind] = name
  return names


def load_examples(task_name: str, split: Optional[str] = None) -> list[dict]:
  """Every example of a task in file order, as plain Python.

  Each dict: id, answer (str), difficulty (int), inputs_text, targets_text (str), inputs_ids, targets_ids
  (list[int]; targets end with eos). `split` defaults to the task's only split.
  """
  task = seqio.get_mixture_or_task(task_name)
  if split is None:
    if len(task.splits) != 1:
      raise ValueError(f"task {task_name} has splits {list(task.splits)}; pass split=")
    split = task.splits[0]
  ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1)
  out = []
  for ex in tfds.as_numpy(ds):
    out.append(dict(
        id=ex["id"].decode(), answer=ex["answer"].decode(), difficulty=int(ex["difficulty"]),
        inputs_text=ex["inputs_pretokenized"].decode(), targets_text=ex["targets_pretokenized"].decode(),
        inputs_ids=ex["inputs"].tolist(), targets_ids=ex["targets"].tolist()))
  return out
