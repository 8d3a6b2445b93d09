"""Offline prompt curation with a reference model: drop unsuitable and guessable prompts, label difficulty.

  python -m experiments.curate --input=prompts.jsonl --output=curated.jsonl --model=/path/to/hf_checkpoint \\
      --domain=math [--field_map='{"question": "problem", "answer": "solution"}']

The model is a Qwen2 / Llama safetensors directory (k15.models.load_hf); its tokenizer is --tokenizer, by default
the directory's tokenizer.json. Prints what was dropped and why, and the difficulty histogram of what was kept.
See k15/data/curation.py for the filters.
"""
import collections
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

_INPUT = flags.DEFINE_string("input", None, "Prompt file (.jsonl or .parquet).")
_OUTPUT = flags.DEFINE_string("output", None, "Curated prompts (.jsonl) with difficulty and pass_rate.")
_MODEL = flags.DEFINE_string("model", None, "Reference model: a HF safetensors checkpoint directory.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer (.model or tokenizer.json); default: --model.")
_DOMAIN = flags.DEFINE_enum("domain", "math", ["math", "code", "arith"], "Verifier and default domain.")
_FIELD_MAP = flags.DEFINE_string("field_map", "", "JSON {our field: file field}, e.g. MATH's problem/solution.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Curate only the first N prompts (0: all).")
_N_SAMPLES = flags.DEFINE_integer("n_samples", 10, "CoT samples per prompt for the pass rate (report: 10).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 512, "Chain-of-thought token budget.")
_HACK_TRIES = flags.DEFINE_integer("hack_tries", 8, "Direct answers per prompt for the hackability check.")
_LEVELS = flags.DEFINE_integer("levels", 5, "Difficulty labels 1..levels.")
_COT_TEMPLATE = flags.DEFINE_string("cot_template", "{question}\nThink step by step.\n", "CoT prompt.")
_DIRECT_TEMPLATE = flags.DEFINE_string("direct_template", "{question}\nAnswer:", "Direct-answer prompt.")
_NUM_SLOTS = flags.DEFINE_integer("num_slots", 64, "Concurrent sequences in the sampler.")
_WORKERS = flags.DEFINE_integer("verifier_workers", os.cpu_count() or 1, "Verifier processes / threads.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.mark_flags_as_required(["input", "output", "model"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  from k15 import models  # pylint: disable=g-import-not-at-top
  from k15.data import curation, prompts, tokenizer  # pylint: disable=g-import-not-at-top
  from k15.rewards.verifiers import Verifier  # pylint: disable=g-import-not-at-top

  pool = prompts.read_prompts(_INPUT.value, _DOMAIN.value, json.loads(_FIELD_MAP.value or "{}"))
  if _LIMIT.value:
    pool = pool[:_LIMIT.value]
  cfg, params = models.load_hf(_MODEL.value)
  tok = tokenizer.load_tokenizer(_TOKENIZER.value or _MODEL.value)
  tokenizer.check_tokenizer_fits(tok, cfg.vocab_size)
  config = curation.CurationConfig(
      n_samples=_N_SAMPLES.value, temperature=_TEMPERATURE.value, max_new_tokens=_MAX_NEW.value,
      cot_template=_COT_TEMPLATE.value, hack_tries=_HACK_TRIES.value, direct_template=_DIRECT_TEMPLATE.value,
      levels=_LEVELS.value, num_slots=_NUM_SLOTS.value)
  with Verifier(default_domain=_DOMAIN.value, math_workers=_WORKERS.value) as verifier:
    kept, counts = curation.curate(pool, cfg, params, tok, verifier, config, jax.random.PRNGKey(_SEED.value))
  prompts.write_jsonl(_OUTPUT.value, kept)
  print(f"{len(pool)} prompts -> {len(kept)} kept in {_OUTPUT.value}")
  for reason in ("multiple_choice", "true_false", "proof", "guessable"):
    print(f"  dropped {reason}: {counts.get(reason, 0)}")
  histogram = collections.Counter(p["difficulty"] for p in kept)
  print("  difficulty (1 = always solved): " + ", ".join(f"{k}: {histogram[k]}" for k in sorted(histogram)))


if __name__ == "__main__":
  app.run(main)
