"""RL prompt sets from files (JSONL or Parquet; local paths or URLs, k15.storage), as seqio Tasks and a Mixture across domains.

One prompt: question, reference answer (math) and/or test cases (code, see k15.rewards.code), an optional
difficulty label (int; MATH's "Level 3" reads as 3) and a domain. Source files may name fields differently;
`field_map` maps ours to theirs ({"question": "problem", "answer": "solution"} for MATH).

Reading is plain Python, so curation and tests need no TensorFlow; seqio (5-10 s to import) is imported only by
the functions that register or read Tasks.
"""
import functools
import hashlib
import json
import re
from typing import Any, Iterator, Mapping, Optional, Sequence

from k15 import storage
from k15.data import jsonl

FIELDS = ("id", "question", "answer", "difficulty", "domain", "test_cases")
NO_DIFFICULTY = -1  # the difficulty of an unlabelled prompt inside TF datasets (Python uses None)
_LEVEL = re.compile(r"(?:level\s*)?(\d+)", re.IGNORECASE)


def prompt_id(question: str) -> str:
  """Stable across files and runs: a hash of the question."""
  return "prompt-" + hashlib.sha1(question.encode()).hexdigest()[:12]


def _difficulty(value: Any, where: str) -> Optional[int]:
  if value is None:
    return None
  if isinstance(value, int) and not isinstance(value, bool):
    return value
  if isinstance(value, str) and _LEVEL.fullmatch(value.strip()):
    return int(_LEVEL.fullmatch(value.strip()).group(1))
  raise ValueError(f"{where}: difficulty must be an int or 'Level N', got {value!r}")


def _test_cases(value: Any, where: str) -> list[dict]:
  if value is None or value == "":
    return []
  if isinstance(value, str):  # APPS/TACO-style files store them as a JSON string
    try:
      value = json.loads(value)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: test_cases is not valid JSON: {e}") from e
  if not isinstance(value, list):
    raise ValueError(f"{where}: test_cases must be a list, got {type(value).__name__}")
  for i, case in enumerate(value):
    ok = isinstance(case, dict) and ({"input", "output"} <= case.keys() or {"fn_name", "expected"} <= case.keys())
    if not ok:
      raise ValueError(f"{where}: test case {i} needs input and output, or fn_name and expected: {case!r}")
  return value


def normalize(raw: Mapping[str, Any], where: str, domain: str, field_map: Optional[Mapping[str, str]] = None) -> dict:
  """One source record as a prompt dict with exactly FIELDS; `where` ("file:line") prefixes every error."""
  if not isinstance(raw, Mapping):
    raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
  fm = dict(field_map or {})
  get = lambda field: raw.get(fm.get(field, field))  # noqa: E731
  question = get("question")
  if not isinstance(question, str) or not question.strip():
    raise ValueError(f"{where}: missing or empty question (field {fm.get('question', 'question')!r})")
  answer = get("answer")
  answer = "" if answer is None else str(answer)
  tests = _test_cases(get("test_cases"), where)
  if not answer and not tests:
    raise ValueError(f"{where}: a prompt needs a reference answer or test cases")
  return dict(id=str(get("id") or prompt_id(question)), question=question, answer=answer,
              difficulty=_difficulty(get("difficulty"), where), domain=str(get("domain") or domain), test_cases=tests)


def _raw_records(path: str) -> Iterator[tuple[str, Any]]:
  """(location, record) pairs; a malformed JSONL line raises naming the file and line."""
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    with storage.open(path, "rb") as f:
      table = pq.read_table(f)
    for row, record in enumerate(table.to_pylist(), start=1):
      yield f"{path}:row {row}", record
    return
  if not path.endswith(".jsonl"):
    raise ValueError(f"{path}: unknown prompt file type (expected .jsonl or .parquet)")
  yield from jsonl.records(path)


def read_prompts(path: str, domain: str = "math", field_map: Optional[Mapping[str, str]] = None) -> list[dict]:
  """Every prompt of a .jsonl or .parquet file, normalized (see `normalize`)."""
  prompts = [normalize(raw, where, domain, field_map) for where, raw in _raw_records(path)]
  if not prompts:
    raise ValueError(f"{path}: no prompts")
  return prompts


write_jsonl = jsonl.write


# ---- seqio: everything below imports TensorFlow on first call ----

def _dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None, *, path: str, own_split: str,
                domain: str, field_map: Optional[Mapping[str, str]], template: str):
  del shuffle_files, seed  # one small file: the Task shuffles examples itself
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if split != own_split:
    raise ValueError(f"split {split!r} unknown; this task reads {path} as split {own_split!r}")
  prompts = read_prompts(path, domain, field_map)  # eager: a bad line fails here with its file and line
  columns = {k: [p[k] for p in prompts] for k in ("id", "question", "answer", "domain")}
  columns["inputs"] = [template.format(question=p["question"]) for p in prompts]
  columns["test_cases"] = [json.dumps(p["test_cases"]) for p in prompts]
  columns["difficulty"] = tf.constant(
      [NO_DIFFICULTY if p["difficulty"] is None else p["difficulty"] for p in prompts], tf.int32)
  return tf.data.Dataset.from_tensor_slices(columns)


def _output_features(spm_path: Optional[str]):
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if spm_path:  # token ids, with the text kept as inputs_pretokenized
    return {"inputs": seqio.Feature(seqio.SentencePieceVocabulary(spm_path), add_eos=False)}
  return {"inputs": seqio.Feature(seqio.PassThroughVocabulary(0), add_eos=False, dtype=tf.string, rank=0)}


def register_prompt_task(name: str, path: str, domain: str = "math", field_map: Optional[Mapping[str, str]] = None,
                         template: str = "{question}", spm_path: Optional[str] = None, split: str = "train") -> str:
  """Registers (or replaces) a seqio Task over one prompt file; "inputs" is `template` filled with the question."""
  import seqio  # pylint: disable=g-import-not-at-top
  if not storage.exists(path):
    raise FileNotFoundError(path)
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(
          functools.partial(_dataset_fn, path=path, own_split=split, domain=domain, field_map=field_map,
                            template=template), splits=[split]),
      output_features=_output_features(spm_path),
      preprocessors=[seqio.preprocessors.tokenize] if spm_path else [])
  return name


def mixture_rates(task_sizes: Mapping[str, int], task_domains: Mapping[str, str],
                  domain_rates: Optional[Mapping[str, float]]) -> dict[str, float]:
  """Each domain's rate split over its tasks in proportion to their sizes; no domain_rates = all by size."""
  if not domain_rates:
    return {t: float(n) for t, n in task_sizes.items()}
  domains = set(task_domains.values())
  if set(domain_rates) != domains:
    raise ValueError(f"domain_rates cover {sorted(domain_rates)} but the tasks' domains are {sorted(domains)}")
  if any(r < 0 for r in domain_rates.values()) or sum(domain_rates.values()) <= 0:
    raise ValueError(f"domain rates must be >= 0 with a positive sum, got {dict(domain_rates)}")
  total = {d: sum(n for t, n in task_sizes.items() if task_domains[t] == d) for d in domains}
  return {t: domain_rates[task_domains[t]] * n / total[task_domains[t]] for t, n in task_sizes.items()}


def register_prompt_mixture(name: str, tasks: Mapping[str, Any], *, domain_rates: Optional[Mapping[str, float]] = None,
                            template: str = "{question}", spm_path: Optional[str] = None) -> str:
  """Registers a Task per prompt file and a Mixture over them; returns the mixture's name.

  tasks: {task name: prompt file}, each with .path, .domain and .field_map (k15.config.PromptFile);
  domain_rates: {domain: rate} (None: each task by its size); spm_path is shared by all tasks (a Mixture's tasks
  share their features).
  """
  import seqio  # pylint: disable=g-import-not-at-top
  sizes, domains = {}, {}
  for task_name, f in tasks.items():
    register_prompt_task(task_name, f.path, f.domain, f.field_map, template, spm_path)
    sizes[task_name] = len(read_prompts(f.path, f.domain, f.field_map))
    domains[task_name] = f.domain
  rates = mixture_rates(sizes, domains, domain_rates)
  seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, [(t, r) for t, r in rates.items() if r > 0])
  return name


def load_prompts(name: str, num_examples: int, seed: int = 0, split: str = "train") -> list[dict]:
  """`num_examples` prompts drawn from a registered Task or Mixture (repeating, shuffled with `seed`), as plain
  Python dicts with FIELDS plus "inputs" (text, or token ids when the task has a vocabulary)."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  provider = seqio.get_mixture_or_task(name)
  # A Mixture keeps only the output features unless told; a Task keeps everything (and takes no such argument).
  extra = {"passthrough_features": list(FIELDS)} if isinstance(provider, seqio.Mixture) else {}
  ds = provider.get_dataset(None, split=split, shuffle=True, seed=seed, num_epochs=None, **extra)
  out = []
  for ex in tfds.as_numpy(ds.take(num_examples)):
    p = {k: ex[k].decode() for k in ("id", "question", "answer", "domain")}
    p["difficulty"] = None if ex["difficulty"] == NO_DIFFICULTY else int(ex["difficulty"])
    p["test_cases"] = json.loads(ex["test_cases"].decode())
    p["inputs"] = ex["inputs"].decode() if isinstance(ex["inputs"], bytes) else ex["inputs"].tolist()
    out.append(p)
  return out
