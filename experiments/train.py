"""The main job: tokenizer, long-CoT SFT warm-up, k1.5 RL, held-out evaluation and a summary.

  python -m experiments.train --config=experiments/configs/arith.py --workdir=/tmp/k15_arith

Config fields are overridden with flags: --config.rl.iterations=10 --config.model.n_layers=2.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow serves data only (seqio); keep its chatter out

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for data, checkpoints, metrics and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if "://" in _WORKDIR.value:  # plain file I/O would create a local directory named "gs:"
    raise app.UsageError(f"--workdir={_WORKDIR.value}: k15 writes its workdir through the file system; mount the "
                         "bucket (python -m launch.tpu run does, with gcsfuse) and pass the mounted path")
  if not flags.FLAGS["verbosity"].present:  # orbax and seqio log every step at INFO; -v 0 brings it back
    logging.set_verbosity(logging.WARNING)
  from k15 import sharding
  sharding.initialize_distributed()
  from k15.rl import pipeline  # after distributed init: it touches devices
  pipeline.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
