"""RL prompts from local prompt files through a seqio Mixture (k15.data.prompts), as the loop's example dicts.

config.prompts (see experiments/configs/math_mixture.py):
  name           the Mixture's name
  tasks          list of {name, path, domain, field_map (optional)}: one seqio Task per file
  domain_rates   {domain: rate} across domains (empty: every task by its size)
  template       the prompt text around {question}
  num_train      prompts drawn from the Mixture at its rates (repeats allowed): the RL prompt pool
  eval_tasks     list of {path, domain, field_map (optional)}: held-out prompts, read whole
The tokenizer is config.data.tokenizer_path (SentencePiece .model or HF tokenizer.json), else the one of the
start checkpoint config.model.hf_path, else a SentencePiece vocabulary trained on the prompt files (tiny-model runs
only).
"""
import hashlib
import os

import jax

from k15 import sharding
from k15.data import prompts as prompts_lib
from k15.data import tokenizer as tokenizer_lib


def _example(prompt: dict, tokenizer, template: str, max_prompt_len: int, where: str) -> dict:
  ids = tokenizer.encode(template.format(question=prompt["question"]))
  if len(ids) > max_prompt_len:
    raise ValueError(f"{where}: prompt {prompt['id']!r} has {len(ids)} tokens > config.prompts.max_prompt_len="
                     f"{max_prompt_len}")
  return dict(prompt, inputs_ids=ids)


def _tokenizer(config, workdir, files):
  path = config.data.get("tokenizer_path") or config.model.get("hf_path")  # a start checkpoint brings its tokenizer
  if path:
    return tokenizer_lib.load_tokenizer(path)
  model_prefix = os.path.join(workdir, "data", "spm")
  if jax.process_index() == 0 and not os.path.exists(model_prefix + ".model"):  # one writer in a multi-host run
    texts = []
    for path, domain, field_map in files:
      for p in prompts_lib.read_prompts(path, domain, field_map):
        texts += [config.prompts.template.format(question=p["question"]), p["answer"]]
    tokenizer_lib.train_sentencepiece(texts, model_prefix, config.data.tokenizer_vocab_size)
  sharding.sync_processes("k15_prompt_tokenizer")  # the other processes read what process 0 wrote
  return tokenizer_lib.SentencePieceTokenizer(model_prefix + ".model")


def load_prompt_mixture(config, workdir):
  """(tokenizer, train examples drawn from the Mixture, held-out examples) for the RL loop."""
  p = config.prompts
  tasks = [dict(t) for t in p.tasks]
  files = [(t["path"], t.get("domain", "math"), t.get("field_map")) for t in tasks]
  evals = [(t["path"], t.get("domain", "math"), t.get("field_map")) for t in p.eval_tasks]
  if not tasks or not evals:
    raise ValueError("config.prompts.tasks and config.prompts.eval_tasks must each name at least one file")
  tokenizer = _tokenizer(config, workdir, files + evals)
  tokenizer_lib.check_tokenizer_fits(tokenizer, config.model.vocab_size)
  # Task names unique per file set, so two runs in one process do not replace each other's registrations.
  tag = hashlib.sha1(repr(sorted(map(repr, files))).encode()).hexdigest()[:8]
  mixture = prompts_lib.register_prompt_mixture({
      "name": f"{p.name}_{tag}",
      "tasks": [dict(t, name=f"{p.name}_{tag}_{i}") for i, t in enumerate(tasks)],
      "domain_rates": dict(p.domain_rates) or None,
      "template": "{question}",
  })
  drawn = prompts_lib.load_prompts(mixture, p.num_train, seed=config.seed)
  train = [_example(d, tokenizer, p.template, p.max_prompt_len, f"mixture {mixture}") for d in drawn]
  eval_ = [_example(e, tokenizer, p.template, p.max_prompt_len, path)
           for path, domain, field_map in evals for e in prompts_lib.read_prompts(path, domain, field_map)]
  return tokenizer, train, eval_
