"""Code rewards and the sandbox: honest programs pass, hostile ones end with reward 0, a reason, nothing left over.

Each hostile program's test case expects the output it would print if its attack worked, so reward 1 would mean
an escape.
"""
import os
import secrets
import socket
import time

import psutil
import pytest

from k15.rewards.code import CodeVerifier, extract_code
from k15.rewards.sandbox import Sandbox, SandboxConfig, processes_of_uid

CONFIG = dict(wall_timeout_s=2.0, cpu_time_s=1, memory_mb=256, max_processes=8, max_output_bytes=64 << 10)
_HELPERS = {"unshare", "sh", "prlimit", "setpriv", "kill", "python3"}


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
  while any(processes_of_uid(u) for u in uids) or _helper_children():
    assert time.monotonic() < deadline, ([processes_of_uid(u) for u in uids], _helper_children())
    time.sleep(0.05)


def _helper_children():
  return [p for p in psutil.Process().children(recursive=True) if p.name() in _HELPERS]


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


def test_writing_outside_its_directory(verifier, tmp_path):
  target = tmp_path / "outside.txt"
  reason = _hostile(verifier, f"open({str(target)!r}, 'w').write('pwned')\nprint('written')", "written")
  assert "PermissionError" in reason, reason
  assert not target.exists()


def test_files_left_in_world_writable_dirs_are_removed(verifier):
  if not verifier.sandbox.isolation["uid_drop"]:
    pytest.skip("only a sandbox uid makes the run's files recognizable")
  stray = f"/tmp/k15-sandbox-stray-{secrets.token_hex(4)}"
  code = f"open({stray!r}, 'w').write('x')\nprint('written')"
  assert verifier.score([_py(code)], [[{"input": "", "output": "written"}]])[0].reward == 1.0
  assert not os.path.exists(stray)


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
