"""Typed, frozen configs of a k15 run, built and checked once from the experiment's ConfigDict.

An entry point (experiments/train.py, experiments/long2short.py, the ablation notebook) calls
`from_config_dict(config)`; below it the library reads typed fields only. Each section checks its values in
`__post_init__`, so a bad value stops the run before any work, with an error naming the field
(`config.rl.tau: must be > 0, got 0.0`). What each field means is written next to it in the experiment config
files (experiments/configs/*.py).
"""
import dataclasses
import difflib
import os
import re
import typing
from typing import Any, Mapping, Optional, Union

from k15.models import ModelConfig
from k15.rewards.verifiers import DOMAINS as REWARD_DOMAINS
from k15.rewards.verifiers import METHODS as REWARD_METHODS
from k15.rewards.verifiers import REWARDS
from k15.rl.losses import POLICY_LOSSES
from k15.rl.prompt_sampler import CurriculumStage, stages_from_config

OPTIMIZERS = ("adam", "sgd", "momentum")  # k15.rl.loop.rl_optimizer
# Long2short variants and the variants each is built from (which must come before it); besides these,
# "rl_<start>" is long2short RL from the variant <start>.
LONG2SHORT_DEPENDS = {"long": (), "short": (), "merge": ("long", "short"), "merge_rs": ("merge",), "dpo": ("long",)}
SHORT_INITS = ("long", "warmup", "scratch")


class ConfigError(ValueError):
  """A config that cannot run; the message starts with the full key, e.g. config.rl.tau."""


class _FieldError(ValueError):
  """Raised by a section's checks; from_config_dict prefixes the section's path."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field, self.message = field, message


def _check(ok: bool, field: str, message: str):
  if not ok:
    raise _FieldError(field, message)


def _at_least(section, minimum, *names):
  for name in names:
    value = getattr(section, name)
    _check(value >= minimum, name, f"must be >= {minimum}, got {value!r}")


def _positive(section, *names):
  for name in names:
    value = getattr(section, name)
    _check(value > 0, name, f"must be > 0, got {value!r}")


def _one_of(section, name, valid):
  value = getattr(section, name)
  _check(value in valid, name, f"must be one of {list(valid)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes within a slice; one may be -1 (the rest of the slice's devices). dcn_data: slices (multi-slice
  runs) that the 'data' axis spans, data parallel over the data-center network (k15.sharding.device_array)."""
  data: int
  fsdp: int
  tensor: int
  dcn_data: int

  def __post_init__(self):
    for name, size in self.sizes().items():
      _check(size == -1 or size >= 1, name, f"must be >= 1 or -1 (the rest of the devices), got {size}")
    _check(list(self.sizes().values()).count(-1) <= 1, "data", "at most one mesh axis may be -1")
    _at_least(self, 1, "dcn_data")

  def sizes(self) -> dict:
    return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
  logical_axis_rules: tuple  # ((logical axis, mesh axis or axes or None), ...) of training
  sampling_rules: tuple  # the same of sampling (the params move to this layout once per rollout phase)

  def __post_init__(self):
    from k15.sharding import MESH_AXES  # pylint: disable=g-import-not-at-top
    for name in ("logical_axis_rules", "sampling_rules"):
      for rule in getattr(self, name):
        _check(len(rule) == 2 and isinstance(rule[0], str), name,
               f"each rule is a (logical axis, mesh axes) pair, got {rule!r}")
        axes = () if rule[1] is None else (rule[1],) if isinstance(rule[1], str) else tuple(rule[1])
        _check(all(a in MESH_AXES for a in axes), name, f"rule {rule!r} names a mesh axis outside {list(MESH_AXES)}")


@dataclasses.dataclass(frozen=True)
class ArithDataConfig:
  """The synthetic arithmetic task (k15/data/arith.py), generated into the workdir."""
  source: str  # "arith"
  n_train: int
  n_eval: int
  levels: tuple[int, ...]
  level_shares: tuple[float, ...]  # () : an even spread over levels
  tokenizer_vocab_size: int
  direct_prob: float

  def __post_init__(self):
    from k15.data.arith import LEVELS  # pylint: disable=g-import-not-at-top
    _at_least(self, 1, "n_train", "n_eval")
    _check(bool(self.levels) and set(self.levels) <= set(LEVELS), "levels",
           f"must be a non-empty subset of {sorted(LEVELS)}, got {self.levels}")
    shares = self.level_shares
    _check(not shares or (len(shares) == len(self.levels) and min(shares) >= 0 and sum(shares) > 0), "level_shares",
           f"must be () or one share >= 0 per level of {self.levels}, not all 0; got {shares}")
    _at_least(self, 16, "tokenizer_vocab_size")
    _check(0.0 <= self.direct_prob <= 1.0, "direct_prob", f"must be in [0, 1], got {self.direct_prob}")


@dataclasses.dataclass(frozen=True)
class PromptFile:
  """One prompt file (JSONL or Parquet, k15/data/prompts.py)."""
  path: str
  domain: str  # verifier of its prompts: arith | math | code
  field_map: Optional[dict] = None  # {our field: the file's field}; None: the file uses our names

  def __post_init__(self):
    _one_of(self, "domain", REWARD_DOMAINS)


@dataclasses.dataclass(frozen=True)
class PromptDataConfig:
  """RL prompts from files through a seqio Mixture (k15/data/sources.py)."""
  source: str  # "prompts"
  name: str
  tasks: tuple[PromptFile, ...]
  domain_rates: dict
  template: str
  num_train: int
  max_prompt_len: int
  eval_tasks: tuple[PromptFile, ...]
  tokenizer_path: str
  tokenizer_vocab_size: int

  def __post_init__(self):
    _check(bool(self.tasks), "tasks", "must name at least one prompt file")
    _check(bool(self.eval_tasks), "eval_tasks", "must name at least one prompt file")
    _check("{question}" in self.template, "template", f"must contain {{question}}, got {self.template!r}")
    _check(all(d in REWARD_DOMAINS and r > 0 for d, r in self.domain_rates.items()), "domain_rates",
           f"must map domains of {list(REWARD_DOMAINS)} to positive rates, got {self.domain_rates}")
    _at_least(self, 1, "num_train", "max_prompt_len")
    _at_least(self, 16, "tokenizer_vocab_size")


DataConfig = Union[ArithDataConfig, PromptDataConfig]
DATA_SOURCES = {"arith": ArithDataConfig, "prompts": PromptDataConfig}


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """Supervised fine-tuning (the long-CoT warm-up; long2short's short-CoT SFT and rejection-sampling SFT)."""
  steps: int
  batch_size: int
  learning_rate: float
  warmup_steps: int

  def __post_init__(self):
    _at_least(self, 0, "steps", "warmup_steps")
    _at_least(self, 1, "batch_size")
    _positive(self, "learning_rate")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """How the rollout engine samples (config.sampling); k15.rl.rollout.sampling_config makes a SamplingConfig."""
  temperature: float
  top_p: float
  top_k: int
  chunk_size: int
  num_slots: int
  repeat_ngram: int
  repeat_count: int
  page_size: int
  num_pages: int
  backend: str  # "model" or a plug-in module (k15.sampling.load_backend)
  backend_options: dict  # the plug-in's make_backend options

  def __post_init__(self):
    _positive(self, "temperature")  # rollouts sample: k greedy responses to a prompt would all be the same
    _at_least(self, 1, "num_slots")
    from k15.rl import rollout  # pylint: disable=g-import-not-at-top
    try:  # the sampler's own checks of the rest
      rollout.sampling_config(self, eos_id=0, max_length=2, max_new_tokens=1, temperature=self.temperature)
    except ValueError as e:
      named = re.search(r"SamplingConfig\.(\w+)", str(e))
      raise _FieldError(named.group(1) if named else "temperature", str(e)) from None


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """The verifiers (k15.rewards.verifiers.Verifier)."""
  default_domain: str
  math_timeout_s: float
  math_workers: int
  sandbox_allow_unisolated: bool  # code rewards without namespaces where the machine forbids them
  rm_path: str  # the reward models' directory (experiments/train_rm.py's workdir): cot_rm/, value_rm/; "": none
  mix: dict  # rl.reward="mix": {domain: rules | cot_rm | value_rm}; domains left out use the rules

  def __post_init__(self):
    _one_of(self, "default_domain", REWARD_DOMAINS)
    _positive(self, "math_timeout_s")
    _at_least(self, 1, "math_workers")
    _check(all(d in REWARD_DOMAINS and m in REWARD_METHODS for d, m in self.mix.items()), "mix",
           f"must map domains of {list(REWARD_DOMAINS)} to methods of {list(REWARD_METHODS)}, got {self.mix}")

  def judges_needed(self, reward: str) -> tuple:
    """The judges (cot_rm, value_rm) that config.rl.reward uses."""
    from k15.rewards.verifiers import methods_by_domain  # pylint: disable=g-import-not-at-top
    return tuple(sorted({m for m in methods_by_domain(reward, self.mix).values() if m != "rules"}))


@dataclasses.dataclass(frozen=True)
class LengthStage:
  """From iteration `from_iteration` on, the response cap and the per-iteration token budget are these."""
  from_iteration: int
  max_response_len: int
  token_budget: int


def _length_stages(entries) -> tuple:
  """LengthStages from config entries: (from_iteration, max_response_len, token_budget) triples, mappings of those
  names, or LengthStages; in order of increasing from_iteration, from iteration 2 on (iteration 1 takes
  rl.max_response_len and rl.token_budget)."""
  stages = []
  for i, entry in enumerate(entries):
    field = f"length_schedule[{i}]"
    try:
      stage = (entry if isinstance(entry, LengthStage) else
               LengthStage(**entry) if isinstance(entry, Mapping) else LengthStage(*entry))
    except TypeError:
      raise _FieldError(field, f"expected (from_iteration, max_response_len, token_budget), got {entry!r}") from None
    for name, minimum in (("from_iteration", 2), ("max_response_len", 1), ("token_budget", 1)):
      value = getattr(stage, name)
      _check(isinstance(value, int) and not isinstance(value, bool), f"{field}.{name}",
             f"expected int, got {type(value).__name__} {value!r}")
      _check(value >= minimum, f"{field}.{name}", f"must be >= {minimum}, got {value}")
    if stages:
      _check(stage.from_iteration > stages[-1].from_iteration, f"{field}.from_iteration",
             f"must exceed the previous stage's {stages[-1].from_iteration}, got {stage.from_iteration}")
    stages.append(stage)
  return tuple(stages)


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """The k1.5 iteration (k15.rl.loop); curriculum: stages, as (until iteration, levels) pairs in the config.
  length_schedule: stages that replace max_response_len and token_budget from an iteration on (`lengths_at`)."""
  iterations: int
  prompts_per_iteration: int
  samples_per_prompt: int
  token_budget: int
  max_response_len: int
  length_schedule: tuple[LengthStage, ...]
  minibatches: int
  optimizer: str
  learning_rate: float
  adam_eps: float
  max_grad_norm: float
  reset_optimizer: bool
  loss: str
  tau: float
  log_ratio: str
  baseline: str
  form: str
  mask_old_segments: bool
  partial_rollouts: bool
  length_penalty_weight: float
  length_penalty_warmup: int
  repeat_penalty: float
  curriculum: tuple[CurriculumStage, ...]
  prioritized: bool
  priority_floor: float
  priority_ema: float
  max_bad_steps: int
  pack: bool  # training rows packed with several samples each (sequence packing); False: a sample per row
  reward: str  # what scores the responses: rules | cot_rm | value_rm | mix (config.reward.mix)

  def __post_init__(self):
    _one_of(self, "reward", REWARDS)
    _at_least(self, 1, "iterations", "prompts_per_iteration", "samples_per_prompt", "token_budget",
              "max_response_len", "minibatches")
    _at_least(self, 0, "max_bad_steps")
    _check(self.minibatches <= self.prompts_per_iteration, "minibatches",
           f"{self.minibatches} gradient steps cannot each take whole groups of {self.prompts_per_iteration} prompts")
    _one_of(self, "optimizer", OPTIMIZERS)
    _positive(self, "learning_rate", "adam_eps", "max_grad_norm", "tau")
    _one_of(self, "loss", POLICY_LOSSES)
    _one_of(self, "log_ratio", ("sequence", "token"))
    _one_of(self, "baseline", ("mean", "logmeanexp"))
    _one_of(self, "form", ("gradient", "squared"))
    _check(self.samples_per_prompt >= 2 or self.loss == "rest", "samples_per_prompt",
           f"must be >= 2 for loss {self.loss!r}: one sample is its own group baseline, so its advantage is 0 "
           "and nothing is learned")
    _at_least(self, 0, "length_penalty_weight", "length_penalty_warmup", "priority_floor")
    _check(0.0 <= self.priority_ema < 1.0, "priority_ema", f"must be in [0, 1), got {self.priority_ema}")
    try:
      object.__setattr__(self, "curriculum", tuple(stages_from_config(self.curriculum)))
    except (TypeError, ValueError) as e:
      raise _FieldError("curriculum", str(e)) from None
    object.__setattr__(self, "length_schedule", _length_stages(self.length_schedule))

  def lengths_at(self, iteration: int) -> tuple:
    """(max_response_len, token_budget) of an iteration (counted from 1) under the length schedule."""
    lengths = (self.max_response_len, self.token_budget)
    for stage in self.length_schedule:
      if iteration >= stage.from_iteration:
        lengths = (stage.max_response_len, stage.token_budget)
    return lengths

  def longest_lengths(self) -> tuple:
    """(max_response_len, token_budget) of the run's longest responses (stages after rl.iterations not counted):
    the rollout engine's cache is sized for them once."""
    reached = [self.lengths_at(1)] + [self.lengths_at(s.from_iteration) for s in self.length_schedule
                                      if s.from_iteration <= self.iterations]
    return max(reached, key=lambda lengths: lengths[0])


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Held-out evaluation; a temperature of 0 is greedy decoding."""
  temperature: float
  sampled_temperature: float  # 0: no sampled evaluation
  every: int  # RL iterations between evaluations; 0: after RL only
  max_response_len: int

  def __post_init__(self):
    _at_least(self, 0, "temperature", "sampled_temperature", "every")
    _at_least(self, 1, "max_response_len")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int  # RL iterations between checkpoints
  keep: int  # checkpoints kept

  def __post_init__(self):
    _at_least(self, 1, "every", "keep")


@dataclasses.dataclass(frozen=True)
class TPUConfig:
  accelerator_type: str  # the slice the mesh is for, e.g. v5p-32 (experiments/plan.py reads its chip facts)


@dataclasses.dataclass(frozen=True)
class DPOConfig(SFTConfig):
  """DPO training (long2short): SFTConfig's optimizer settings, beta and the rule for long negatives."""
  beta: float
  long_factor: float

  def __post_init__(self):
    super().__post_init__()
    _at_least(self, 1, "steps")
    _positive(self, "beta")
    _at_least(self, 1.0, "long_factor")


def long2short_start(variant: str) -> Optional[str]:
  """The variant an "rl_<start>" variant starts from; None for the other variants."""
  start = variant[3:] if variant.startswith("rl_") else None
  return start if start in LONG2SHORT_DEPENDS else None


def long2short_needs(variant: str) -> tuple:
  start = long2short_start(variant)
  return (start,) if start else LONG2SHORT_DEPENDS[variant]


@dataclasses.dataclass(frozen=True)
class Long2ShortConfig:
  """Long2short (experiments/long2short.py). rl is the main job's RL with config.long2short.rl's fields replaced;
  a stage's settings are needed only when its variant is listed (short: short_init and short; merge:
  merge_weights; merge_rs: rs; dpo: dpo)."""
  variants: tuple[str, ...]
  sample_prompts: int
  samples_per_prompt: int
  sample_max_len: int
  rl: RLConfig
  short_init: Optional[str] = None
  short: Optional[SFTConfig] = None
  merge_weights: Optional[tuple[float, float]] = None
  rs: Optional[SFTConfig] = None
  dpo: Optional[DPOConfig] = None

  def __post_init__(self):
    v = self.variants
    unknown = [x for x in v if x not in LONG2SHORT_DEPENDS and not long2short_start(x)]
    _check(not unknown, "variants", f"unknown {unknown}; valid: {list(LONG2SHORT_DEPENDS)} and rl_<one of them>")
    _check("long" in v, "variants", "must include 'long': every variant is compared with it")
    _check(len(set(v)) == len(v), "variants", f"repeats a name: {v}")
    for i, x in enumerate(v):
      missing = [d for d in long2short_needs(x) if d not in v[:i]]
      _check(not missing, "variants", f"{x!r} is built from {missing}, which must come before it")
    for variant, fields in (("short", ("short_init", "short")), ("merge", ("merge_weights",)), ("merge_rs", ("rs",)),
                            ("dpo", ("dpo",))):
      for name in fields:
        _check(variant not in v or getattr(self, name) is not None, name, f"variant {variant!r} needs it")
    _at_least(self, 1, "sample_prompts", "sample_max_len")
    _at_least(self, 2, "samples_per_prompt")  # to choose among responses
    if self.short_init is not None:
      _one_of(self, "short_init", SHORT_INITS)
    w = self.merge_weights
    _check(w is None or (min(w) >= 0 and abs(sum(w) - 1.0) <= 1e-6), "merge_weights",
           f"must be non-negative and sum to 1, got {w}")


@dataclasses.dataclass(frozen=True)
class Config:
  """A whole run. model.hf_path (a Hugging Face checkpoint to start from; "" = random init) becomes hf_path."""
  seed: int
  model: ModelConfig
  hf_path: str
  mesh: MeshConfig
  sharding: ShardingConfig
  data: DataConfig
  sft: SFTConfig
  sampling: RolloutConfig
  reward: RewardConfig
  rl: RLConfig
  eval: EvalConfig
  checkpoint: CheckpointConfig
  tpu: Optional[TPUConfig] = None  # TPU configs only
  long2short: Optional[Long2ShortConfig] = None  # configs with a long2short stage only

  def __post_init__(self):
    _at_least(self, 0, "seed")
    if self.data.source == "arith" or not (self.data.tokenizer_path or self.hf_path):  # a trained SentencePiece
      _check(self.data.tokenizer_vocab_size <= self.model.vocab_size, "data.tokenizer_vocab_size",
             f"{self.data.tokenizer_vocab_size} exceeds model.vocab_size={self.model.vocab_size}")
    for rl in (self.rl,) + ((self.long2short.rl,) if self.long2short else ()):
      _check(not self.reward.judges_needed(rl.reward) or bool(self.reward.rm_path), "reward.rm_path",
             f"rl.reward={rl.reward!r} scores with {list(self.reward.judges_needed(rl.reward))}: name the reward "
             "models' directory (python -m experiments.train_rm --workdir=...)")
    if self.long2short and "short" in self.long2short.variants:
      _check(self.data.source == "arith", "long2short.variants",
             "'short' trains on the synthetic task's short traces; prompt files have none")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RMDataConfig:
  """Labelled (question, reference, response, correct) pairs on the synthetic task (k15/data/rm_data.py)."""
  n_train: int  # training pairs
  # distinct problems the pairs draw on (0: n_train + n_eval, within the levels' capacity); fixing it keeps the
  # held-out pairs the same when n_train grows (more pairs per training problem)
  n_problems: int
  n_eval: int  # held-out pairs (of problems no training pair uses)
  n_calibration: int  # training pairs kept out of training: the value RM's temperature is fitted on them
  levels: tuple[int, ...]
  tokenizer_vocab_size: int

  def __post_init__(self):
    from k15.data.arith import LEVELS  # pylint: disable=g-import-not-at-top
    _at_least(self, 1, "n_train", "n_eval", "n_calibration")
    _check(self.n_calibration < self.n_train, "n_calibration", f"must be < n_train={self.n_train}")
    _check(self.n_problems == 0 or self.n_problems >= 3 * self.n_eval, "n_problems",
           f"must be 0 or at least 3 x n_eval={3 * self.n_eval} (the held-out problems are at most a third)")
    _check(bool(self.levels) and set(self.levels) <= set(LEVELS), "levels",
           f"must be a non-empty subset of {sorted(LEVELS)}, got {self.levels}")
    _at_least(self, 16, "tokenizer_vocab_size")


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
  """How the judges read and score (k15.rewards.reward_model.JudgeSpec, saved beside their weights)."""
  template: str  # holds {question}, {reference} and {response}
  max_input_tokens: int
  max_new_tokens: int  # the CoT judge's cap
  value_reward: str  # threshold | probability
  threshold: float

  def __post_init__(self):
    from k15.rewards import reward_model  # pylint: disable=g-import-not-at-top
    for field in ("{question}", "{reference}", "{response}"):
      _check(field in self.template, "template", f"must contain {field}, got {self.template!r}")
    _at_least(self, 1, "max_input_tokens", "max_new_tokens")
    _one_of(self, "value_reward", reward_model.VALUE_REWARDS)
    _check(0.0 < self.threshold < 1.0, "threshold", f"must be in (0, 1), got {self.threshold}")


@dataclasses.dataclass(frozen=True)
class RMTrainConfig:
  """Reward-model training (experiments/train_rm.py): the CoT RM is SFT, the value RM a classifier."""
  seed: int
  rms: tuple[str, ...]  # which to train: cot_rm, value_rm
  model: ModelConfig  # both judges' transformer
  mesh: MeshConfig
  sharding: ShardingConfig
  data: RMDataConfig
  judge: JudgeConfig
  cot: SFTConfig
  value: SFTConfig
  sampling: RolloutConfig  # the CoT judge's sampler (greedy)
  math_timeout_s: float  # the comparison's math-verify pool
  value_init: str  # the value RM's transformer at the start: scratch | cot_rm (the trained CoT RM's)
  cot_init: str  # the CoT RM's params at the start: scratch | a CoT judge's directory (train_rm's <workdir>/cot_rm)
  cot_judging_weight: float  # the CoT RM's loss weight of the tokens after its first line (value, match, verdict)
  cot_trace: str  # the CoT RM's target style (k15.data.rm_data.TRACES): value | steps

  def __post_init__(self):
    from k15.rewards import reward_model  # pylint: disable=g-import-not-at-top
    _check(bool(self.rms) and set(self.rms) <= set(reward_model.JUDGE_KINDS), "rms",
           f"must be a non-empty subset of {list(reward_model.JUDGE_KINDS)}, got {self.rms}")
    _one_of(self, "value_init", ("scratch", "cot_rm"))
    _check(self.cot_init == "scratch" or os.path.isdir(self.cot_init), "cot_init",
           f"must be 'scratch' or a CoT judge's directory; {self.cot_init!r} is not a directory")
    _positive(self, "cot_judging_weight")
    from k15.data.rm_data import TRACES  # pylint: disable=g-import-not-at-top
    _one_of(self, "cot_trace", TRACES)
    _check(self.value_init == "scratch" or "value_rm" not in self.rms or "cot_rm" not in self.rms
           or self.rms.index("cot_rm") < self.rms.index("value_rm"), "rms",
           "value_init=cot_rm starts the value RM from the CoT RM: train cot_rm first")
    _check(self.data.tokenizer_vocab_size <= self.model.vocab_size, "data.tokenizer_vocab_size",
           f"{self.data.tokenizer_vocab_size} exceeds model.vocab_size={self.model.vocab_size}")
    _positive(self, "math_timeout_s")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# --- building from a ConfigDict


def _closest(name, valid):
  near = difflib.get_close_matches(name, valid, n=3)
  return f"did you mean {' or '.join(map(repr, near))}? " if near else ""


def _key(path: str, name: str = "") -> str:
  """The full key of a field: config.rl.tau."""
  return ".".join(["config"] + [p for p in (path, name) if p])


def _build(cls, value, path: str):
  """cls from a mapping: no unknown keys; every field given unless optional (default None); errors name the key."""
  if not isinstance(value, Mapping):
    raise ConfigError(f"{_key(path)}: expected a section of fields, got {value!r}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  for key in value:
    if key not in fields:
      raise ConfigError(f"{_key(path, key)}: unknown field; {_closest(key, list(fields))}valid: {sorted(fields)}")
  missing = [n for n, f in fields.items() if n not in value and f.default is not None]
  if missing:
    raise ConfigError(f"{_key(path)}: missing field(s) {missing}")
  hints = typing.get_type_hints(cls)
  kwargs = {k: _convert(hints[k], value[k], ".".join(p for p in (path, k) if p)) for k in fields if k in value}
  try:
    return cls(**kwargs)
  except _FieldError as e:
    raise ConfigError(f"{_key(path, e.field)}: {e.message}") from None
  except ValueError as e:  # a library class's own check (ModelConfig)
    raise ConfigError(f"{_key(path)}: {e}") from None


def _convert(tp, value, path: str):
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if tp is DataConfig:
    source = value["source"] if isinstance(value, Mapping) and "source" in value else None
    if source not in DATA_SOURCES:
      raise ConfigError(f"{_key(path, 'source')}: must be one of {list(DATA_SOURCES)}, got {source!r}")
    return _build(DATA_SOURCES[source], value, path)
  if origin is Union:  # Optional[X]
    return None if value is None else _convert(args[0], value, path)
  if dataclasses.is_dataclass(tp):
    if tp in (CurriculumStage, LengthStage):
      return value  # RLConfig validates the stages as a whole
    return _build(tp, value, path)
  if origin is tuple:
    if not isinstance(value, (tuple, list)):
      raise ConfigError(f"{_key(path)}: expected a tuple, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
      raise ConfigError(f"{_key(path)}: expected {len(args)} values, got {value!r}")
    return tuple(_convert(t, v, f"{path}[{i}]") for i, (t, v) in enumerate(zip(args, value)))
  if tp is tuple:
    return _frozen(value)
  if tp is dict:
    if not isinstance(value, Mapping):
      raise ConfigError(f"{_key(path)}: expected a mapping, got {value!r}")
    return {k: _frozen(v) for k, v in value.items()}
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if tp in (int, float, str, bool) and not (isinstance(value, tp) and (tp is bool or not isinstance(value, bool))):
    raise ConfigError(f"{_key(path)}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
  return value


def _frozen(value):
  if isinstance(value, (list, tuple)):
    return tuple(_frozen(v) for v in value)
  if isinstance(value, Mapping):
    return {k: _frozen(v) for k, v in value.items()}
  return value


def rm_config_from_config_dict(config: Any) -> RMTrainConfig:
  """The typed RMTrainConfig of a reward-model config (experiments/configs/rm.py); a ConfigError names a bad field."""
  d = config.to_dict() if hasattr(config, "to_dict") else {k: v for k, v in config.items()}
  return _build(RMTrainConfig, {k: dict(v) if isinstance(v, Mapping) else v for k, v in d.items()}, "")


def from_config_dict(config: Any) -> Config:
  """The typed Config of an experiment's ConfigDict (or nested mapping); a ConfigError names a bad field."""
  d = config.to_dict() if hasattr(config, "to_dict") else {k: v for k, v in config.items()}
  d = {k: dict(v) if isinstance(v, Mapping) else v for k, v in d.items()}
  sections = {k for k, v in d.items() if isinstance(v, dict)}
  if "model" in sections and "hf_path" in d["model"]:  # not an architecture field
    d["hf_path"] = d["model"].pop("hf_path")
  if {"long2short", "rl"} <= sections:
    l2s = d["long2short"] = dict(d["long2short"])
    overrides = dict(l2s["rl"]) if "rl" in l2s else {}
    for key in overrides:  # long2short.rl replaces fields of config.rl
      if key not in d["rl"]:
        raise ConfigError(f"config.long2short.rl.{key}: not a field of config.rl, which it would replace; "
                          f"{_closest(key, list(d['rl']))}")
    l2s["rl"] = {**d["rl"], **overrides}
  return _build(Config, d, "")
