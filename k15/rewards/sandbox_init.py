"""The first process of a sandboxed run: namespaces, a minimal root, limits, then the program (k15.rewards.sandbox).

Not imported by k15: the sandbox runs this file's text with `python -I -S -c <text> <spec>` (the spec dict
marshalled, in hex; its fields are written by `Sandbox._execute`), so it uses the standard library only. It runs
once per program, so it avoids json, platform and signal (they import re and enum: 10 ms a run).

With namespaces, three processes:
  outer    (outside the new pid namespace) unshares the namespaces and waits for init; on SIGTERM it kills init
           and still waits, so when outer exits every process of the run is gone;
  init     (pid 1 of the new pid namespace) builds the root (below), starts the program and reaps orphans; its
           exit makes the kernel kill whatever is left in the namespace;
  program  limits, no privileges, then exec of the interpreter.
Without namespaces, this process sets the limits, drops privileges and becomes the program.

The root is a read-only tmpfs holding: the spec's read-only binds (the interpreter and its libraries) and
symlinks, the program's directory at /work (read-write), private tmpfs at /tmp and /dev/shm, /dev/{null,zero,full,
random,urandom}, and /proc of the new pid namespace. The old root is detached; nothing else is reachable.

Every step reports on `status_fd`: "ok" just before the program's exec, else what failed (after "ok" if the exec
itself failed). The descriptor is closed at exec, so the program cannot write to it: the parent can tell the
sandbox's failures from the program's.
"""
import _signal
import ctypes
import errno
import marshal
import os
import resource
import sys

# From <sched.h>, <sys/mount.h> and <sys/prctl.h>.
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x8000000, 0x10000000, 0x20000000, \
    0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
DEVICES = ("null", "zero", "full", "random", "urandom")
SETUP_FAILED = 125  # exit code of a failed setup (the status descriptor says which step)

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
  if ret != 0:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None) -> None:
  args = [None if a is None else a.encode() for a in (source, target, fstype)]
  _check(_libc.mount(*args, ctypes.c_ulong(flags), data and data.encode()), f"mount {source or fstype} on {target}")


def _write(path: str, text: str) -> None:
  with open(path, "w") as f:
    f.write(text)


def _mountpoint(path: str, is_dir: bool) -> None:
  if is_dir:
    os.makedirs(path, exist_ok=True)
  else:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "a").close()  # pylint: disable=consider-using-with


def _bind(source: str, target: str, read_only: bool) -> None:
  _mountpoint(target, os.path.isdir(source))
  _mount(source, target, None, MS_BIND | MS_REC)
  if read_only:
    # A remount in a user namespace must keep the source's locked flags (noexec here; nosuid, nodev are added).
    locked = MS_NOEXEC if os.statvfs(target).f_flag & os.ST_NOEXEC else 0
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | locked)


def _build_root(spec: dict) -> None:
  """Makes the minimal tree at spec["root"] the root of this mount namespace (module docstring)."""
  root, mb = spec["root"], spec["tmpfs_mb"]
  _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates to the trainer's namespace
  _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
  for path in spec["binds"]:
    _bind(path, root + path, read_only=True)
  for path, target in spec["links"]:
    _mountpoint(os.path.dirname(root + path), True)
    os.symlink(target, root + path)
  _bind(spec["workdir"], root + "/work", read_only=False)
  for path in ("/tmp", "/dev/shm"):
    _mountpoint(root + path, True)
    _mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={mb}m,nr_inodes=4096")
  for name in DEVICES:
    _bind("/dev/" + name, f"{root}/dev/{name}", read_only=False)
  _mountpoint(root + "/proc", True)
  _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
  os.chdir(root)
  syscall = SYS_PIVOT_ROOT.get(os.uname().machine)
  if syscall is None:
    raise OSError(f"pivot_root: unknown system call number on {os.uname().machine}")
  _check(_libc.syscall(syscall, b".", b"."), "pivot_root")  # the old root now lies over the new one...
  _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")  # ...and is gone from this namespace
  _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
  os.chdir("/work")


def _exec_program(spec: dict, status_fd: int) -> None:
  """Limits, no privileges, then exec: this process becomes the program. Does not return."""
  for name, limits in spec["rlimits"]:
    resource.setrlimit(getattr(resource, name), limits)
  if spec["namespaces"] or os.geteuid() == 0:  # we hold CAP_SETPCAP: let no capability come back through exec
    cap = 0
    while _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
      cap += 1
    if ctypes.get_errno() != errno.EINVAL:  # EINVAL: past the last capability
      _check(-1, "drop the capability bounding set")
  if spec["uid"] is not None:
    os.setgroups([])
    os.setresgid(spec["uid"], spec["uid"], spec["uid"])
    os.setresuid(spec["uid"], spec["uid"], spec["uid"])
  _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs")
  os.write(status_fd, b"ok")
  try:
    os.execve(spec["argv"][0], spec["argv"], spec["env"])
  except OSError as e:
    os.write(status_fd, f"! exec {spec['argv'][0]}: {e}".encode())
    os._exit(SETUP_FAILED)  # pylint: disable=protected-access


def _exit_code(status: int) -> int:
  """A shell's convention: the exit code, or 128 + the signal that killed the process."""
  code = os.waitstatus_to_exitcode(status)
  return 128 - code if code < 0 else code


def _init(spec: dict, status_fd: int) -> None:
  """pid 1 of the new pid namespace. Does not return."""
  _check(_libc.prctl(PR_SET_PDEATHSIG, _signal.SIGKILL, 0, 0, 0), "set the parent-death signal")
  _build_root(spec)
  program = os.fork()
  if program == 0:
    _guarded(_exec_program, spec, status_fd)
  while True:  # reap orphans until the program itself exits; then the kernel kills the rest
    pid, status = os.wait()
    if pid == program:
      os._exit(_exit_code(status))  # pylint: disable=protected-access


def _outer(spec: dict, status_fd: int) -> None:
  """Unshares the namespaces, then waits for init (module docstring). Does not return."""
  uid, gid = os.getuid(), os.getgid()
  user_ns = CLONE_NEWUSER if spec["user_ns"] else 0
  _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | user_ns), "unshare")
  if user_ns:  # the only mapping an unprivileged process may write: its own uid and gid
    inner = spec["inner_id"]
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{inner} {uid} 1")
    _write("/proc/self/gid_map", f"{inner} {gid} 1")
  init = os.fork()
  if init == 0:
    _guarded(_init, spec, status_fd)
  _signal.signal(_signal.SIGTERM, lambda *_: os.kill(init, _signal.SIGKILL))
  _, status = os.waitpid(init, 0)
  os._exit(_exit_code(status))  # pylint: disable=protected-access


def _guarded(fn, spec: dict, status_fd: int) -> None:
  """Runs fn (which does not return); a failure is reported on the status descriptor and ends the process."""
  try:
    fn(spec, status_fd)
  except BaseException as e:  # pylint: disable=broad-except
    os.write(status_fd, f"{type(e).__name__}: {e}".encode())
  os._exit(SETUP_FAILED)  # pylint: disable=protected-access


def main() -> None:
  spec = marshal.loads(bytes.fromhex(sys.argv[1]))
  status_fd = spec["status_fd"]
  os.set_inheritable(status_fd, False)  # closed at the program's exec
  _guarded(_outer if spec["namespaces"] else _exec_program, spec, status_fd)


if __name__ == "__main__":
  main()
