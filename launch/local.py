"""Starts N processes of an experiment on this machine, the way a TPU pod starts one per host.

  python -m launch.local --num_processes=2 --devices_per_process=4 -- \
      python -m experiments.train --config=experiments/configs/arith.py:smoke --workdir=/tmp/k15_2proc

Each process gets K15_COORDINATOR / K15_NUM_PROCESSES / K15_PROCESS_ID (read by
k15.sharding.initialize_distributed) and its own fake CPU devices. Output is prefixed by process id; the
launcher exits non-zero if any process fails, and stops the others (SIGTERM, then SIGKILL after a grace period:
jax's preemption service keeps a process alive through SIGTERM). A SIGTERM to the launcher goes to every process,
as a preemption notice reaches every host of a slice.
"""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 4, "Fake CPU devices per process.")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port (0: a free one).")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILL_AFTER_S = 10.0  # after a process failed, the others get this long to exit on SIGTERM before SIGKILL


def process_env(base: dict, process_id: int, num_processes: int, port: int, devices: int) -> dict:
  """The environment of one process: its place in the run, its fake CPU devices, and this checkout first on
  PYTHONPATH (so every process imports the same k15, whatever the working directory)."""
  env = dict(base)
  env.update(K15_COORDINATOR=f"localhost:{port}", K15_NUM_PROCESSES=str(num_processes),
             K15_PROCESS_ID=str(process_id), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=os.pathsep.join(p for p in (REPO, base.get("PYTHONPATH")) if p))
  return env


def _relay(proc, prefix):
  for line in proc.stdout:
    sys.stdout.write(f"[{prefix}] {line}")
    sys.stdout.flush()


def launch(command: list, num_processes: int, devices: int, port: int = 0) -> int:
  """Runs `command` as num_processes processes of one JAX run; returns the first non-zero exit code, or 0."""
  if num_processes < 1 or devices < 1:
    raise ValueError(f"num_processes={num_processes} and devices_per_process={devices} must be >= 1")
  port = port or free_port()
  procs = [subprocess.Popen(command, env=process_env(os.environ, i, num_processes, port, devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(num_processes)]
  relays = [threading.Thread(target=_relay, args=(p, i), daemon=True) for i, p in enumerate(procs)]
  for t in relays:
    t.start()
  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  previous = signal.signal(signal.SIGTERM, forward)
  code, stop_by = 0, None
  try:
    while None in [p.poll() for p in procs]:  # poll all: a failed process may leave the others in a collective
      failed = [p.returncode for p in procs if p.returncode]
      if failed and not code:
        code, stop_by = failed[0], time.time() + KILL_AFTER_S
        for other in procs:
          if other.poll() is None:
            other.terminate()
      if stop_by and time.time() > stop_by:
        for other in procs:
          if other.poll() is None:
            other.kill()
      time.sleep(0.2)
  finally:
    signal.signal(signal.SIGTERM, previous)
  code = code or next((p.returncode for p in procs if p.returncode), 0)
  for t in relays:
    t.join(timeout=5)
  return code


def main(argv):
  command = argv[1:]
  if not command:
    raise app.UsageError("give the command after --, e.g. -- python -m experiments.train ...")
  sys.exit(launch(command, _NUM_PROCESSES.value, _DEVICES.value, _PORT.value))


if __name__ == "__main__":
  app.run(main)
