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


def _dry_run(argv, monkeypatch):
  monkeypatch.setenv("PATH", "/nonexistent")  # no gcloud: a dry run must not need it
  out = io.StringIO()
  assert tpu.main(argv[:1] + ["--dry_run"] + argv[1:], stream=out) == 0
  return out.getvalue(), [l for l in out.getvalue().splitlines() if l.startswith("+ ")]


def test_up_dry_run_prints_every_step_without_gcloud(monkeypatch):
  _, lines = _dry_run(["up", "--name=k15-pod", "--zone=us-east5-a", "--accelerator=v5p-64",
                       "--workdir=gs://my-bucket/runs/q15", "--", "--config=experiments/configs/qwen_math.py:1.5b,v5p-64",
                       "--config.rl.tau=0.05"], monkeypatch)
  assert [l.split()[5] for l in lines] == ["describe", "create", "scp", "ssh", "ssh"]
  install, run_line = lines[-2], lines[-1]
  assert "--worker=all" in install and "uv venv --allow-existing --python 3.11 ~/k15-venv" in install
  assert "--worker=all" in run_line and "gcsfuse" not in run_line
  assert "K15_NUM_PROCESSES=8" in run_line  # v5p-64: 32 chips on 8 hosts, one process each
  assert "JAX_COMPILATION_CACHE_DIR=gs://my-bucket/runs/q15/jax_cache" in run_line
  assert ("~/k15-venv/bin/python -m experiments.train --workdir=gs://my-bucket/runs/q15 "
          "--config=experiments/configs/qwen_math.py:1.5b,v5p-64 --config.rl.tau=0.05") in run_line


def test_multi_slice_dry_run_uses_one_queued_resource(monkeypatch):
  """--num_slices=2: a queued resource of two v5p-32 nodes, waited for, reached on every node and worker; the run
  is 2 slices x 4 hosts = 8 processes."""
  common = ["--name=k15-ms", "--zone=us-east5-a", "--project=p", "--accelerator=v5p-32", "--num_slices=2"]
  out, lines = _dry_run(["up", *common, "--spot", "--workdir=gs://bkt/ms", "--",
                         "--config=experiments/configs/qwen_math.py:1.5b,2xv5p-32"], monkeypatch)
  assert [l.split()[4:6] for l in lines] == [["queued-resources", "describe"], ["queued-resources", "create"],
                                             ["queued-resources", "scp"], ["queued-resources", "ssh"],
                                             ["queued-resources", "ssh"]]
  assert lines[1] == ("+ gcloud compute tpus queued-resources create k15-ms --zone=us-east5-a --project=p "
                      "--accelerator-type=v5p-32 --runtime-version=v2-alpha-tpuv5 --node-count=2 --node-prefix=k15-ms "
                      "--spot")
  assert "until the state is ACTIVE" in out
  for line in lines[2:]:
    assert "--node=all --worker=all" in line
  assert "K15_NUM_PROCESSES=8 " in lines[-1]
  _, deleted = _dry_run(["delete", *common], monkeypatch)
  assert deleted == ["+ gcloud compute tpus queued-resources delete k15-ms --zone=us-east5-a --project=p --force "
                     "--quiet"]


def test_queued_resource_is_waited_for_until_active(monkeypatch):
  states = iter(["", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
  calls = []
  runner = tpu.Runner(dry_run=True, stream=io.StringIO())
  runner.dry_run = False  # run "for real" against the fakes below
  monkeypatch.setattr(runner, "output", lambda cmd: (calls.append(cmd[4]), next(states))[1])
  monkeypatch.setattr(tpu.Runner, "__call__", lambda self, cmd, check=True: calls.append(cmd[4]) or 0)
  args = tpu.parse(["create", "--name=q", "--zone=z", "--accelerator=v5p-32", "--num_slices=2"])
  tpu.create(args, runner, poll_s=0)
  assert calls == ["describe", "create", "describe", "describe", "describe"]
  states = iter(["FAILED"])
  monkeypatch.setattr(runner, "output", lambda cmd: next(states))
  with pytest.raises(tpu.LaunchError, match="queued resource q is FAILED"):
    tpu.create(args, runner, poll_s=0)


def test_readme_shows_what_the_multi_slice_dry_run_prints(monkeypatch):
  """README's abridged --dry_run output is the command's: one line per printed gcloud command, in order, and the
  pieces of each (cut at '...') appear in that order in the printed line."""
  with open(os.path.join(REPO, "README.md")) as f:
    block = f.read().split("what --dry_run prints, abridged:\n")[1].split("```")[0].splitlines()
  argv = (block[0].rstrip("\\") + block[1]).split()
  assert argv[:5] == ["python", "-m", "launch.tpu", "up", "--dry_run"]
  shown = [line[2:] for line in block[2:]]
  assert shown and all(line.startswith("+ gcloud ") for line in shown), block
  _, printed = _dry_run(argv[3:4] + argv[5:], monkeypatch)
  assert len(printed) == len(shown)
  for abridged, line in zip(shown, printed):
    at = 0
    for piece in filter(None, (p.strip() for p in abridged.split("..."))):
      found = line.find(piece, at)
      assert found >= at and (at or found == 0), (piece, line)
      at = found + len(piece)


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


def _worker_home(tmp_path, python_body):
  """A fake worker: HOME with the checkout and the venv's python replaced by a recorder."""
  (tmp_path / "k15").mkdir()
  venv_python = tmp_path / "k15-venv" / "bin" / "python"
  venv_python.parent.mkdir(parents=True)
  venv_python.write_text("#!/bin/bash\n" + python_body + "\n")
  venv_python.chmod(0o755)
  return dict(os.environ, HOME=str(tmp_path), PATH="/usr/bin:/bin")


def test_run_script_starts_train_in_the_venv_with_the_cache(tmp_path):
  """The worker-side script under bash: the run gets its process count and compilation cache, the gs:// workdir as
  it is, and the script streams the log and returns when the run ends."""
  env = _worker_home(tmp_path, 'echo "python K15_NUM_PROCESSES=$K15_NUM_PROCESSES '
                               'JAX_COMPILATION_CACHE_DIR=$JAX_COMPILATION_CACHE_DIR $*"')
  script = tpu.run_script("gs://my-bucket/runs/a", 4, ["--config=experiments/configs/x.py:v5p-32", "--config.seed=3"])
  out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
  assert out.returncode == 0, out.stderr
  expected = ("python K15_NUM_PROCESSES=4 JAX_COMPILATION_CACHE_DIR=gs://my-bucket/runs/a/jax_cache -m "
              "experiments.train --workdir=gs://my-bucket/runs/a --config=experiments/configs/x.py:v5p-32 "
              "--config.seed=3")
  assert (tmp_path / "k15-run.log").read_text().splitlines() == [expected]
  assert expected in out.stdout  # streamed


def test_run_script_fails_when_training_fails(tmp_path):
  env = _worker_home(tmp_path, "echo dying; exit 3")
  rc = subprocess.run(["bash", "-c", tpu.run_script("gs://bkt/x", 2, ["--config=c.py"])], env=env, timeout=30,
                      capture_output=True).returncode
  assert rc == 3  # the run's exit code


def test_run_script_detached_returns_at_once(tmp_path):
  env = _worker_home(tmp_path, "sleep 5")
  start = time.time()
  out = subprocess.run(["bash", "-c", tpu.run_script("gs://bkt/x", 2, ["--config=c.py"], detach=True)], env=env,
                       timeout=30, capture_output=True, text=True)
  assert out.returncode == 0 and "log in ~/k15-run.log" in out.stdout and time.time() - start < 4


def test_install_script_makes_a_venv_and_pins_jax_tpu(tmp_path):
  """The worker-side install under bash with tar, curl (uv's installer) and uv replaced by recorders: uv is installed
  only when missing, the venv gets setup.py's Python, and k15 goes into it with jax[tpu] at setup.py's pin."""
  log, home = tmp_path / "calls.log", str(tmp_path)
  _fake_bin(tmp_path, "tar", f'echo "tar $*" >> {log}')
  uv = f"{home}/.local/bin/uv"  # the installer's script (curl's output) writes a uv that records its calls
  _fake_bin(tmp_path, "curl", f"""echo "curl $*" >> {log}; cat <<'EOF'
mkdir -p {home}/.local/bin && printf '#!/bin/bash\\necho "uv $*" >> {log}\\n' > {uv} && chmod +x {uv}
EOF""")
  env = dict(os.environ, HOME=home, PATH=f"{tmp_path / 'bin'}:/usr/bin:/bin")
  script = tpu.install_script("k15-src.tar.gz")
  with open(os.path.join(REPO, "setup.py")) as f:
    setup_py = f.read()
  pin = setup_py.split('"jax==')[1].split('"')[0]
  python = setup_py.split('python_requires=">=')[1].split('"')[0]
  expected = [f"tar xzf {home}/k15-src.tar.gz -C {home}/k15",
              "curl -LsSf https://astral.sh/uv/install.sh",
              f"uv venv --allow-existing --python {python} {home}/k15-venv",
              f"uv pip install --python {home}/k15-venv/bin/python -e .[math,gcs] jax[tpu]=={pin}"]
  subprocess.run(["bash", "-c", script], env=env, check=True, timeout=30)
  assert log.read_text().splitlines() == expected
  log.write_text("")
  subprocess.run(["bash", "-c", script], env=env, check=True, timeout=30)  # again: uv is there now
  assert log.read_text().splitlines() == expected[:1] + expected[2:]


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
