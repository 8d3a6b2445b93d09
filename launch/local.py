"""Starts N processes of an experiment on this machine, the way a TPU pod starts one per host.

  python -m launch.local --num_processes=2 --devices_per_process=4 -- \
      python -m experiments.train --config=experiments/configs/arith.py:smoke --workdir=/tmp/k15_2proc

Each process gets K15_COORDINATOR / K15_NUM_PROCESSES / K15_PROCESS_ID (read by
k15.sharding.initialize_distributed) and its own fake CPU devices. Output is prefixed by process id; the
launcher exits non-zero if any process fails, and stops the others.
"""
import os
import socket
import subprocess
import sys
import threading

from absl import app, flags

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 4, "Fake CPU devices per process.")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port (0: a free one).")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(base: dict, process_id: int, num_processes: int, port: int, devices: int) -> dict:
  env = dict(base)
  env.update(K15_COORDINATOR=f"localhost:{port}", K15_NUM_PROCESSES=str(num_processes),
             K15_PROCESS_ID=str(process_id), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def _relay(proc, prefix):
  for line in proc.stdout:
    sys.stdout.write(f"[{prefix}] {line}")
    sys.stdout.flush()


def launch(command: list, num_processes: int, devices: int, port: int = 0) -> int:
  port = port or free_port()
  procs = [subprocess.Popen(command, env=process_env(os.environ, i, num_processes, port, devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(num_processes)]
  relays = [threading.Thread(target=_relay, args=(p, i), daemon=True) for i, p in enumerate(procs)]
  for t in relays:
    t.start()
  code = 0
  for p in procs:
    rc = p.wait()
    if rc and not code:
      code = rc
      for other in procs:  # one failed process would leave the others waiting in a collective
        if other.poll() is None:
          other.terminate()
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
