"""The RL task of a run: (tokenizer, train examples, held-out examples) from config.data.

Two sources (config.data.source):
  arith    the synthetic task (k15/data/arith.py), generated once into workdir/data with its SentencePiece
           vocabulary, read through seqio Tasks (k15/data/tasks.py);
  prompts  prompt files through a seqio Mixture (k15/data/prompts.py): data.num_train prompts drawn at the
           Mixture's rates are the RL prompt pool, data.eval_tasks are read whole. The tokenizer is
           data.tokenizer_path (SentencePiece .model or HF tokenizer.json), else the start checkpoint's, else a
           SentencePiece vocabulary trained on the prompt files (tiny-model runs only).
Examples are dicts with inputs_ids (the prompt's tokens), answer, difficulty (None when unlabelled) and, for
prompt files, domain and test_cases. Process 0 writes what the others read; in a bucket workdir each process
reads a local copy of workdir/data.
"""
import hashlib
import os

import jax

from k15 import checkpoint, sharding, storage
from k15.data import prompts as prompts_lib
from k15.data import tokenizer as tokenizer_lib


def load_task(data, workdir: str, *, seed: int, model_vocab_size: int, hf_path: str = "", write: bool = True):
  """(tokenizer, train, eval) of a DataConfig (k15.config); hf_path: the start checkpoint (its tokenizer).

  write=False reads another run's workdir/data as it is and never writes there.
  """
  if data.source == "arith":
    tokenizer, train, eval_ = _arith_task(data, workdir, seed, write)
  else:
    tokenizer, train, eval_ = _prompt_files(data, workdir, seed, hf_path, write)
  tokenizer_lib.check_tokenizer_fits(tokenizer, model_vocab_size)
  return tokenizer, train, eval_


def arith_task_names(data_dir: str, target_field: str = "warmup") -> dict:
  """Registers the synthetic task's seqio Tasks of data_dir (names unique per directory and target field)."""
  from k15.data import tasks  # seqio (TensorFlow) only here, not at `import k15`
  tag = hashlib.sha1(f"{os.path.abspath(data_dir)}:{target_field}".encode()).hexdigest()[:8]
  return tasks.register_arith_tasks(data_dir, os.path.join(data_dir, "spm.model"), name_prefix=f"k15_arith_{tag}",
                                    target_field=target_field)


def _arith_task(data, workdir, seed, write):
  from k15.data import arith, tasks  # pylint: disable=g-import-not-at-top
  data_dir = storage.join(workdir, "data")
  if write and jax.process_index() == 0 and not checkpoint.is_complete(data_dir):
    with checkpoint.stage_dir(data_dir) as tmp:  # complete or absent: a killed run leaves no half a task
      arith.prepare_arith_data(tmp, data.n_train, data.n_eval, seed, tuple(data.levels), data.tokenizer_vocab_size,
                               data.direct_prob, tuple(data.level_shares))
  sharding.sync_processes("k15_arith_data")  # the other processes read what process 0 wrote
  with storage.local_copy(data_dir) as local:
    names = arith_task_names(local)
    train, eval_ = tasks.load_examples(names["train"]), tasks.load_examples(names["eval"])
    return tokenizer_lib.SentencePieceTokenizer(os.path.join(local, "spm.model")), train, eval_


def _example(prompt: dict, tokenizer, template: str, max_prompt_len: int, where: str) -> dict:
  ids = tokenizer.encode(template.format(question=prompt["question"]))
  if len(ids) > max_prompt_len:
    raise ValueError(f"{where}: prompt {prompt['id']!r} has {len(ids)} tokens > config.data.max_prompt_len="
                     f"{max_prompt_len}")
  return dict(prompt, inputs_ids=ids)


def _prompt_tokenizer(data, workdir, hf_path, write):
  path = data.tokenizer_path or hf_path  # a start checkpoint brings its tokenizer
  if path:
    return tokenizer_lib.load_tokenizer(path)
  data_dir = storage.join(workdir, "data")
  if write and jax.process_index() == 0 and not checkpoint.is_complete(data_dir):  # one writer in a multi-host run
    texts = []
    for f in data.tasks + data.eval_tasks:
      for p in prompts_lib.read_prompts(f.path, f.domain, f.field_map):
        texts += [data.template.format(question=p["question"]), p["answer"]]
    with checkpoint.stage_dir(data_dir) as tmp:
      tokenizer_lib.train_sentencepiece(texts, os.path.join(tmp, "spm"), data.tokenizer_vocab_size)
  sharding.sync_processes("k15_prompt_tokenizer")  # the other processes read what process 0 wrote
  with storage.local_copy(data_dir) as local:
    return tokenizer_lib.SentencePieceTokenizer(os.path.join(local, "spm.model"))


def _prompt_files(data, workdir, seed, hf_path, write):
  tokenizer = _prompt_tokenizer(data, workdir, hf_path, write)
  # Task names unique per file set, so two runs in one process do not replace each other's registrations.
  tag = hashlib.sha1(repr(sorted(repr((f.path, f.domain, f.field_map)) for f in data.tasks)).encode()).hexdigest()[:8]
  mixture = prompts_lib.register_prompt_mixture(
      f"{data.name}_{tag}", {f"{data.name}_{tag}_{i}": f for i, f in enumerate(data.tasks)},
      domain_rates=data.domain_rates or None)
  drawn = prompts_lib.load_prompts(mixture, data.num_train, seed=seed)
  train = [_example(d, tokenizer, data.template, data.max_prompt_len, f"mixture {mixture}") for d in drawn]
  eval_ = [_example(e, tokenizer, data.template, data.max_prompt_len, f.path)
           for f in data.eval_tasks for e in prompts_lib.read_prompts(f.path, f.domain, f.field_map)]
  return tokenizer, train, eval_
