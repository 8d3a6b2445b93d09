"""What the experiment entry points share: --config and --workdir, the typed config, quiet logs, multi-host start."""
import difflib
import importlib.util
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow serves data only (seqio); keep its chatter out

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402


def _unknown_override(argv) -> str:
  """For an override of a key the config does not have (--config.rl.taux=1): the full key and the nearest ones."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return ""
  path, _, arg = spec.partition(":")
  loader = importlib.util.spec_from_file_location("_experiment_config", path)
  module = importlib.util.module_from_spec(loader)
  loader.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for a in argv:
    if not a.startswith("--config."):
      continue
    node, parts = config, a[len("--config."):].split("=", 1)[0].split(".")
    for i, part in enumerate(parts):
      if not hasattr(node, "keys") or part not in node:
        key = ".".join(["config"] + parts[:i + 1])
        valid = sorted(node.keys()) if hasattr(node, "keys") else []
        near = difflib.get_close_matches(part, valid, n=3)
        hint = f"did you mean {' or '.join(repr(n) for n in near)}? " if near else ""
        return f"{a}: {key} is not a field of the config; {hint}valid: {valid}"
      node = node[part]
  return ""


def run(experiment, *, config_help: str, workdir_help: str, build: str = "from_config_dict",
        url_workdir: bool = False):
  """Parses the flags and calls experiment(config, workdir) with the typed k15.config.Config (build: the function
  of k15.config that types the ConfigDict, e.g. rm_config_from_config_dict).

  A config that cannot run is a usage error naming the field, before any work starts. url_workdir: the experiment
  writes its workdir through k15.storage, so it may be a bucket (gs://...). A preempted run (k15.preemption.Preempted,
  raised once its checkpoint is saved) exits 0.
  """
  config_flag = config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
  workdir_flag = flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if "://" in workdir_flag.value and not url_workdir:  # plain file I/O would create a local directory "gs:"
      raise app.UsageError(f"--workdir={workdir_flag.value}: this entry point writes its workdir through the local "
                           "file system; give a local or mounted path (experiments.train takes gs:// workdirs)")
    if not flags.FLAGS["verbosity"].present:  # orbax and seqio log every step at INFO; -v 0 brings it back
      logging.set_verbosity(logging.WARNING)
    from k15 import config as config_lib  # pylint: disable=g-import-not-at-top
    from k15 import sharding  # pylint: disable=g-import-not-at-top
    try:
      config = getattr(config_lib, build)(config_flag.value)
    except config_lib.ConfigError as e:
      raise app.UsageError(str(e)) from None
    from k15 import preemption  # pylint: disable=g-import-not-at-top
    sharding.initialize_distributed()
    try:
      experiment(config, workdir_flag.value)
    except preemption.Preempted as e:
      print(f"k15: {e}", flush=True)

  def parse_flags(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.")
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the config does not have
      sys.exit(f"FATAL Flags parsing error: {_unknown_override(argv) or e}")

  app.run(main, flags_parser=parse_flags)
