"""What a model's answers on the main job's held-out problems look like: shares of each trace element.

  python benchmarks/response_formats.py --workdir=/tmp/k15_arith --model=/tmp/k15_l2s/models/rl_long [--samples=5]

Prints, for greedy decoding and for --samples draws per prompt at T=1, the accuracy and the share of responses that
contain a "Check:" line, an "Again:" re-check, and that answer at once ("Answer:" first). The long2short section of
README quotes these shares: they say which shorter formats a model can still sample.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.configs import arith  # noqa: E402
from k15 import models, sharding  # noqa: E402
from k15.rewards.verifiers import Verifier  # noqa: E402
from k15.rl import pipeline, rollout  # noqa: E402
from k15.rl.trainer import Trainer  # noqa: E402

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
  config = arith.get_config("")
  cfg, params = models.load_hf(_MODEL.value)
  trainer = Trainer(cfg, sharding.make_mesh(dict(config.mesh)), config.sharding.logical_axis_rules)
  tokenizer, _, eval_ = pipeline.load_task(config, _WORKDIR.value)
  params = trainer.place_params(params)
  verifier = Verifier()
  runs = [("greedy", 0.0, 1)] + ([("T=1", 1.0, _SAMPLES.value)] if _SAMPLES.value else [])
  for name, temperature, n in runs:
    examples = [ex for ex in eval_ for _ in range(n)]
    responses = rollout.generate_responses(trainer, params, [ex["inputs_ids"] for ex in examples], tokenizer,
                                           config, temperature=temperature,
                                           max_new_tokens=config.eval.max_response_len, seed=1)
    texts = [tokenizer.decode(r) for r in responses]
    print(f"{name}: {describe(texts, verifier(texts, examples))}", flush=True)


if __name__ == "__main__":
  app.run(main)
