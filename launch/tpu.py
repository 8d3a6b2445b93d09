"""Cloud TPU pod slices: create (or reuse) TPU VMs, install k15 in its own Python on every worker, run on all hosts.

  python -m launch.tpu up --name=k15-v5p --zone=us-east5-a --accelerator=v5p-64 \
      --workdir=gs://my-bucket/k15/qwen1p5b -- \
      --config=experiments/configs/qwen_math.py:1.5b,v5p-64 --config.model.hf_path=/path/on/workers

Subcommands: create (reuses a slice that already exists), setup (copies this checkout to every worker and installs
it), run (starts experiments.train on all hosts at once: the `ssh --worker=all` pattern), up (all three), delete.
Everything goes through the gcloud CLI; --dry_run prints every command instead.

--num_slices=N > 1 is a multi-slice run: N slices of --accelerator from one queued resource (the nodes
<name>-0 ... <name>-N-1), reached with `gcloud compute tpus queued-resources ssh/scp --node=all --worker=all`;
the config's mesh.dcn_data must be N (data parallel across the slices).

setup creates a virtual environment with uv (~/k15-venv, the Python that setup.py requires, downloaded by uv when
the image has none) and installs k15 with jax[tpu] at setup.py's jax pin. run passes the gs:// workdir as it is
(k15 writes it through etils epath, no mount) and keeps jax's persistent compilation cache in <workdir>/jax_cache,
so a rerun (after a preemption, say) does not compile again.
"""
import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "k15"  # the checkout on each worker, relative to the ssh user's home
VENV = "k15-venv"  # the virtual environment on each worker, relative to the ssh user's home
LOG = "k15-run.log"  # the run's output on each worker, in the ssh user's home

# Per chip generation: accelerator-type prefix, TensorCores named per chip in the type ("v5p-8" = 4 chips),
# chips per host in multi-host slices, default runtime version, HBM bytes and peak bf16 FLOP/s per chip.
CHIPS = {
    "v4": dict(prefix="v4", cores_per_chip=2, chips_per_host=4, runtime="tpu-ubuntu2204-base",
               hbm_bytes=32 * 2**30, peak_flops=275e12),
    "v5e": dict(prefix="v5litepod", cores_per_chip=1, chips_per_host=4, runtime="v2-alpha-tpuv5-lite",
                hbm_bytes=16 * 2**30, peak_flops=197e12),
    "v5p": dict(prefix="v5p", cores_per_chip=2, chips_per_host=4, runtime="v2-alpha-tpuv5",
                hbm_bytes=95 * 2**30, peak_flops=459e12),
    "v6e": dict(prefix="v6e", cores_per_chip=1, chips_per_host=4, runtime="v2-alpha-tpuv6e",
                hbm_bytes=32 * 2**30, peak_flops=918e12),
}
_SINGLE_HOST_CHIPS = 8  # v5e / v6e slices of up to 8 chips are one host


class LaunchError(RuntimeError):
  """A launch that cannot work as asked (missing CLI, bad flag value); the message says what to change."""


def slice_info(accelerator: str) -> dict:
  """'v5p-128' / 'v5litepod-16' -> chip generation, chips, hosts (JAX processes), and the chip's facts."""
  m = re.fullmatch(r"(v4|v5litepod|v5e|v5p|v6e)-(\d+)", accelerator)
  if not m:
    raise LaunchError(f"--accelerator={accelerator!r}: expected e.g. v5litepod-16, v5p-128, v6e-64 or v4-32")
  prefix, n = m.group(1), int(m.group(2))
  chip = "v5e" if prefix in ("v5litepod", "v5e") else prefix
  facts = CHIPS[chip]
  if n % facts["cores_per_chip"]:
    raise LaunchError(f"--accelerator={accelerator!r}: {prefix} types count TensorCores, a multiple of "
                      f"{facts['cores_per_chip']}")
  chips = n // facts["cores_per_chip"]
  single_host = chips <= (_SINGLE_HOST_CHIPS if facts["cores_per_chip"] == 1 else facts["chips_per_host"])
  hosts = 1 if single_host else chips // facts["chips_per_host"]
  return dict(facts, chip=chip, chips=chips, hosts=hosts, accelerator_type=f"{facts['prefix']}-{n}")


def split_gcs(path: str):
  """'gs://bucket/a/b' -> ('bucket', 'a/b')."""
  m = re.fullmatch(r"gs://([a-z0-9][a-z0-9._-]{1,221}[a-z0-9])(/.*)?", path)
  if not m:
    raise LaunchError(f"--workdir={path!r}: expected a bucket path gs://BUCKET/PATH")
  return m.group(1), (m.group(2) or "/").strip("/")


def _gcloud_tpu(verb: str, name: str, zone: str, project: Optional[str]) -> List[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, name, f"--zone={zone}"]
  return cmd + ([f"--project={project}"] if project else [])


def describe_command(name, zone, project=None) -> List[str]:
  return _gcloud_tpu("describe", name, zone, project) + ["--format=value(state)"]


def create_command(name, zone, accelerator, project=None, runtime=None, spot=False) -> List[str]:
  info = slice_info(accelerator)
  cmd = _gcloud_tpu("create", name, zone, project)
  cmd += [f"--accelerator-type={info['accelerator_type']}", f"--version={runtime or info['runtime']}"]
  return cmd + (["--spot"] if spot else [])


def delete_command(name, zone, project=None) -> List[str]:
  return _gcloud_tpu("delete", name, zone, project) + ["--quiet"]


def ssh_all_command(name, zone, remote: str, project=None) -> List[str]:
  """Runs the shell command `remote` on every worker of the slice at once."""
  return _gcloud_tpu("ssh", name, zone, project) + ["--worker=all", f"--command={remote}"]


def scp_all_command(name, zone, local: str, remote: str, project=None) -> List[str]:
  return (["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{name}:{remote}", "--worker=all",
           f"--zone={zone}"] + ([f"--project={project}"] if project else []))


# Multi-slice: one queued resource holds the slices (its nodes <name>-0, <name>-1, ...).

def _gcloud_qr(verb: str, name: str, zone: str, project: Optional[str]) -> List[str]:
  cmd = ["gcloud", "compute", "tpus", "queued-resources", verb, name, f"--zone={zone}"]
  return cmd + ([f"--project={project}"] if project else [])


def qr_create_command(name, zone, accelerator, num_slices, project=None, runtime=None, spot=False) -> List[str]:
  info = slice_info(accelerator)
  cmd = _gcloud_qr("create", name, zone, project)
  cmd += [f"--accelerator-type={info['accelerator_type']}", f"--runtime-version={runtime or info['runtime']}",
          f"--node-count={num_slices}", f"--node-prefix={name}"]
  return cmd + (["--spot"] if spot else [])


def qr_describe_command(name, zone, project=None) -> List[str]:
  return _gcloud_qr("describe", name, zone, project) + ["--format=value(state.state)"]


def qr_delete_command(name, zone, project=None) -> List[str]:
  return _gcloud_qr("delete", name, zone, project) + ["--force", "--quiet"]  # --force: its nodes too


def qr_ssh_all_command(name, zone, remote: str, project=None) -> List[str]:
  """Runs the shell command `remote` on every worker of every slice at once."""
  return _gcloud_qr("ssh", name, zone, project) + ["--node=all", "--worker=all", f"--command={remote}"]


def qr_scp_all_command(name, zone, local: str, remote: str, project=None) -> List[str]:
  return (["gcloud", "compute", "tpus", "queued-resources", "scp", local, f"{name}:{remote}", "--node=all",
           "--worker=all", f"--zone={zone}"] + ([f"--project={project}"] if project else []))


def _setup_py() -> str:
  with open(os.path.join(REPO, "setup.py")) as f:
    return f.read()


def _jax_pin() -> str:
  m = re.search(r'"jax==([0-9.]+)"', _setup_py())
  if not m:
    raise LaunchError("setup.py: no jax==X pin to install jax[tpu] at")
  return m.group(1)


def _python_version() -> str:
  """The Python of the workers' environment: setup.py's python_requires minimum (">=3.11" -> "3.11")."""
  m = re.search(r'python_requires=">=([0-9.]+)"', _setup_py())
  if not m:
    raise LaunchError('setup.py: no python_requires=">=X.Y" to create the environment with')
  return m.group(1)


def install_script(archive_name: str) -> str:
  """On each worker: unpack the code; create ~/k15-venv with uv (its own Python, whatever the image's is); install
  k15 with TPU jax at the pin, math-verify and the Cloud Storage client (orbax's checkpoints in gs://)."""
  return " && ".join([
      "set -e",
      f"rm -rf ~/{REMOTE_DIR} && mkdir -p ~/{REMOTE_DIR}",
      f"tar xzf ~/{archive_name} -C ~/{REMOTE_DIR}",
      f"cd ~/{REMOTE_DIR}",
      'export PATH="$HOME/.local/bin:$PATH"',
      "{ command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; }",
      f"uv venv --allow-existing --python {_python_version()} ~/{VENV}",
      f"uv pip install --python ~/{VENV}/bin/python -e '.[math,gcs]' 'jax[tpu]=={_jax_pin()}'",
  ])


def run_script(workdir: str, processes: int, train_args: Sequence[str], detach: bool = False) -> str:
  """On each worker: start experiments.train as one of `processes` JAX processes (hosts x slices), with the
  compilation cache in the workdir. In the foreground it streams the log and exits with the run's exit code."""
  split_gcs(workdir)
  train = " ".join([f"~/{VENV}/bin/python", "-m", "experiments.train", shlex.quote(f"--workdir={workdir}"),
                    *map(shlex.quote, train_args)])
  # K15_NUM_PROCESSES makes k15.sharding.initialize_distributed join the run; JAX finds the coordinator and this
  # host's process id (and on multi-slice runs the slice) from the TPU metadata.
  env = (f"export K15_NUM_PROCESSES={processes} "
         f"JAX_COMPILATION_CACHE_DIR={shlex.quote(workdir.rstrip('/') + '/jax_cache')}")
  # nohup and a log file: a dropped ssh session (or a SIGTERM to this shell) does not take the run with it.
  before = ["set -eo pipefail", f"cd ~/{REMOTE_DIR}", env, f": > ~/{LOG}"]
  after = ["pid=$!"] + ([f'echo "started (pid $pid); log in ~/{LOG}"'] if detach else
                        [f"tail -f --pid=$pid ~/{LOG}", "wait $pid"])  # stream the log; exit with the run's code
  return "; ".join(before) + f"; nohup {train} >> ~/{LOG} 2>&1 & " + "; ".join(after)


def check_gcloud():
  if shutil.which("gcloud") is None:
    raise LaunchError("the gcloud CLI is not on PATH: install the Google Cloud SDK "
                      "(https://cloud.google.com/sdk/docs/install), run `gcloud auth login`, or pass --dry_run to "
                      "print the commands instead")


def make_archive(out_path: str) -> str:
  """This checkout (without .git, caches and notebooks' outputs) as a .tar.gz, to copy to the workers."""
  skip = {".git", "__pycache__", ".pytest_cache", ".ipynb_checkpoints"}
  with tarfile.open(out_path, "w:gz") as tar:
    tar.add(REPO, arcname=".", filter=lambda ti: None if os.path.basename(ti.name) in skip else ti)
  return out_path


class Runner:
  """Runs gcloud commands, or prints them with --dry_run (which needs no gcloud)."""

  def __init__(self, dry_run: bool, stream=sys.stdout):
    self.dry_run, self.stream = dry_run, stream
    if not dry_run:
      check_gcloud()

  def __call__(self, cmd: List[str], check: bool = True) -> int:
    print("+ " + " ".join(map(shlex.quote, cmd)), file=self.stream, flush=True)
    if self.dry_run:
      return 0
    rc = subprocess.call(cmd)
    if check and rc:
      raise LaunchError(f"command failed with exit code {rc}: {' '.join(cmd[:6])} ...")
    return rc

  def output(self, cmd: List[str]) -> str:
    """The command's stdout (a dry run prints the command and returns "")."""
    print("+ " + " ".join(map(shlex.quote, cmd)), file=self.stream, flush=True)
    if self.dry_run:
      return ""
    return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()


def _multi_slice(args) -> bool:
  return args.num_slices > 1


def create(args, runner: Runner, poll_s: float = 30.0):
  """Creates the slice (or the queued resource of --num_slices slices, then waits until it is ACTIVE) unless it
  exists (then it is reused as is)."""
  if not _multi_slice(args):
    exists = runner(describe_command(args.name, args.zone, args.project), check=False) == 0
    if runner.dry_run:
      print("# the create below runs only if the describe above fails (no such TPU VM)", file=runner.stream)
    elif exists:
      print(f"reusing TPU VM {args.name}", file=runner.stream)
      return
    runner(create_command(args.name, args.zone, args.accelerator, args.project, args.runtime, args.spot))
    return
  describe = qr_describe_command(args.name, args.zone, args.project)
  state = runner.output(describe)
  if runner.dry_run:
    print("# the create below runs only if the describe above finds no such queued resource", file=runner.stream)
  if not state:
    runner(qr_create_command(args.name, args.zone, args.accelerator, args.num_slices, args.project, args.runtime,
                             args.spot))
  if runner.dry_run:
    print(f"# then the describe above repeats every {poll_s:.0f} s until the state is ACTIVE", file=runner.stream)
    return
  while state != "ACTIVE":
    if state in ("FAILED", "SUSPENDED", "SUSPENDING"):
      raise LaunchError(f"queued resource {args.name} is {state}; delete it (python -m launch.tpu delete ...) and "
                        "create it again")
    time.sleep(poll_s)
    state = runner.output(describe)
    print(f"queued resource {args.name}: {state or 'not found'}", file=runner.stream, flush=True)


def setup(args, runner: Runner):
  archive = "k15-src.tar.gz"
  scp, ssh = (qr_scp_all_command, qr_ssh_all_command) if _multi_slice(args) else (scp_all_command, ssh_all_command)
  with tempfile.TemporaryDirectory(prefix="k15-launch-") as tmp:
    local = os.path.join(tmp, archive)
    if not runner.dry_run:
      make_archive(local)
    runner(scp(args.name, args.zone, local, archive, args.project))  # lands in the home directory
  runner(ssh(args.name, args.zone, install_script(archive), args.project))


def run(args, runner: Runner):
  processes = slice_info(args.accelerator)["hosts"] * args.num_slices
  ssh = qr_ssh_all_command if _multi_slice(args) else ssh_all_command
  runner(ssh(args.name, args.zone, run_script(args.workdir, processes, args.train_args, detach=args.detach),
             args.project))


def delete(args, runner: Runner):
  runner((qr_delete_command if _multi_slice(args) else delete_command)(args.name, args.zone, args.project))


def parse(argv: Sequence[str]):
  argv = list(argv)
  train_args = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__.split("\n\n")[0])
  p.add_argument("command", choices=["create", "setup", "run", "up", "delete"])
  p.add_argument("--name", required=True, help="TPU VM (or multi-slice queued resource) name")
  p.add_argument("--zone", required=True, help="e.g. us-east5-a (v5p), us-west4-a (v5e)")
  p.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
  p.add_argument("--accelerator", default=None, help="one slice, e.g. v5litepod-16, v5p-128 (create, run, up)")
  p.add_argument("--num_slices", type=int, default=1,
                 help="slices of --accelerator; > 1: a multi-slice queued resource (the config's mesh.dcn_data)")
  p.add_argument("--runtime", default=None, help="TPU software version (default: the chip's, see CHIPS)")
  p.add_argument("--spot", action="store_true", help="create Spot capacity")
  p.add_argument("--workdir", default=None, help="gs://BUCKET/PATH (run, up)")
  p.add_argument("--detach", action="store_true", help=f"run: start in the background, log to ~/{LOG}")
  p.add_argument("--dry_run", action="store_true", help="print the gcloud commands, run nothing")
  args = p.parse_args(argv)
  args.train_args = train_args
  if args.num_slices < 1:
    raise LaunchError(f"--num_slices={args.num_slices}: must be >= 1")
  if args.command in ("create", "run", "up") and not args.accelerator:
    raise LaunchError(f"{args.command}: --accelerator is required (e.g. v5p-128)")
  if args.accelerator:
    slice_info(args.accelerator)  # fail early on a malformed type
  if args.command in ("run", "up"):
    if not args.workdir:
      raise LaunchError(f"{args.command}: --workdir=gs://BUCKET/PATH is required")
    split_gcs(args.workdir)
    if not any(a.startswith("--config=") for a in train_args):
      raise LaunchError(f"{args.command}: give the experiment's flags after --, starting with --config=...")
  return args


def main(argv: Sequence[str], stream=sys.stdout) -> int:
  try:
    args = parse(argv)
    runner = Runner(args.dry_run, stream)
    steps = {"create": [create], "setup": [setup], "run": [run], "up": [create, setup, run], "delete": [delete]}
    for step in steps[args.command]:
      step(args, runner)
  except LaunchError as e:
    print(f"launch.tpu: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
