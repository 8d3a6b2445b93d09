"""launch/: the Cloud TPU command builder (nothing reaches a cloud) and the local launcher's process handling."""
import io
import os
import subprocess
import sys
import tarfile
import time

import pytest

from launch import local, tpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("accelerator, chip, chips, hosts, gcloud_type", [
    ("v5litepod-8", "v5e", 8, 1, "v5litepod-8"),  # v5e: the number counts chips; up to 8 chips is one host
    ("v5litepod-16", "v5e", 16, 4, "v5litepod-16"),
    ("v5e-256", "v5e", 256, 64, "v5litepod-256"),  # alias spelled as in the docs
    ("v5p-8", "v5p", 4, 1, "v5p-8"),  # v5p: the number counts TensorCores, 2 per chip
    ("v5p-128", "v5p", 64, 16, "v5p-128"),
    ("v5p-512", "v5p", 256, 64, "v5p-512"),
    ("v4-32", "v4", 16, 4, "v4-32"),
    ("v6e-64", "v6e", 64, 16, "v6e-64"),
])
def test_slice_info(accelerator, chip, chips, hosts, gcloud_type):
  info = tpu.slice_info(accelerator)
  assert (info["chip"], info["chips"], info["hosts"], info["accelerator_type"]) == (chip, chips, hosts, gcloud_type)


@pytest.mark.parametrize("bad", ["v5p-7", "v5q-8", "v5p", "tpu-8"])
def test_slice_info_rejects_bad_types(bad):
  with pytest.raises(tpu.LaunchError, match="--accelerator"):
    tpu.slice_info(bad)


def test_gcs_paths():
  assert tpu.split_gcs("gs://my-bucket/k15/run1/") == ("my-bucket", "k15/run1")
  assert tpu.mounted_workdir("gs://my-bucket/k15/run1") == "/tmp/k15-gcs/my-bucket/k15/run1"
  assert tpu.mounted_workdir("gs://my-bucket") == "/tmp/k15-gcs/my-bucket"
  for bad in ("/local/dir", "gs://", "s3://bucket/x", "gs://Upper/x"):
    with pytest.raises(tpu.LaunchError, match="--workdir"):
      tpu.split_gcs(bad)


def test_gcloud_commands():
  assert tpu.create_command("k15", "us-east5-a", "v5p-128", project="proj") == [
      "gcloud", "compute", "tpus", "tpu-vm", "create", "k15", "--zone=us-east5-a", "--project=proj",
      "--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5"]
  assert tpu.create_command("k15", "us-west4-a", "v5e-16", spot=True, runtime="v2-alpha-tpuv5-lite") == [
      "gcloud", "compute", "tpus", "tpu-vm", "create", "k15", "--zone=us-west4-a",
      "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot"]
  assert tpu.describe_command("k15", "z") == [
      "gcloud", "compute", "tpus", "tpu-vm", "describe", "k15", "--zone=z", "--format=value(state)"]
  assert tpu.ssh_all_command("k15", "z", "echo hi") == [
      "gcloud", "compute", "tpus", "tpu-vm", "ssh", "k15", "--zone=z", "--worker=all", "--command=echo hi"]
  assert tpu.scp_all_command("k15", "z", "/tmp/a.tgz", "a.tgz", project="p") == [
      "gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/a.tgz", "k15:a.tgz", "--worker=all", "--zone=z",
      "--project=p"]
  assert tpu.delete_command("k15", "z")[-1] == "--quiet"


def test_up_dry_run_prints_every_step_without_gcloud(monkeypatch):
  monkeypatch.setenv("PATH", "/nonexistent")  # no gcloud: a dry run must not need it
  out = io.StringIO()
  rc = tpu.main(["up", "--name=k15-pod", "--zone=us-east5-a", "--accelerator=v5p-64",
                 "--workdir=gs://my-bucket/runs/q15", "--dry_run", "--",
                 "--config=experiments/configs/qwen_math.py:1.5b,v5p-64", "--config.rl.tau=0.05"], stream=out)
  assert rc == 0
  lines = [l for l in out.getvalue().splitlines() if l.startswith("+ ")]
  assert [l.split()[5] for l in lines] == ["describe", "create", "scp", "ssh", "ssh"]
  run_line = lines[-1]
  assert "--worker=all" in run_line and "gcsfuse --implicit-dirs my-bucket /tmp/k15-gcs/my-bucket" in run_line
  assert "K15_NUM_PROCESSES=8" in run_line  # v5p-64: 32 chips on 8 hosts, one process each
  assert ("python3 -m experiments.train --workdir=/tmp/k15-gcs/my-bucket/runs/q15 "
          "--config=experiments/configs/qwen_math.py:1.5b,v5p-64 --config.rl.tau=0.05") in run_line


def test_missing_gcloud_is_a_clear_error(monkeypatch, capsys):
  monkeypatch.setenv("PATH", "/nonexistent")
  rc = tpu.main(["create", "--name=k15", "--zone=z", "--accelerator=v5p-8"])
  assert rc == 2
  err = capsys.readouterr().err
  assert "gcloud CLI is not on PATH" in err and "--dry_run" in err


@pytest.mark.parametrize("argv, message", [
    (["run", "--name=k", "--zone=z", "--accelerator=v5p-8", "--", "--config=c.py"], "--workdir=gs://"),
    (["run", "--name=k", "--zone=z", "--accelerator=v5p-8", "--workdir=/tmp/x", "--", "--config=c.py"],
     "--workdir='/tmp/x'"),
    (["run", "--name=k", "--zone=z", "--accelerator=v5p-8", "--workdir=gs://bkt/x"], "--config="),
    (["create", "--name=k", "--zone=z"], "--accelerator is required"),
    (["create", "--name=k", "--zone=z", "--accelerator=v9-8"], "--accelerator='v9-8'"),
])
def test_bad_flags_name_the_flag(argv, message, capsys):
  assert tpu.main(argv + ["--dry_run"]) == 2
  assert message in capsys.readouterr().err


def _fake_bin(tmp_path, name, body):
  path = tmp_path / "bin" / name
  path.parent.mkdir(exist_ok=True)
  path.write_text("#!/bin/bash\n" + body + "\n")
  path.chmod(0o755)


def test_run_script_executes_mount_then_train(tmp_path):
  """The worker-side script under bash, with gcsfuse / mountpoint / python3 replaced by recorders."""
  log = tmp_path / "calls.log"
  _fake_bin(tmp_path, "mountpoint", "exit 1")  # not mounted yet
  _fake_bin(tmp_path, "gcsfuse", f'echo "gcsfuse $*" >> {log}')
  _fake_bin(tmp_path, "python3", f'echo "python3 K15_NUM_PROCESSES=$K15_NUM_PROCESSES $*" >> {log}')
  (tmp_path / "k15").mkdir()
  script = tpu.run_script("gs://my-bucket/runs/a", 4, ["--config=experiments/configs/x.py:v5p-32", "--config.seed=3"])
  env = dict(os.environ, HOME=str(tmp_path), PATH=f"{tmp_path / 'bin'}:/usr/bin:/bin")
  subprocess.run(["bash", "-c", script], env=env, check=True, timeout=30)
  assert log.read_text().splitlines() == [
      "gcsfuse --implicit-dirs my-bucket /tmp/k15-gcs/my-bucket",
      "python3 K15_NUM_PROCESSES=4 -m experiments.train --workdir=/tmp/k15-gcs/my-bucket/runs/a "
      "--config=experiments/configs/x.py:v5p-32 --config.seed=3"]
  assert (tmp_path / "k15-run.log").exists()  # tee'd output


def test_run_script_fails_when_training_fails(tmp_path):
  _fake_bin(tmp_path, "mountpoint", "exit 0")  # already mounted: gcsfuse must not run
  _fake_bin(tmp_path, "gcsfuse", "exit 99")
  _fake_bin(tmp_path, "python3", "exit 3")
  (tmp_path / "k15").mkdir()
  env = dict(os.environ, HOME=str(tmp_path), PATH=f"{tmp_path / 'bin'}:/usr/bin:/bin")
  script = tpu.run_script("gs://bkt/x", 2, ["--config=c.py"])
  rc = subprocess.run(["bash", "-c", script], env=env, timeout=30).returncode
  assert rc == 3  # pipefail: the exit code survives the tee


def test_install_script_parses_and_pins_jax():
  script = tpu.install_script("k15-src.tar.gz")
  assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
  with open(os.path.join(REPO, "setup.py")) as f:
    assert f'"jax=={script.split("jax[tpu]==")[1].split(chr(39))[0]}"' in f.read()


def test_archive_holds_the_code_not_git(tmp_path):
  path = tpu.make_archive(str(tmp_path / "src.tar.gz"))
  with tarfile.open(path) as tar:
    names = set(tar.getnames())
  assert "./k15/sharding.py" in names and "./experiments/train.py" in names and "./launch/tpu.py" in names
  assert not any(n.startswith("./.git/") or n == "./.git" or "__pycache__" in n for n in names)


def test_local_process_env():
  env = local.process_env({"PYTHONPATH": "/x", "OTHER": "1"}, 1, 2, 1234, 4)
  assert env["K15_COORDINATOR"] == "localhost:1234" and env["K15_NUM_PROCESSES"] == "2"
  assert env["K15_PROCESS_ID"] == "1" and env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
  assert env["PYTHONPATH"].split(os.pathsep) == [REPO, "/x"] and env["OTHER"] == "1"


def test_local_launcher_stops_the_others_when_one_fails():
  """Process 1 fails at once; process 0 would sleep a minute (as if waiting in a collective)."""
  code = "import os, sys, time; sys.exit(5) if os.environ['K15_PROCESS_ID'] == '1' else time.sleep(60)"
  start = time.time()
  proc = subprocess.run([sys.executable, "-m", "launch.local", "--num_processes=2", "--devices_per_process=1", "--",
                         sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 5
  assert time.time() - start < 30


def test_local_launcher_prefixes_output_and_succeeds():
  code = "import os; print('hello from', os.environ['K15_PROCESS_ID'], 'of', os.environ['K15_NUM_PROCESSES'])"
  proc = subprocess.run([sys.executable, "-m", "launch.local", "--num_processes=3", "--devices_per_process=1", "--",
                         sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert sorted(proc.stdout.splitlines()) == ["[0] hello from 0 of 3", "[1] hello from 1 of 3", "[2] hello from 2 of 3"]
