"""What a model's answers on the main job's held-out problems look like: shares of each trace element.

  python -m experiments.analysis.response_formats --workdir=/tmp/k15_arith --model=/tmp/k15_l2s/models/rl_long \
      [--samples=5]

Prints, for greedy decoding and for --samples draws per prompt at T=1, the accuracy and the share of responses that
contain a "Check:" line, an "Again:" re-check, and that answer at once ("Answer:" first). docs/results.md quotes
these shares in its long2short section: they say which shorter formats a model can still sample.
"""
import numpy as np
from absl import app, flags

from experiments import train as main_job
from experiments.configs import arith
from k15 import config as config_lib
from k15 import models
from k15.rl import rollout

_WORKDIR = flags.DEFINE_string("workdir", None, "A main-job workdir (its data/ gives the held-out problems).")
_MODEL = flags.DEFINE_string("model", None, "A Hugging Face checkpoint directory (e.g. WORKDIR/final).")
_SAMPLES = flags.DEFINE_integer("samples", 5, "T=1 samples per held-out prompt (0: greedy only).")
flags.mark_flags_as_required(["workdir", "model"])


def describe(texts, correct):
  has = lambda marker: np.mean([marker in t for t in texts])
  return (f"{len(texts)} responses: accuracy {np.mean(correct):.1%}, with a Check: line {has('Check:'):.1%}, "
          f"with an Again: re-check {has('Again:'):.1%}, answering at once "
          f"{np.mean([t.startswith('Answer:') for t in texts]):.1%}")


def main(_):
  config = config_lib.from_config_dict(arith.get_config(""))
  cfg, params = models.load_hf(_MODEL.value)
  trainer = main_job.make_trainer(config, cfg)
  tokenizer, _, eval_ = main_job.load_task(config, _WORKDIR.value, write=False)
  params = trainer.place_params(params)
  verifier = main_job.make_verifier(config)
  runs = [("greedy", 0.0, 1)] + ([("T=1", 1.0, _SAMPLES.value)] if _SAMPLES.value else [])
  for name, temperature, n in runs:
    examples = [ex for ex in eval_ for _ in range(n)]
    responses = rollout.generate_responses(trainer, params, [ex["inputs_ids"] for ex in examples], tokenizer,
                                           config.sampling, temperature=temperature,
                                           max_new_tokens=config.eval.max_response_len, seed=1)
    texts = [tokenizer.decode(r) for r in responses]
    print(f"{name}: {describe(texts, verifier(texts, examples))}", flush=True)


if __name__ == "__main__":
  app.run(main)
