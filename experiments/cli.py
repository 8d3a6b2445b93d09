"""What the experiment entry points share: --config and --workdir, the typed config, quiet logs, multi-host start."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow serves data only (seqio); keep its chatter out

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402


def run(experiment, *, config_help: str, workdir_help: str):
  """Parses the flags and calls experiment(config, workdir) with the typed k15.config.Config.

  A config that cannot run is a usage error naming the field, before any work starts.
  """
  config_flag = config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
  workdir_flag = flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if "://" in workdir_flag.value:  # plain file I/O would create a local directory named "gs:"
      raise app.UsageError(f"--workdir={workdir_flag.value}: k15 writes its workdir through the file system; mount "
                           "the bucket (python -m launch.tpu run does, with gcsfuse) and pass the mounted path")
    if not flags.FLAGS["verbosity"].present:  # orbax and seqio log every step at INFO; -v 0 brings it back
      logging.set_verbosity(logging.WARNING)
    from k15 import config as config_lib  # pylint: disable=g-import-not-at-top
    from k15 import sharding  # pylint: disable=g-import-not-at-top
    try:
      config = config_lib.from_config_dict(config_flag.value)
    except config_lib.ConfigError as e:
      raise app.UsageError(str(e)) from None
    sharding.initialize_distributed()
    experiment(config, workdir_flag.value)

  app.run(main)
