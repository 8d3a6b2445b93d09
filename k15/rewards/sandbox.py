"""Run an untrusted Python program in a subprocess with limits; nothing of it runs in the trainer's process.

Every run: rlimits (CPU seconds, address space, processes, file size, open files, no core dumps), no
capabilities and no_new_privs, a fresh run directory as cwd (removed afterwards), an environment of PATH, HOME
and the locale only, `python -I -S` (no site-packages, no PYTHON* variables), and a wall-clock timeout and output
caps enforced by the parent, which kills the whole run on either.

Isolation, by mode (`Sandbox.isolation`):

namespaces (the default, and required unless `allow_unisolated`): new mount, pid, network and IPC namespaces
  (set up by sandbox_init.py).
  * Files: the program sees its own directory (/work, read-write), the interpreter and the system libraries
    (read-only), private /tmp and /dev/shm (tmpfs, capped at max_file_mb), /dev/null and friends and its own
    /proc. Prompt files, workdirs, checkpoints, the repository, home directories, caches and filesystem sockets
    are not in its tree: it can neither read, write nor connect to them.
  * Processes: it sees and signals only its own; when the program exits, the kernel kills what it left.
  * Network: a down loopback only; the host's abstract UNIX sockets are in another namespace.
  * SysV IPC: shared memory, semaphores and message queues of its own, freed with the namespace.
  * uid: as root, each parallel slot runs as a uid of its own (`uid_base` up; no such user needs to exist), so
    the process cap is per run. Without root, an unprivileged user namespace runs the program as uid 1000 inside,
    which is the trainer's uid outside: the kernel lets an unprivileged process map only its own uid (another
    needs newuidmap(1) with /etc/subuid, or root). It owns the trainer's files but cannot reach any of them,
    holds no capability, and its process cap counts in its own user namespace.

without namespaces (only with `allow_unisolated=True`: where the machine forbids them, e.g. a container without
  unprivileged user namespaces, or with `namespaces=False`). Rlimits and the run directory as above, and:
  * as root, a uid per slot: the program cannot write the trainer's files or signal its processes, and what its
    uid leaves in world-writable directories (/tmp, /dev/shm, ... and their world-writable subdirectories) and in
    SysV IPC is removed after the run. But it can read every world-readable file, prompt files included (a reward
    hack), reach the network and world-writable filesystem sockets;
  * without root, the program runs as the trainer's user: it can read and write whatever the trainer can
    (checkpoints, caches, the repository) and signal its processes. For trusted programs only.
"""
import dataclasses
import fcntl
import json
import logging
import marshal
import os
import queue
import selectors
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from typing import Optional

log = logging.getLogger(__name__)
# Runs main.py by its relative name. `python main.py` (and runpy) open it by absolute path, which fails without
# namespaces when an ancestor of the run directory is closed to other users (to our benefit: the program cannot
# reach sibling runs by path).
_BOOT = ("import sys; sys.argv = ['main.py']; __file__ = 'main.py'; "
         "exec(compile(open('main.py', 'rb').read(), 'main.py', 'exec'))")
_INIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_init.py")
_WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_LIBRARY_DIRS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32")
# What the interpreter needs besides the library directories: its standard library and the files it maps.
_PROBE = ("import json, sysconfig\npaths = [sysconfig.get_paths()[k] for k in ('stdlib', 'platstdlib')]\n"
          "maps = [line.split(None, 5)[5].strip() for line in open('/proc/self/maps') if line.count(' /')]\n"
          "print(json.dumps({'dirs': paths, 'files': maps}))")
_INNER_UID = 1000  # the program's uid inside an unprivileged user namespace


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
  """Limits and isolation of one run."""
  wall_timeout_s: float = 4.0  # killed after this much real time
  cpu_time_s: int = 2  # RLIMIT_CPU: SIGXCPU, then SIGKILL
  memory_mb: int = 512  # RLIMIT_AS: the address space, so allocations fail with MemoryError
  max_processes: int = 8  # RLIMIT_NPROC: processes and threads of the run's uid
  max_file_mb: int = 16  # RLIMIT_FSIZE: a larger write gets SIGXFSZ; also the size of the private /tmp
  max_open_files: int = 64  # RLIMIT_NOFILE
  max_output_bytes: int = 1 << 20  # per stream; more kills the run
  python: str = ""  # interpreter; "" = /usr/bin/python3 (any uid can run it; a venv under /root may not), else PATH
  work_root: str = ""  # where run directories are made; "" = tempfile.gettempdir()
  uid_base: int = 61000  # as root, each slot claims a free uid from here up (no such user needs to exist)
  namespaces: bool = True  # the namespaces mode (module docstring); False needs allow_unisolated
  allow_unisolated: bool = False  # run without namespaces where the machine forbids them (module docstring)


@dataclasses.dataclass(frozen=True)
class RunResult:
  """status: "ok" (exit 0), "error" (nonzero exit), "signal", "timeout" or "output_limit"."""
  status: str
  returncode: Optional[int]
  stdout: bytes
  stderr: bytes
  duration_s: float
  detail: str  # human-readable cause, e.g. "killed by SIGXCPU (CPU time limit)"


class SandboxUnavailable(RuntimeError):
  """This machine cannot isolate programs as the config requires."""


class SandboxError(RuntimeError):
  """The sandbox failed to start a program (its own failure, not the program's)."""


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


def _without_nested(paths: set) -> list[str]:
  """The paths that lie under no other of them, sorted."""
  return sorted(p for p in paths if not any(p.startswith(q.rstrip("/") + "/") for q in paths if q != p))


def _interpreter_tree(python: str) -> tuple[list[str], list[list[str]]]:
  """(paths to bind read-only, [symlink, target]) that let `python` run in an otherwise empty root."""
  out = subprocess.run([python, "-I", "-S", "-c", _PROBE], capture_output=True, check=True, env={}, timeout=60)
  probe = json.loads(out.stdout)
  paths = {python} | {os.path.realpath(d) for d in probe["dirs"]}
  paths |= {os.path.dirname(os.path.realpath(f)) for f in probe["files"]
            if os.path.isfile(f) and os.path.realpath(f) != python}
  links = []
  for d in _LIBRARY_DIRS:
    if os.path.islink(d):  # merged /usr: /lib -> usr/lib
      links.append([d, os.readlink(d)])
    elif os.path.isdir(d):
      paths.add(d)
  if os.path.isfile("/etc/ld.so.cache"):
    paths.add("/etc/ld.so.cache")
  return _without_nested({p for p in paths if os.path.exists(p)}), links


def _remove_tree(path: str) -> None:
  """rmtree, also of directories the program made unreadable or unwritable (their owner may chmod them back)."""
  if os.geteuid() != 0:
    for parent, dirs, _ in os.walk(path):
      for d in dirs:
        child = os.path.join(parent, d)
        try:
          if not os.path.islink(child):
            os.chmod(child, 0o700)
        except OSError:
          pass
  shutil.rmtree(path, ignore_errors=True)
  if os.path.exists(path):
    log.warning("sandbox run directory %s could not be removed", path)


def _exited(proc: subprocess.Popen, timeout_s: float) -> bool:
  """Waits until proc exits, without reaping it (its pid, and so its process group id, stays taken)."""
  deadline, pause = time.monotonic() + timeout_s, 0.0005
  while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
    if time.monotonic() > deadline:
      return False
    time.sleep(pause)
    pause = min(2 * pause, 0.05)
  return True


class Sandbox:
  """Runs programs under the limits of a config; `run` is thread-safe, at most `slots` runs at a time.

  Raises SandboxUnavailable if namespaces are required but do not work here (the error says why).
  """

  def __init__(self, config: SandboxConfig = SandboxConfig(), slots: int = 1):
    if not config.namespaces and not config.allow_unisolated:
      raise ValueError("SandboxConfig.namespaces=False needs allow_unisolated=True (module docstring)")
    self.config = config
    self._python = os.path.realpath(config.python or ("/usr/bin/python3" if os.path.exists("/usr/bin/python3")
                                                      else shutil.which("python3")))
    self._root = os.geteuid() == 0
    self._kill = _which("kill")
    if self._root and self._kill is None:
      raise RuntimeError("kill (procps) not found; the sandbox needs it to end a run as root")
    with open(_INIT) as f:
      self._init = f.read()
    binds, links = _interpreter_tree(self._python)
    self._spec = {"binds": binds, "links": links, "tmpfs_mb": config.max_file_mb, "inner_id": _INNER_UID,
                  "user_ns": not self._root, "rlimits": self._rlimits(),
                  "argv": [self._python, "-I", "-S", "-c", _BOOT]}  # the rest per run: _execute
    self._locks = []  # held for the sandbox's life: the claim on each slot's uid
    self.uids = self._claim_uids(slots) if self._root else [os.geteuid()] * slots  # one per slot
    self._slots: "queue.Queue[int]" = queue.Queue()
    for uid in self.uids:
      self._slots.put(uid)
    self.isolation = {"uid_drop": self._root, "namespaces": config.namespaces}
    if config.namespaces:
      why = self._namespaces_problem()
      if why:
        self.isolation["namespaces"] = False
        if not config.allow_unisolated:
          self.close()
          raise SandboxUnavailable(
              f"the sandbox cannot create namespaces here ({why}); code rewards would run without isolation. "
              "Allow that explicitly with SandboxConfig(allow_unisolated=True) (the experiment config's "
              "reward.sandbox_allow_unisolated) if the programs are trusted or the machine is disposable.")
        log.warning("sandbox: no namespaces (%s); running with weaker isolation (k15.rewards.sandbox)", why)

  def _rlimits(self) -> list:
    c = self.config
    limits = {"RLIMIT_CPU": (c.cpu_time_s, c.cpu_time_s + 1), "RLIMIT_AS": (c.memory_mb << 20,) * 2,
              "RLIMIT_NPROC": (c.max_processes,) * 2, "RLIMIT_FSIZE": (c.max_file_mb << 20,) * 2,
              "RLIMIT_NOFILE": (c.max_open_files,) * 2, "RLIMIT_CORE": (0, 0)}
    return sorted(limits.items())

  def _namespaces_problem(self) -> Optional[str]:
    """None if a trivial program runs in the namespaces, else why not."""
    uid = self._slots.get()
    try:
      run = self._run({"main.py": "print('ok')"}, "", uid)
    except (SandboxError, OSError) as e:
      return str(e)
    finally:
      self._slots.put(uid)
    return None if run.status == "ok" and run.stdout == b"ok\n" else f"{run.detail}: {run.stderr[-300:]!r}"

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

  def run(self, files: dict[str, str], stdin: str = "") -> RunResult:
    """Runs `python main.py` in a fresh directory holding `files` (name -> text), with `stdin` as input.

    Raises SandboxError if the sandbox itself failed to start the program.
    """
    if "main.py" not in files:
      raise ValueError("files must include main.py")
    uid = self._slots.get()
    try:
      return self._run(files, stdin, uid)
    finally:
      self._slots.put(uid)

  def _run(self, files: dict[str, str], stdin: str, uid: int) -> RunResult:
    run_dir = tempfile.mkdtemp(prefix="k15-sandbox-", dir=self.config.work_root or None)
    try:
      workdir = os.path.join(run_dir, "work")  # the program's directory; run_dir/root holds the namespace's root
      os.mkdir(workdir)
      os.mkdir(os.path.join(run_dir, "root"))
      for name, text in files.items():
        if os.path.basename(name) != name:
          raise ValueError(f"file names must be plain names, got {name!r}")
        with open(os.path.join(workdir, name), "w") as f:
          f.write(text)
        if self._root:
          os.chown(os.path.join(workdir, name), uid, uid)
      if self._root:
        os.chown(workdir, uid, uid)  # the program may write scratch files in its directory, and nowhere of ours
      with tempfile.TemporaryFile() as stdin_file:  # a file, not a pipe: no writer to deadlock
        stdin_file.write(stdin.encode())
        stdin_file.seek(0)
        return self._execute(run_dir, stdin_file, uid)
    finally:
      _remove_tree(run_dir)
      if self._root and not self.isolation["namespaces"]:
        self._remove_strays(uid)

  def _execute(self, run_dir: str, stdin_file, uid: int) -> RunResult:
    c = self.config
    namespaces = self.isolation["namespaces"]
    workdir = os.path.join(run_dir, "work")
    status_r, status_w = os.pipe()  # the init's report: "ok" when the program starts (sandbox_init.py)
    spec = dict(self._spec, namespaces=namespaces, workdir=workdir, root=os.path.join(run_dir, "root"),
                status_fd=status_w, uid=uid if self._root else None,
                env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/work" if namespaces else workdir})
    start = time.monotonic()
    deadline = start + c.wall_timeout_s
    try:
      proc = subprocess.Popen(
          [self._python, "-I", "-S", "-c", self._init, marshal.dumps(spec).hex()], cwd=workdir, stdin=stdin_file,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={}, start_new_session=True, close_fds=True,
          pass_fds=(status_w,))
    finally:
      os.close(status_w)
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
    if status is None and not _exited(proc, max(0.0, deadline - time.monotonic())):
      status = "timeout"  # closed its output but kept running
    if status is not None or not namespaces:  # without a pid namespace, orphans outlive a normal exit
      self._kill_run(proc, uid)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    duration = time.monotonic() - start
    os.set_blocking(status_r, False)
    try:
      report = os.read(status_r, 4096)
    except BlockingIOError:
      report = b""
    os.close(status_r)
    if report != b"ok":
      raise SandboxError(f"the sandbox failed to start the program: {report.decode(errors='replace') or 'no report'}"
                         f"; stderr: {bytes(out[proc.stderr])[-300:]!r}")
    rc = proc.returncode
    if status == "timeout":
      detail = f"wall time limit {c.wall_timeout_s:g} s"
    elif status == "output_limit":
      detail = f"output limit {c.max_output_bytes} bytes"
    elif rc < 0 or (namespaces and rc > 128):  # the init reports a signal as 128 + its number
      status, detail = "signal", _describe_signal(-rc if rc < 0 else rc - 128)
    else:
      status, detail = ("ok", "exit code 0") if rc == 0 else ("error", f"exit code {rc}")
    return RunResult(status, rc, bytes(out[proc.stdout]), bytes(out[proc.stderr]), duration, detail)

  def _kill_run(self, proc: subprocess.Popen, uid: int) -> None:
    """Kills every process of the run, including ones that left the process group or are mid-fork."""
    if self.isolation["namespaces"]:
      os.kill(proc.pid, signal.SIGTERM)  # the outer process kills init and waits until the namespace is empty
      _exited(proc, 5.0)
    if self._root:
      # kill(-1) as the run's uid reaches all its processes in one step: a fork bomb cannot outrun it, setsid
      # does not hide from it.
      self._kill_uid(uid)
    try:
      os.killpg(proc.pid, signal.SIGKILL)  # proc is not reaped yet, so its group id cannot be anyone else's
    except ProcessLookupError:
      pass
    proc.wait()
    if self._root and not self._wait_uid_gone(uid):
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
    """Without namespaces: removes what the run's uid left in world-writable directories, at any depth of
    world-writable subdirectories (only that uid can create entries owned by it), and its SysV IPC objects."""
    todo = list(_WORLD_WRITABLE)
    while todo:
      try:
        entries = list(os.scandir(todo.pop()))
      except OSError:
        continue
      for e in entries:
        try:
          st = e.stat(follow_symlinks=False)
          if st.st_uid == uid:
            if stat.S_ISDIR(st.st_mode):
              shutil.rmtree(e.path, ignore_errors=True)
            else:
              os.unlink(e.path)
          elif stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH:
            todo.append(e.path)
        except OSError:
          pass
    _remove_ipc(uid)


def _remove_ipc(uid: int) -> None:
  """Removes the SysV shared memory segments, message queues and semaphore sets that uid created or owns."""
  args = []
  for kind, flag in (("shm", "-m"), ("msg", "-q"), ("sem", "-s")):
    try:
      with open(f"/proc/sysvipc/{kind}") as f:
        header, *rows = [line.split() for line in f]
    except OSError:
      continue
    for row in rows:
      if str(uid) in (row[header.index("uid")], row[header.index("cuid")]):
        args += [flag, row[1]]  # the second column is the id in every table
  ipcrm = _which("ipcrm")
  if args and ipcrm:
    subprocess.run([ipcrm] + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
