"""Model-based rewards (the k1.5 report's reward models for math): a chain-of-thought judge and a value-head RM.

Both read (question, reference answer, response) through one prompt template and score with a k15 model whose
params are their own: frozen, never seen by the policy's optimizer, placed on the policy's mesh with its rules.
Any k15 model serves, including one loaded from a Hugging Face checkpoint (`load_judge` reads what
experiments/train_rm.py writes; `CoTJudge(models.load_hf(...), tokenizer)` takes any other).

  CoTJudge    generates reasoning and then a verdict line in JSON, {"correct": true} or {"correct": false}, through
              k15's sampler (greedy by default, a token cap). A missing, unparseable or repeated verdict scores 0 with
              its reason and counts in `failures`.
  ValueJudge  a scalar head on the last hidden state at the input's last token, trained with binary cross-entropy;
              the reward is p >= threshold, or the calibrated probability sigmoid(logit / temperature).

Both have `score(texts, examples) -> [RewardResult]` in the examples' order, like the rule-based pools, and
k15.rewards.verifiers.Verifier dispatches domains to them. Examples need "answer" and "question" (or the prompt's
"inputs_text").
"""
import dataclasses
import json
import os
import re
import time
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from k15 import models
from k15.rewards.math import RewardResult

# The judge's input; {response} is cut from the left when the whole would exceed max_input_tokens (the final answer
# is at the end of a response).
TEMPLATE = "Question: {question}\nReference answer: {reference}\nResponse: {response}\nJudge:\n"
VERDICT_TRUE, VERDICT_FALSE = '{"correct": true}', '{"correct": false}'
_OBJECT = re.compile(r"\{[^{}]*\}")  # one flat JSON object; a verdict has no nesting

JUDGE_KINDS = ("cot_rm", "value_rm")
VALUE_REWARDS = ("threshold", "probability")


# --- the CoT judge's verdict


def parse_verdict(text: str) -> tuple[Optional[bool], str]:
  """(verdict, reason) of a judge's output; verdict None when there is no single valid one.

  The verdict is a JSON object with a boolean "correct" field. Objects that do not mention "correct" are
  ignored (the reasoning may hold braces). Missing: (None, "no verdict"); an object that mentions "correct" but
  is not valid JSON with a boolean "correct": (None, "invalid verdict ..."); more than one: (None,
  "multiple verdicts"), even if they agree, so a judge cannot hedge.
  """
  found = [m.group(0) for m in _OBJECT.finditer(text) if "correct" in m.group(0)]
  if not found:
    return None, "no verdict"
  if len(found) > 1:
    return None, f"multiple verdicts ({len(found)})"
  try:
    obj = json.loads(found[0])
  except json.JSONDecodeError:
    return None, f"invalid verdict {found[0][:60]!r}"
  if not isinstance(obj, dict) or not isinstance(obj.get("correct"), bool):
    return None, f"invalid verdict {found[0][:60]!r}"
  return obj["correct"], "judged correct" if obj["correct"] else "judged wrong"


def verdict_line(correct: bool) -> str:
  return VERDICT_TRUE if correct else VERDICT_FALSE


# --- the judge's input


def question_of(example: Mapping) -> str:
  """The question of an example: its "question" field, else its prompt text without the synthetic task's template
  (that task's examples carry only the prompt)."""
  if "question" in example:
    return example["question"]
  from k15.data import arith  # pylint: disable=g-import-not-at-top
  prefix, suffix = arith.PROMPT_TEMPLATE.split("{question}")
  text = example["inputs_text"]
  if text.startswith(prefix) and text.endswith(suffix):
    return text[len(prefix):len(text) - len(suffix)]
  return text.strip()


def encode_input(tokenizer, template: str, question: str, reference: str, response: str,
                 max_input_tokens: int) -> list[int]:
  """The judge's input ids: the template around the response, the response's tokens cut from the left (an
  ellipsis marks the cut) when the whole would exceed max_input_tokens. Training and scoring both encode here."""
  before, after = template.split("{response}")
  head = tokenizer.encode(before.format(question=question, reference=reference))
  tail = tokenizer.encode(after.format(question=question, reference=reference))
  body = tokenizer.encode(response)
  room = max_input_tokens - len(head) - len(tail)
  if len(body) > room:
    dots = tokenizer.encode("...")
    if room <= len(dots):
      raise ValueError(f"the judge's template with question {question[:60]!r} and reference {reference[:40]!r} "
                       f"leaves {room} of max_input_tokens={max_input_tokens} tokens for the response")
    body = dots + body[len(body) - (room - len(dots)):]
  return head + body + tail


# --- the value head


def init_value_head(cfg: models.ModelConfig) -> dict:
  """A zero head: every input starts at p = 0.5."""
  return {"w_D": jnp.zeros((cfg.d_model,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def value_logits(cfg: models.ModelConfig, params, tokens_BxT, lengths_B):
  """The value RM's logit of each row: head(final-normed hidden state at the row's last token, lengths_B - 1).

  params: {"model": transformer params, "head": init_value_head's}.
  """
  h_BxTxD = models.hidden_states(cfg, params["model"], tokens_BxT)
  last_BxD = jnp.take_along_axis(h_BxTxD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  return last_BxD.astype(jnp.float32) @ params["head"]["w_D"] + params["head"]["b"]


def value_loss(logits_B, labels_B, weights_B=None):
  """Mean binary cross-entropy of sigmoid(logits) against 0/1 labels (weight-0 rows are padding); (loss, metrics)."""
  w = jnp.ones_like(logits_B) if weights_B is None else weights_B
  # -[y log s(z) + (1-y) log(1-s(z))] = softplus(z) - y z, stable for any z
  nll_B = jax.nn.softplus(logits_B) - labels_B * logits_B
  n = jnp.maximum(jnp.sum(w), 1e-12)
  loss = jnp.sum(w * nll_B) / n
  accuracy = jnp.sum(w * ((logits_B > 0) == (labels_B > 0.5))) / n
  return loss, {"loss": loss, "accuracy": accuracy}


def fit_temperature(logits, labels, grid=np.exp(np.linspace(np.log(0.05), np.log(20.0), 121))) -> float:
  """The temperature T minimizing the NLL of sigmoid(logit / T) on held-out (logit, label) pairs (a grid search)."""
  z, y = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
  nll = [np.mean(np.logaddexp(0, z / t) - y * z / t) for t in grid]
  return float(grid[int(np.argmin(nll))])


# --- judges


@dataclasses.dataclass(frozen=True)
class JudgeSpec:
  """How a judge reads and scores: written beside its weights by experiments/train_rm.py (judge.json)."""
  kind: str  # cot_rm | value_rm
  template: str = TEMPLATE
  max_input_tokens: int = 384  # the judge's input; a longer response keeps its end
  max_new_tokens: int = 64  # cot_rm: the cap on the judge's reasoning and verdict
  value_reward: str = "threshold"  # value_rm: "threshold" (p >= threshold) | "probability" (calibrated)
  threshold: float = 0.5  # value_rm
  temperature: float = 1.0  # value_rm: p = sigmoid(logit / temperature), fitted on held-out pairs

  def __post_init__(self):
    if self.kind not in JUDGE_KINDS:
      raise ValueError(f"JudgeSpec.kind must be one of {JUDGE_KINDS}, got {self.kind!r}")
    if self.value_reward not in VALUE_REWARDS:
      raise ValueError(f"JudgeSpec.value_reward must be one of {VALUE_REWARDS}, got {self.value_reward!r}")
    if "{response}" not in self.template or self.template.count("{response}") != 1:
      raise ValueError(f"JudgeSpec.template must hold {{response}} once, got {self.template!r}")
    for name in ("max_input_tokens", "max_new_tokens", "temperature"):
      if getattr(self, name) <= 0:
        raise ValueError(f"JudgeSpec.{name} must be positive, got {getattr(self, name)}")


class _Judge:
  """What both judges share: the judge's trainer on the policy's mesh, frozen params, input encoding, counters."""

  def __init__(self, model_cfg, params, tokenizer, spec: JudgeSpec, *, mesh=None, rules=None, sampling_rules=None):
    from k15 import sharding  # pylint: disable=g-import-not-at-top
    from k15.rl.trainer import Trainer  # pylint: disable=g-import-not-at-top
    mesh = mesh if mesh is not None else sharding.make_mesh({"data": -1}, jax.devices()[:1])
    self.trainer = Trainer(model_cfg, mesh, rules or sharding.DEFAULT_RULES, sampling_rules or sharding.SAMPLING_RULES)
    self.cfg, self.tokenizer, self.spec = model_cfg, tokenizer, spec
    self.failures = 0  # cot_rm: responses scored 0 for want of a single valid verdict, over every call
    self.time_s = 0.0  # wall time spent scoring, over every call
    self.calls = 0

  def _frozen(self, params):
    """The judge's own copy on the mesh: a donated or updated policy array is never one of these."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), self.trainer.place_params(params))

  def inputs(self, texts: Sequence[str], examples: Sequence[Mapping]) -> list[list[int]]:
    if len(texts) != len(examples):
      raise ValueError(f"{len(texts)} responses but {len(examples)} examples")
    s = self.spec
    return [encode_input(self.tokenizer, s.template, question_of(ex), str(ex["answer"]), t, s.max_input_tokens)
            for t, ex in zip(texts, examples)]

  def score(self, texts: Sequence[str], examples: Sequence[Mapping]) -> list[RewardResult]:
    start = time.perf_counter()
    out = self._score(texts, examples) if len(texts) else []
    self.time_s += time.perf_counter() - start
    self.calls += 1
    return out

  def close(self):
    pass


class CoTJudge(_Judge):
  """Greedy (by default) chain-of-thought judging through k15's sampler; reward 1 for {"correct": true}.

  rollout: a k15.config.RolloutConfig (the sampler's backend, slots, pages); temperature 0 is greedy.
  """

  def __init__(self, model_cfg, params, tokenizer, spec: JudgeSpec, rollout, *, mesh=None, rules=None,
               sampling_rules=None, temperature: float = 0.0, seed: int = 0):
    super().__init__(model_cfg, params, tokenizer, spec, mesh=mesh, rules=rules, sampling_rules=sampling_rules)
    self.params = self._frozen(params)
    self.rollout, self.temperature, self.seed = rollout, temperature, seed
    self.last_outputs: list[str] = []  # the judge's text of the latest call, for inspection

  def generate(self, prompts: Sequence[Sequence[int]]) -> list[str]:
    from k15.rl import rollout as rollout_lib  # pylint: disable=g-import-not-at-top
    ids = rollout_lib.generate_responses(self.trainer, self.params, prompts, self.tokenizer, self.rollout,
                                         temperature=self.temperature, max_new_tokens=self.spec.max_new_tokens,
                                         seed=self.seed)
    return [self.tokenizer.decode(r) for r in ids]

  def _score(self, texts, examples):
    self.last_outputs = self.generate(self.inputs(texts, examples))
    results = []
    for out in self.last_outputs:
      verdict, reason = parse_verdict(out)
      if verdict is None:
        self.failures += 1
        results.append(RewardResult(0.0, f"cot_rm: {reason}"))
      else:
        results.append(RewardResult(float(verdict), f"cot_rm: {reason}"))
    return results


class ValueJudge(_Judge):
  """A value-head RM: params {"model": ..., "head": ...}; scores in fixed-size row chunks, split over the mesh's
  data axes."""

  def __init__(self, model_cfg, params, tokenizer, spec: JudgeSpec, *, mesh=None, rules=None, sampling_rules=None,
               rows: int = 32):
    super().__init__(model_cfg, params["model"], tokenizer, spec, mesh=mesh, rules=rules,
                     sampling_rules=sampling_rules)
    from k15 import sharding  # pylint: disable=g-import-not-at-top
    head = jax.device_put(params["head"], sharding.replicated(self.trainer.mesh))
    self.params = {"model": self._frozen(params["model"]), "head": jax.tree.map(lambda x: jnp.array(x, copy=True),
                                                                                  head)}
    self.rows = rows
    self._fn = self.trainer.make_eval(lambda p, b: value_logits(model_cfg, p, b["tokens"], b["lengths"]))

  def logits(self, texts, examples) -> np.ndarray:
    from k15.rl.trainer import in_chunks  # pylint: disable=g-import-not-at-top
    ids = self.inputs(texts, examples)
    seq_len = 32 * -(-max(len(x) for x in ids) // 32)  # a few compiled shapes
    tokens = np.full((len(ids), seq_len), self.tokenizer.pad_id, np.int32)
    for i, x in enumerate(ids):
      tokens[i, :len(x)] = x
    lengths = np.array([len(x) for x in ids], np.int32)
    rows = min(self.rows, 8 * -(-len(ids) // 8))
    return in_chunks(self._fn, self.params, {"tokens": tokens, "lengths": lengths}, rows)

  def probabilities(self, texts, examples) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-self.logits(texts, examples) / self.spec.temperature))

  def _score(self, texts, examples):
    p = self.probabilities(texts, examples)
    if self.spec.value_reward == "probability":
      return [RewardResult(float(x), f"value_rm: p={x:.2f}") for x in p]
    return [RewardResult(float(x >= self.spec.threshold), f"value_rm: p {'>=' if x >= self.spec.threshold else '<'} "
                         f"{self.spec.threshold:g}") for x in p]


# --- saving and loading what experiments/train_rm.py trains


def save_judge(path: str, spec: JudgeSpec, model_cfg, params, tokenizer_path: str):
  """A judge directory: the transformer as a Hugging Face checkpoint, the value head (value_rm) in head.npz, the
  tokenizer (tokenizer.model) and judge.json (the JudgeSpec); written whole or not at all."""
  import shutil  # pylint: disable=g-import-not-at-top
  from k15 import checkpoint  # pylint: disable=g-import-not-at-top
  model_params = params["model"] if spec.kind == "value_rm" else params
  checkpoint.assert_finite(params, path)
  with checkpoint.stage_dir(path) as tmp:
    models.save_hf(tmp, model_cfg, jax.device_get(model_params))
    if spec.kind == "value_rm":
      np.savez(os.path.join(tmp, "head.npz"), **{k: np.asarray(v) for k, v in jax.device_get(params["head"]).items()})
    shutil.copy(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
    with open(os.path.join(tmp, "judge.json"), "w") as f:
      json.dump(dataclasses.asdict(spec), f, indent=2)


def load_judge_files(path: str, **spec_overrides):
  """(spec, model_cfg, params, tokenizer) of a judge directory (save_judge's)."""
  from k15 import checkpoint  # pylint: disable=g-import-not-at-top
  from k15.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(path, "judge.json")) as f:
    spec = JudgeSpec(**{**json.load(f), **spec_overrides})
  model_cfg, params = checkpoint.load_hf(path)
  if spec.kind == "value_rm":
    with np.load(os.path.join(path, "head.npz")) as head:
      params = {"model": params, "head": {k: head[k] for k in head.files}}
  return spec, model_cfg, params, tokenizer_lib.load_tokenizer(os.path.join(path, "tokenizer.model"))


def load_judge(path: str, *, rollout=None, mesh=None, rules=None, sampling_rules=None, **spec_overrides):
  """The judge saved at path (a CoTJudge needs the sampler's RolloutConfig), on the mesh with the rules."""
  spec, model_cfg, params, tokenizer = load_judge_files(path, **spec_overrides)
  kw = dict(mesh=mesh, rules=rules, sampling_rules=sampling_rules)
  if spec.kind == "cot_rm":
    if rollout is None:
      raise ValueError(f"{path} is a cot_rm judge: it samples, so load_judge needs rollout (a RolloutConfig)")
    return CoTJudge(model_cfg, params, tokenizer, spec, rollout, **kw)
  return ValueJudge(model_cfg, params, tokenizer, spec, **kw)
