"""Long2short: short-CoT variants of the main job's long-CoT model, evaluated side by side (RECIPE.md section 5).

  python -m experiments.long2short --config=experiments/configs/long2short.py \
      --config.main_workdir=/tmp/k15_arith --workdir=/tmp/k15_l2s

Writes long2short.md / .csv (the table), long2short.png (accuracy against mean tokens) and every variant's model
under --workdir; a rerun skips the stages whose output exists.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow serves data only (seqio); keep its chatter out

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/configs/long2short.py (or :smoke).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the variants' models, the table and the plot.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # orbax and seqio log every step at INFO; -v 0 brings it back
    logging.set_verbosity(logging.WARNING)
  from k15.long2short import pipeline  # after flag parsing: it imports JAX and touches devices
  pipeline.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
