"""Code rewards and the sandbox: honest programs pass, hostile ones end with reward 0, a reason, nothing left over.

Each hostile program's test case expects the output it would print if its attack worked, so reward 1 would mean
an escape. Targets the program should not reach are made world-accessible here (or owned by the trainer's own
uid), so that only the sandbox's namespaces stand between them and the program.
"""
import ctypes
import json
import os
import pwd
import random
import secrets
import shutil
import socket
import subprocess
import tempfile
import time

import psutil
import pytest

import k15
from k15.rewards import sandbox as sandbox_lib
from k15.rewards.code import CodeVerifier, extract_code
from k15.rewards.sandbox import Sandbox, SandboxConfig, SandboxUnavailable, processes_of_uid
from k15.rewards.verifiers import Verifier

CONFIG = dict(wall_timeout_s=2.0, cpu_time_s=1, memory_mb=256, max_processes=8, max_output_bytes=64 << 10)
_HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers")


def _py(code: str) -> str:
  return f"Here is my solution.\n```python\n{code}\n```\n"


@pytest.fixture
def verifier(tmp_path, monkeypatch):
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  work = tmp_path / "work"
  work.mkdir()
  with CodeVerifier(SandboxConfig(work_root=str(work), **CONFIG), num_workers=2) as v:
    yield v
  assert not os.listdir(work), "run directories must be removed"
  uids = v.sandbox.uids if v.sandbox.isolation["uid_drop"] else []  # else they are our own uid
  deadline = time.monotonic() + 3
  while any(processes_of_uid(u) for u in uids) or _sandbox_children():
    assert time.monotonic() < deadline, ([processes_of_uid(u) for u in uids], _sandbox_children())
    time.sleep(0.05)


def _sandbox_children():
  """Our descendants that belong to a sandbox run: its init processes and programs (`python -I -S -c ...`), kill."""
  return [p for p in psutil.Process().children(recursive=True)
          if p.name() == "kill" or p.cmdline()[1:4] == ["-I", "-S", "-c"]]


@pytest.fixture
def shared_dir():
  """A fresh directory under /tmp that every user may enter (chmod it for more)."""
  path = tempfile.mkdtemp(prefix="k15-sandbox-test-", dir="/tmp")
  os.chmod(path, 0o755)
  yield path
  shutil.rmtree(path)


def test_extract_code():
  assert extract_code("```python\na = 1\n```\nthen\n```py\nb = 2\n```") == "b = 2\n"
  assert extract_code("```\nprint(1)\n```") == "print(1)\n"
  assert extract_code("no code") is None


def test_honest_programs_pass_and_wrong_ones_fail(verifier):
  add_stdin = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6"}]
  add_fn = [{"fn_name": "add", "args": [1, 2], "expected": 3}, {"fn_name": "add", "args": [0.1, 0.2], "expected": 0.3}]
  pairs_fn = [{"fn_name": "pairs", "args": [[3, 1, 2]], "expected": [[1, 2], [2, 3]]}]
  results = verifier.score(
      [_py("a, b = map(int, input().split())\nprint(a + b)"),
       _py("a, b = map(int, input().split())\nprint(a - b)"),
       _py("def add(a, b):\n  return a + b"),
       _py("class Solution:\n  def pairs(self, xs):\n    xs = sorted(xs)\n    return list(zip(xs, xs[1:]))"),
       _py("def add(a, b):\n  return a * b"),
       "I would just add them.",
       _py("def sub(a, b):\n  return a - b")],
      [add_stdin, add_stdin, add_fn, pairs_fn, add_fn, add_stdin, add_fn])
  assert [r.reward for r in results] == [1, 0, 1, 1, 0, 0, 0]
  assert results[1].reason == "test 0: wrong answer"
  assert results[4].reason == "test 0: wrong answer"
  assert results[5].reason == "no code block"
  assert "no function add" in results[6].reason


def test_isolation_is_on_here(verifier):
  # This machine allows namespaces and runs tests as root; elsewhere the report says what is missing.
  if os.geteuid() == 0:
    assert verifier.sandbox.isolation == {"uid_drop": True, "namespaces": True}


def _hostile(verifier, code, expected_if_escaped, **case):
  test = {"input": "", "output": expected_if_escaped, **case}
  t0 = time.monotonic()
  result = verifier.score([_py(code)], [[test]])[0]
  assert time.monotonic() - t0 < CONFIG["wall_timeout_s"] + 2
  assert result.reward == 0.0, result
  return result.reason


def test_infinite_loop(verifier):
  reason = _hostile(verifier, "while True:\n  pass", "done")
  assert "timeout" in reason or "SIGXCPU" in reason, reason


def test_sleeping_forever_hits_the_wall_clock(verifier):
  reason = _hostile(verifier, "import time\ntime.sleep(1000)", "done")
  assert reason.startswith("test 0: timeout (wall time limit 2 s)"), reason


def test_fork_bomb(verifier):
  reason = _hostile(verifier, "import os\nwhile True:\n  try:\n    os.fork()\n  except OSError:\n    pass", "done")
  assert "timeout" in reason or "SIGXCPU" in reason, reason


def test_process_cap_is_enforced(tmp_path):
  sandbox = Sandbox(SandboxConfig(work_root=str(tmp_path), **CONFIG))
  code = ("import os, time\nn = 0\nfor _ in range(50):\n  try:\n    if os.fork() == 0:\n      time.sleep(5)\n"
          "      os._exit(0)\n    n += 1\n  except OSError:\n    break\nprint(n)")
  run = sandbox.run({"main.py": code})
  assert run.status == "ok", run
  assert int(run.stdout) < CONFIG["max_processes"]  # the program itself is one of them
  sandbox.close()


def test_memory_hog(verifier):
  reason = _hostile(verifier, "blocks = []\nwhile True:\n  blocks.append(bytearray(64 << 20))", "done")
  assert reason.startswith("test 0: runtime error") and "MemoryError" in reason, reason


def test_huge_output(verifier):
  reason = _hostile(verifier, "while True:\n  print('x' * 100000)", "done")
  assert reason.startswith("test 0: output limit exceeded"), reason


def test_writing_outside_its_directory(verifier, shared_dir):
  os.chmod(shared_dir, 0o777)
  target = os.path.join(shared_dir, "outside.txt")
  reason = _hostile(verifier, f"open({target!r}, 'w').write('pwned')\nprint('written')", "written")
  assert "FileNotFoundError" in reason, reason  # the directory is not in the program's tree
  assert not os.listdir(shared_dir)


def test_writing_into_a_world_writable_subdirectory(verifier, shared_dir):
  os.chmod(shared_dir, 0o1777)  # like /tmp/.X11-unix or a shared scratch directory
  reason = _hostile(verifier, f"open({shared_dir + '/stray'!r}, 'w').write('x')\nprint('written')", "written")
  assert "FileNotFoundError" in reason, reason
  assert not os.listdir(shared_dir)


def test_tmp_is_private(verifier):
  # Writing to /tmp works (programs may need scratch space) but lands in the run's own tmpfs.
  stray = f"/tmp/k15-sandbox-stray-{secrets.token_hex(4)}"
  code = f"open({stray!r}, 'w').write('x')\nprint('written')"
  assert verifier.score([_py(code)], [[{"input": "", "output": "written"}]])[0].reward == 1.0
  assert not os.path.exists(stray)


def test_reading_a_prompt_file_for_its_answer(verifier, shared_dir):
  answer = secrets.token_hex(8)
  prompts = os.path.join(shared_dir, "train.jsonl")
  with open(prompts, "w") as f:
    f.write(json.dumps({"question": "Print the secret.", "answer": answer}) + "\n")
  os.chmod(prompts, 0o644)  # world-readable, as prompt files usually are
  code = f"import json\nprint(json.loads(open({prompts!r}).readline())['answer'])"
  reason = _hostile(verifier, code, answer)
  assert "FileNotFoundError" in reason, reason


def test_the_program_sees_only_its_directory_and_the_interpreter(tmp_path):
  sandbox = Sandbox(SandboxConfig(work_root=str(tmp_path), **CONFIG))
  hidden = [os.path.abspath(__file__), os.path.dirname(k15.__file__), os.path.expanduser("~"), str(tmp_path),
            os.getcwd(), "/etc/passwd", "/var", "/home", "/root"]
  code = ("import json, os\nprint(json.dumps({'/': os.listdir('/'), '/etc': os.listdir('/etc'), "
          "'/usr/bin': os.listdir('/usr/bin'), '/work': os.listdir('/work'), 'cwd': os.getcwd(), "
          f"'seen': [p for p in {hidden!r} if os.path.exists(p)]}}))")
  run = sandbox.run({"main.py": code})
  sandbox.close()
  assert run.status == "ok", run
  seen = json.loads(run.stdout)
  assert seen["seen"] == []
  assert set(seen["/"]) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp", "usr",
                            "work"}, seen["/"]
  assert seen["/etc"] == ["ld.so.cache"]
  assert seen["/usr/bin"] == [os.path.basename(os.path.realpath("/usr/bin/python3"))]  # the interpreter alone
  assert (seen["/work"], seen["cwd"]) == (["main.py"], "/work")


def _ipc_keys(kind: str) -> set:
  """Keys of the SysV IPC objects (kind "-m" shared memory, "-q" message queues) that `ipcs` lists."""
  out = subprocess.run(["ipcs", kind], capture_output=True, text=True, check=True).stdout
  return {int(line.split()[0], 16) for line in out.splitlines() if line.startswith("0x")}


@pytest.fixture
def host_segment():
  """(key, secret): a world-readable SysV shared memory segment holding a secret, removed afterwards."""
  libc = ctypes.CDLL(None, use_errno=True)
  libc.shmat.restype = ctypes.c_void_p
  key, secret = random.randrange(1 << 20, 1 << 30), secrets.token_hex(8)
  shmid = libc.shmget(key, 4096, 0o1666)  # IPC_CREAT | rw for everyone
  assert shmid >= 0, os.strerror(ctypes.get_errno())
  addr = libc.shmat(shmid, None, 0)
  ctypes.memmove(addr, secret.encode(), len(secret))
  libc.shmdt(ctypes.c_void_p(addr))
  yield key, secret
  libc.shmctl(shmid, 0, None)  # IPC_RMID


# Creates a 64 MB segment and a message queue of its own (asserting both worked), then prints the secret of the
# trainer's segment KEY if it can attach it.
_SYSV_PROGRAM = """\
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
own = libc.shmget(OWN, 64 << 20, 0o1666)
assert own >= 0 and libc.shmat(own, None, 0) != ctypes.c_void_p(-1).value, ctypes.get_errno()
assert libc.msgget(OWN, 0o1666) >= 0, ctypes.get_errno()
host = libc.shmget(KEY, 0, 0)
addr = libc.shmat(host, None, 0) if host >= 0 else None
print("created", ctypes.string_at(addr, 16).decode() if addr not in (None, ctypes.c_void_p(-1).value) else "")
"""


def test_sysv_shared_memory(verifier, host_segment):
  key, secret = host_segment
  own = random.randrange(1 << 20, 1 << 30)
  code = _SYSV_PROGRAM.replace("OWN", str(own)).replace("KEY", str(key))
  # "wrong answer": the program ran to its end, so it did create both objects, and found no trainer's segment.
  assert _hostile(verifier, code, f"created {secret}") == "test 0: wrong answer"
  assert key in _ipc_keys("-m")  # ipcs sees the trainer's segment...
  assert own not in _ipc_keys("-m") and own not in _ipc_keys("-q")  # ...and nothing of the program's


def test_filesystem_and_abstract_unix_sockets(verifier, shared_dir):
  os.chmod(shared_dir, 0o777)
  path, abstract = os.path.join(shared_dir, "trainer.sock"), "\0k15-sandbox-test-" + secrets.token_hex(4)
  listeners = []
  for address in (path, abstract):
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(address)
    listener.listen(1)
    listener.setblocking(False)
    listeners.append(listener)
  os.chmod(path, 0o777)  # anyone may connect
  code = (f"import socket\nfor address in ({path!r}, {abstract!r}):\n  try:\n    s = socket.socket(socket.AF_UNIX)\n"
          "    s.connect(address)\n    s.sendall(b'pwned')\n    print('connected')\n"
          "  except OSError as e:\n    print(type(e).__name__)")
  assert _hostile(verifier, code, "connected\nconnected") == "test 0: wrong answer"
  for listener in listeners:
    with pytest.raises(BlockingIOError):  # nobody connected
      listener.accept()
    listener.close()


def test_parent_environment_is_invisible(verifier, monkeypatch):
  secret = secrets.token_hex(8)
  monkeypatch.setenv("K15_SANDBOX_SECRET", secret)
  code = ("import os\nprint(os.environ.get('K15_SANDBOX_SECRET', ''))\n"
          "for pid in os.listdir('/proc'):\n  try:\n    env = open(f'/proc/{pid}/environ', 'rb').read()\n"
          "  except OSError:\n    continue\n  if b'K15_SANDBOX_SECRET' in env:\n"
          "    print(env.split(b'K15_SANDBOX_SECRET=')[1].split(b'\\0')[0].decode())")
  assert _hostile(verifier, code, secret) == "test 0: wrong answer"


def test_no_network(verifier):
  if not verifier.sandbox.isolation["namespaces"]:
    pytest.skip("no network namespace on this machine")
  with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')"
    reason = _hostile(verifier, code, "connected")
    assert "OSError" in reason or "unreachable" in reason, reason
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):  # nobody connected
      listener.accept()


def test_killing_its_parent(verifier):
  me = os.getpid()
  code = ("import os, signal\nfor pid in (os.getppid(), " + str(me) + ", -1):\n  try:\n"
          "    os.kill(pid, signal.SIGKILL)\n  except OSError as e:\n    print(pid, e)\nprint('sent')")
  reason = _hostile(verifier, code, "trainer killed")
  assert reason == "test 0: wrong answer", reason
  assert psutil.pid_exists(me)  # we are still here to check it


def test_orphans_are_killed(verifier):
  # The program leaves a detached sleeper behind and exits happily: it passes, and the sleeper must not survive.
  code = "import os, time\nif os.fork() == 0:\n  os.setsid()\n  time.sleep(1000)\nprint('ok')"
  assert verifier.score([_py(code)], [[{"input": "", "output": "ok"}]])[0].reward == 1.0


def test_runs_in_parallel(verifier):
  # Two 1-second sleepers on two workers take about 1 s, not 2.
  t0 = time.monotonic()
  results = verifier.score([_py("import time\ntime.sleep(1)\nprint(1)")] * 2, [[{"input": "", "output": "1"}]] * 2)
  assert [r.reward for r in results] == [1.0, 1.0]
  assert time.monotonic() - t0 < 1.8


def test_sandboxes_claim_distinct_uids(tmp_path):
  if os.geteuid() != 0:
    pytest.skip("uids are claimed only as root")
  a = Sandbox(SandboxConfig(work_root=str(tmp_path), **CONFIG), slots=2)
  b = Sandbox(SandboxConfig(work_root=str(tmp_path), **CONFIG), slots=2)
  assert len(set(a.uids + b.uids)) == 4 and 0 not in a.uids + b.uids
  a.close()
  c = Sandbox(SandboxConfig(work_root=str(tmp_path), **CONFIG), slots=2)
  assert set(c.uids) == set(a.uids)  # released ones are reused first
  b.close()
  c.close()


def test_refuses_to_run_without_namespaces_unless_allowed(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="allow_unisolated"):
    Sandbox(SandboxConfig(work_root=str(tmp_path), namespaces=False))
  # An empty root: the interpreter cannot start inside the namespaces, as where a machine forbids them.
  monkeypatch.setattr(sandbox_lib, "_interpreter_tree", lambda python: ([], []))
  with pytest.raises(SandboxUnavailable, match=r"exec .*python.*No such file.*allow_unisolated=True"):
    Sandbox(SandboxConfig(work_root=str(tmp_path), **CONFIG))
  sandbox = Sandbox(SandboxConfig(work_root=str(tmp_path), allow_unisolated=True, **CONFIG))
  assert sandbox.isolation == {"uid_drop": os.geteuid() == 0, "namespaces": False}
  assert sandbox.run({"main.py": "print(6 * 7)"}).stdout == b"42\n"
  sandbox.close()


_ADD = {"domain": "code", "test_cases": [{"input": "2 3\n", "output": "5"}]}
_ADDER = _py("a, b = map(int, input().split())\nprint(a + b)")


def test_verifier_raises_when_the_sandbox_refuses(tmp_path, monkeypatch):
  monkeypatch.setattr(sandbox_lib, "_interpreter_tree", lambda python: ([], []))  # as in the test above
  with Verifier(sandbox_config=SandboxConfig(work_root=str(tmp_path), **CONFIG)) as verifier:
    with pytest.raises(SandboxUnavailable):  # a configuration error, not a reward of 0
      verifier([_ADDER], [_ADD])


def test_verifier_scores_a_sandbox_failure_zero_and_counts_it(tmp_path):
  work = tmp_path / "work"
  work.mkdir()
  with Verifier(sandbox_config=SandboxConfig(work_root=str(work), **CONFIG)) as verifier:
    assert verifier([_ADDER], [_ADD]).tolist() == [1.0]
    work.rmdir()  # no run directory can be made: the sandbox fails, not the program
    assert verifier([_ADDER, _ADDER], [_ADD, _ADD]).tolist() == [0.0, 0.0]
    assert verifier.failures == 2
    assert [r for r in verifier.reasons if r.startswith("verifier failure: FileNotFoundError")], verifier.reasons
    work.mkdir()
    assert verifier([_ADDER], [_ADD]).tolist() == [1.0]  # a fresh sandbox on the next call
    assert verifier.failures == 2


def test_without_namespaces_root_removes_what_the_run_uid_left(tmp_path, shared_dir):
  if os.geteuid() != 0:
    pytest.skip("without namespaces, only a uid of its own (root's to give) makes a run's leftovers recognizable")
  os.chmod(shared_dir, 0o1777)
  sandbox = Sandbox(SandboxConfig(work_root=str(tmp_path), namespaces=False, allow_unisolated=True, **CONFIG))
  assert sandbox.isolation == {"uid_drop": True, "namespaces": False}
  own = random.randrange(1 << 20, 1 << 30)
  code = _SYSV_PROGRAM.replace("OWN", str(own)).replace("KEY", "0") + f"open({shared_dir + '/stray'!r}, 'w')"
  run = sandbox.run({"main.py": code})
  sandbox.close()
  assert run.status == "ok", run  # this mode lets it write there and create IPC objects...
  assert not os.listdir(shared_dir)  # ...and removes them after the run
  assert own not in _ipc_keys("-m") and own not in _ipc_keys("-q")


def _free_uid() -> int:
  """A uid no user has and no process runs as."""
  while True:
    uid = random.randrange(63000, 64000)
    try:
      pwd.getpwuid(uid)
    except KeyError:
      if not processes_of_uid(uid):
        return uid


def test_non_root_trainer_cannot_touch_its_own_files():
  """A trainer running as an ordinary user: the program runs as that user's uid (in a user namespace) but must not
  write its checkpoints or cached native kernels, create files in its home, or read its prompt files."""
  python = "/usr/bin/python3"  # as root we switch to a fresh uid, which may not run an interpreter under /root
  if os.geteuid() == 0 and not os.access(python, os.X_OK):
    pytest.skip(f"no {python} that an unprivileged user can run")
  uid = _free_uid() if os.geteuid() == 0 else os.geteuid()
  home = tempfile.mkdtemp(prefix="k15-trainer-home-", dir="/tmp")
  try:
    files = {"ckpt/params.msgpack": "good params", ".cache/k15/native/step.so": "kernel",
             "data/train.jsonl": json.dumps({"question": "Print the secret.", "answer": secrets.token_hex(8)})}
    for name, text in files.items():
      os.makedirs(os.path.dirname(os.path.join(home, name)), exist_ok=True)
      with open(os.path.join(home, name), "w") as f:
        f.write(text)
    package = os.path.dirname(k15.__file__)  # the k15 files the scorer needs, where the uid can read them
    for name in ("__init__.py", "rewards/__init__.py", "rewards/code.py", "rewards/math.py", "rewards/sandbox.py",
                 "rewards/sandbox_init.py"):
      os.makedirs(os.path.join(home, "lib/k15/rewards"), exist_ok=True)
      shutil.copy(os.path.join(package, name), os.path.join(home, "lib/k15", name))
    trainer = os.path.join(home, "lib/sandbox_trainer.py")  # the checkout may sit in a directory the uid cannot read
    shutil.copy(os.path.join(_HELPERS, "sandbox_trainer.py"), trainer)
    os.makedirs(os.path.join(home, "work"))
    for parent, dirs, names in os.walk(home):
      for name in [parent] + [os.path.join(parent, n) for n in dirs + names]:
        os.chown(name, uid, uid)
    os.chmod(home, 0o700)
    targets = [os.path.join(home, n) for n in ("ckpt/params.msgpack", ".cache/k15/native/step.so", ".bashrc")]
    writer = f"for path in {targets!r}:\n  open(path, 'a').write('pwned')\nprint('pwned')"
    reader = f"print(open({os.path.join(home, 'data/train.jsonl')!r}).read())"
    job = {"work_root": os.path.join(home, "work"), "responses": [_py(writer), _py(reader)],
           "tests": [[{"input": "", "output": "pwned"}], [{"input": "", "output": files["data/train.jsonl"]}]]}
    as_uid = dict(user=uid, group=uid, extra_groups=[]) if os.geteuid() == 0 else {}
    env = {"PATH": "/usr/bin:/bin", "HOME": home, "PYTHONPATH": os.path.join(home, "lib")}
    out = subprocess.run([python, "-s", trainer, json.dumps(job)], **as_uid,
                         env=env, cwd=home, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    # Independent of the sandbox: may this uid create a user namespace (with the others the sandbox needs)?
    flags = 0x10000000 | 0x20000 | 0x20000000 | 0x40000000 | 0x8000000  # CLONE_NEWUSER, NEWNS, NEWPID, NEWNET, NEWIPC
    probe = f"import ctypes; assert ctypes.CDLL(None, use_errno=True).unshare({flags}) == 0"
    userns = subprocess.run([python, "-I", "-S", "-c", probe], **as_uid, env={}, capture_output=True).returncode == 0
    if not userns:  # the kernel forbids it: the sandbox must refuse rather than run the programs as the trainer
      assert "allow_unisolated" in result["unavailable"], result
      return
    assert result["isolation"] == {"uid_drop": False, "namespaces": True}, result
    (writer_reward, writer_reason), (reader_reward, reader_reason) = result["rewards"]
    assert writer_reward == 0.0 and "FileNotFoundError" in writer_reason, writer_reason
    assert reader_reward == 0.0 and "FileNotFoundError" in reader_reason, reader_reason
    for name, text in files.items():
      with open(os.path.join(home, name)) as f:
        assert f.read() == text, name
    assert not os.path.exists(os.path.join(home, ".bashrc"))
    assert not os.listdir(os.path.join(home, "work")), "run directories must be removed"
    if os.geteuid() == 0:
      assert not processes_of_uid(uid)
  finally:
    shutil.rmtree(home)
