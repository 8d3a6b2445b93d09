"""Run an untrusted Python program in a subprocess with limits; nothing of it runs in the trainer's process.

Layers, each used when the machine allows it (`Sandbox.isolation` says which are on):
  * rlimits via prlimit(1): CPU seconds, address space, processes, file size, open files, no core dumps;
  * as root, the program runs as a dedicated unprivileged uid per parallel slot (setpriv(1): no groups, no
    capabilities, no-new-privs). Root is exempt from RLIMIT_NPROC, and a uid per slot makes the process cap
    per run and lets us kill every process of a run with one kill(-1) as that uid (fork bombs, setsid escapes);
  * namespaces via unshare(1): no network (a fresh net namespace has only a down loopback), a pid namespace
    with its own /proc (the program cannot see or name the trainer; when the namespace's init, a shell
    waiting on the program, exits, the kernel kills whatever the program left). Without root, `unshare -r`
    does the same in a user namespace;
  * a fresh temporary directory as cwd (removed afterwards), an empty environment apart from PATH, HOME and
    the locale, `python -I -S` (no site-packages, no PYTHON* variables, no script dir on sys.path);
  * a wall-clock timeout and output caps enforced by the parent, which kills the whole run on either.
Limitations: the program can read world-readable files; as root its files in world-writable directories
(/tmp, /dev/shm, ...) are removed after the run, otherwise they stay. Without unshare there is no network or
pid isolation, and without root a program could signal other processes of the trainer's user (and
RLIMIT_NPROC counts all of that user's processes, so a run can hardly fork at all).
"""
import dataclasses
import fcntl
import logging
import os
import queue
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Optional

log = logging.getLogger(__name__)
# Runs main.py by its relative name. `python main.py` (and runpy) open it by absolute path, which fails when an
# ancestor of the run directory is closed to other users, as pytest's tmp dirs are (to our benefit: the program
# cannot reach sibling runs by path).
_BOOT = ("import sys; sys.argv = ['main.py']; __file__ = 'main.py'; "
         "exec(compile(open('main.py', 'rb').read(), 'main.py', 'exec'))")
_WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
  """Limits of one run."""
  wall_timeout_s: float = 4.0  # killed after this much real time
  cpu_time_s: int = 2  # RLIMIT_CPU: SIGXCPU, then SIGKILL
  memory_mb: int = 512  # RLIMIT_AS: the address space, so allocations fail with MemoryError
  max_processes: int = 8  # RLIMIT_NPROC: processes and threads of the run's uid
  max_file_mb: int = 16  # RLIMIT_FSIZE: a larger write gets SIGXFSZ
  max_open_files: int = 64  # RLIMIT_NOFILE
  max_output_bytes: int = 1 << 20  # per stream; more kills the run
  python: str = ""  # interpreter; "" = /usr/bin/python3 (any uid can run it; a venv under /root may not), else PATH
  work_root: str = ""  # where run directories are made; "" = tempfile.gettempdir()
  uid_base: int = 61000  # as root, each slot claims a free uid from here up (no such user needs to exist)
  namespaces: bool = True  # no network, own pid namespace, when unshare works here


@dataclasses.dataclass(frozen=True)
class RunResult:
  """status: "ok" (exit 0), "error" (nonzero exit), "signal", "timeout" or "output_limit"."""
  status: str
  returncode: Optional[int]
  stdout: bytes
  stderr: bytes
  duration_s: float
  detail: str  # human-readable cause, e.g. "killed by SIGXCPU (CPU time limit)"


def _which(name: str) -> Optional[str]:
  return shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")


def processes_of_uid(uid: int) -> list[int]:
  """Pids of the processes (zombies included) owned by uid."""
  pids = []
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        if os.stat(f"/proc/{name}").st_uid == uid:
          pids.append(int(name))
      except OSError:  # exited meanwhile
        pass
  return pids


def _describe_signal(signum: int) -> str:
  name = signal.Signals(signum).name if signum in signal.valid_signals() else f"signal {signum}"
  why = {signal.SIGXCPU: " (CPU time limit)", signal.SIGXFSZ: " (file size limit)"}.get(signum, "")
  return f"killed by {name}{why}"


class Sandbox:
  """Runs programs under the limits of a config; `run` is thread-safe, at most `slots` runs at a time."""

  def __init__(self, config: SandboxConfig = SandboxConfig(), slots: int = 1):
    self.config = config
    self._prlimit = _which("prlimit")
    if self._prlimit is None:
      raise RuntimeError("prlimit (util-linux) not found; the sandbox needs it for rlimits")
    self._python = config.python or ("/usr/bin/python3" if os.path.exists("/usr/bin/python3") else
                                     shutil.which("python3"))
    self._root = os.geteuid() == 0
    self._setpriv = _which("setpriv") if self._root else None
    self._kill = _which("kill")
    if self._setpriv and self._kill is None:
      raise RuntimeError("kill (procps) not found; the sandbox needs it to end a run as root")
    self._sh = _which("sh")
    self._unshare = self._probe_unshare() if config.namespaces and self._sh else None
    self.isolation = {"uid_drop": self._setpriv is not None, "namespaces": self._unshare is not None}
    self._locks = []  # held for the sandbox's life: the claim on each slot's uid
    self.uids = self._claim_uids(slots) if self._setpriv else [os.geteuid()] * slots  # one per slot
    self._slots: "queue.Queue[int]" = queue.Queue()
    for uid in self.uids:
      self._slots.put(uid)

  def _claim_uids(self, n: int) -> list[int]:
    """n uids no other sandbox on this machine uses (flock on a file per uid, released when we exit).

    Trainers of other users or jobs share the machine: two runs under one uid would share RLIMIT_NPROC and kill
    each other's processes. A claimed uid's leftover processes are stale (their sandbox is gone): killed.
    """
    lock_dir = os.path.join("/run/lock" if os.access("/run/lock", os.W_OK) else "/tmp", "k15-sandbox-uids")
    os.makedirs(lock_dir, mode=0o755, exist_ok=True)
    uids = []
    for uid in range(self.config.uid_base, self.config.uid_base + 65536):
      f = open(os.path.join(lock_dir, str(uid)), "a")  # pylint: disable=consider-using-with
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        f.close()
        continue
      self._locks.append(f)
      self._kill_uid(uid)
      uids.append(uid)
      if len(uids) == n:
        return uids
    raise RuntimeError(f"no {n} free sandbox uids from {self.config.uid_base}")

  def close(self) -> None:
    """Releases the slots' uids (also done when the process exits)."""
    for f in self._locks:
      f.close()
    self._locks = []

  def _probe_unshare(self) -> Optional[list[str]]:
    """The unshare prefix if it works here (containers often forbid namespaces), else None."""
    exe = _which("unshare")
    if exe is None:
      return None
    prefix = [exe] + ([] if self._root else ["--map-root-user"]) + [
        "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--"]
    try:
      ok = subprocess.run(prefix + ["true"], capture_output=True, timeout=10, env={}).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
      ok = False
    return prefix if ok else None

  def _command(self, uid: int) -> list[str]:
    c = self.config
    cmd = []
    if self._unshare:
      # A shell as the namespace's pid 1: the program would otherwise be init, which ignores default-action
      # signals and whose death unshare misreports. "; exit $?" keeps dash from exec-ing the command.
      cmd = self._unshare + [self._sh, "-c", '"$@"; exit $?', "sh"]
    cmd += [self._prlimit, f"--cpu={c.cpu_time_s}:{c.cpu_time_s + 1}", f"--as={c.memory_mb << 20}",
            f"--nproc={c.max_processes}", f"--fsize={c.max_file_mb << 20}", f"--nofile={c.max_open_files}",
            "--core=0", "--"]
    if self._setpriv:
      cmd += [self._setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
              "--bounding-set=-all", "--"]
    return cmd + [self._python, "-I", "-S", "-c", _BOOT]

  def run(self, files: dict[str, str], stdin: str = "") -> RunResult:
    """Runs `python main.py` in a fresh directory holding `files` (name -> text), with `stdin` as input."""
    if "main.py" not in files:
      raise ValueError("files must include main.py")
    uid = self._slots.get()
    try:
      return self._run(files, stdin, uid)
    finally:
      self._slots.put(uid)

  def _run(self, files: dict[str, str], stdin: str, uid: int) -> RunResult:
    workdir = tempfile.mkdtemp(prefix="k15-sandbox-", dir=self.config.work_root or None)
    try:
      for name, text in files.items():
        if os.path.basename(name) != name:
          raise ValueError(f"file names must be plain names, got {name!r}")
        with open(os.path.join(workdir, name), "w") as f:
          f.write(text)
        if self._setpriv:
          os.chown(os.path.join(workdir, name), uid, uid)
      if self._setpriv:
        os.chown(workdir, uid, uid)  # the program may write scratch files in its cwd, and nowhere of ours
      with tempfile.TemporaryFile() as stdin_file:  # a file, not a pipe: no writer to deadlock
        stdin_file.write(stdin.encode())
        stdin_file.seek(0)
        return self._execute(workdir, stdin_file, uid)
    finally:
      shutil.rmtree(workdir, ignore_errors=True)
      if self._setpriv:
        self._remove_strays(uid)

  def _execute(self, workdir: str, stdin_file, uid: int) -> RunResult:
    c = self.config
    start = time.monotonic()
    deadline = start + c.wall_timeout_s
    proc = subprocess.Popen(
        self._command(uid), cwd=workdir, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": workdir}, start_new_session=True,
        close_fds=True)
    out, status = {proc.stdout: bytearray(), proc.stderr: bytearray()}, None
    with selectors.DefaultSelector() as sel:
      for stream in out:
        sel.register(stream, selectors.EVENT_READ)
      while sel.get_map() and status is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
          status = "timeout"
          break
        for key, _ in sel.select(remaining):
          chunk = os.read(key.fd, 1 << 16)
          if not chunk:
            sel.unregister(key.fileobj)
          elif len(out[key.fileobj]) + len(chunk) > c.max_output_bytes:
            out[key.fileobj] += chunk[:c.max_output_bytes - len(out[key.fileobj])]
            status = "output_limit"
            break
          else:
            out[key.fileobj] += chunk
    if status is None:
      try:
        proc.wait(max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:  # closed its output but kept running
        status = "timeout"
    if status is not None or not self._unshare:  # without a pid namespace, orphans outlive a normal exit
      self._kill_run(proc, uid)
    proc.stdout.close()
    proc.stderr.close()
    duration = time.monotonic() - start
    rc = proc.returncode
    if status == "timeout":
      detail = f"wall time limit {c.wall_timeout_s:g} s"
    elif status == "output_limit":
      detail = f"output limit {c.max_output_bytes} bytes"
    elif rc < 0 or (self._unshare and rc > 128):  # the shell reports a signal as 128 + its number
      status, detail = "signal", _describe_signal(-rc if rc < 0 else rc - 128)
    else:
      status, detail = ("ok", "exit code 0") if rc == 0 else ("error", f"exit code {rc}")
    return RunResult(status, rc, bytes(out[proc.stdout]), bytes(out[proc.stderr]), duration, detail)

  def _kill_run(self, proc: subprocess.Popen, uid: int) -> None:
    """Kills every process of the run, including ones that left the process group or are mid-fork."""
    if self._setpriv:
      # First the run's uid: kill(-1) as that uid reaches all its processes in one step (a fork bomb cannot
      # outrun it, setsid does not hide from it); unshare then reaps its child and exits, leaving no zombie.
      self._kill_uid(uid)
      try:
        proc.wait(1.0)
      except subprocess.TimeoutExpired:
        pass
    if proc.poll() is None or not self._setpriv:  # without a uid of its own, the group is what we can reach
      try:
        os.killpg(proc.pid, signal.SIGKILL)  # --kill-child takes unshare's child along (until setpriv)
      except ProcessLookupError:
        pass
    proc.wait()
    if self._setpriv:
      self._kill_uid(uid)  # a process that passed setpriv while we killed unshare
      if not self._wait_uid_gone(uid):
        log.warning("sandbox uid %d still has processes %s after SIGKILL", uid, processes_of_uid(uid))

  def _kill_uid(self, uid: int) -> None:
    subprocess.run([self._kill, "-KILL", "-1"], user=uid, group=uid, extra_groups=[], env={},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)

  @staticmethod
  def _wait_uid_gone(uid: int, timeout_s: float = 5.0) -> bool:
    """Waits until the uid's processes are reaped: dying ones still count against the slot's next RLIMIT_NPROC.

    False if some remain (orphans of a run without a pid namespace wait for the machine's init to reap them).
    """
    deadline = time.monotonic() + timeout_s
    while processes_of_uid(uid):
      if time.monotonic() > deadline:
        return False
      time.sleep(0.01)
    return True

  def _remove_strays(self, uid: int) -> None:
    """Removes what the run's uid made in world-writable directories (only it can create entries owned by it)."""
    for d in _WORLD_WRITABLE:
      try:
        entries = list(os.scandir(d))
      except OSError:
        continue
      for e in entries:
        try:
          if e.stat(follow_symlinks=False).st_uid != uid:
            continue
          if e.is_dir(follow_symlinks=False):
            shutil.rmtree(e.path, ignore_errors=True)
          else:
            os.unlink(e.path)
        except OSError:
          pass
