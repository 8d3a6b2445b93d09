"""A persistent pool of math-verify worker processes with a per-item timeout.

sympy can hang on a pathological answer (`\\boxed{9^{9^{9}}}` asks for a 370-million-digit integer), and its
C loops ignore math-verify's SIGALRM timer. So each item runs in a worker process that the pool kills when the
item's deadline passes; the item gets reward 0 with the reason, a fresh worker takes the dead one's place and the
pool keeps serving. A worker that dies or hangs while starting is replaced too, up to `max_start_failures` times
in a row (then `score` raises: a worker that can never start, e.g. for lack of memory, would not heal). Workers
are started with forkserver (default) or spawn, never fork: the trainer holds JAX threads, and forking a threaded
process can deadlock the child.
"""
import collections
import dataclasses
import logging
import multiprocessing
from multiprocessing import connection
import resource
import signal
import time
from typing import Optional, Sequence

from k15.rewards.math import RewardResult

log = logging.getLogger(__name__)


def _worker_main(conn, memory_limit_mb: Optional[int]) -> None:
  """Serves (index, response, reference) messages until None or EOF; replies (index, RewardResult)."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it closes the pool
  if memory_limit_mb:
    # Growth beyond the size at start: a forkserver child inherits whatever the trainer's main module imported.
    with open("/proc/self/statm") as f:
      size = int(f.read().split()[0]) * resource.getpagesize()
    limit = size + (memory_limit_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  # We disable math-verify's own timers (the pool enforces time); silence its warning that they are off.
  logging.getLogger("math_verify").setLevel(logging.ERROR)
  from k15.rewards import math as math_reward  # pylint: disable=g-import-not-at-top
  math_reward.score_one("\\boxed{1/2}", "0.5")  # warm-up: imports sympy, builds the parsers
  conn.send("ready")
  while True:
    try:
      msg = conn.recv()
    except EOFError:  # the parent is gone
      return
    if msg is None:
      return
    index, response, reference = msg
    try:
      result = math_reward.score_one(response, reference)
    except Exception as e:  # pylint: disable=broad-except  # a verifier bug costs one item, not the pool
      result = RewardResult(0.0, f"verifier error {type(e).__name__}: {str(e)[:200]}")
    conn.send((index, result))


@dataclasses.dataclass
class _Worker:
  process: multiprocessing.Process
  conn: connection.Connection
  ready: bool = False
  item: Optional[int] = None  # the index being scored
  deadline: float = 0.0  # of the startup until ready, then of the item


class MathVerifierPool:
  """`score(responses, references) -> list[RewardResult]` over `num_workers` long-lived processes.

  Usable as a context manager; `close()` stops the workers. Not thread-safe: one `score` at a time.
  `restarts` counts workers replaced after a timeout, a crash or a failed start. memory_limit_mb caps each
  worker's address-space growth (RLIMIT_AS above its size at start): sympy running out of memory fails one item,
  not the machine.
  The trainer's main module needs the `if __name__ == "__main__":` guard (absl apps have it): forkserver and
  spawn import it in the workers.
  """

  def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, memory_limit_mb: Optional[int] = 4096,
               start_method: str = "forkserver", startup_timeout_s: float = 120.0, max_start_failures: int = 3):
    if num_workers < 1 or timeout_s <= 0 or max_start_failures < 0:
      raise ValueError(f"need num_workers >= 1, timeout_s > 0 and max_start_failures >= 0, got {num_workers}, "
                       f"{timeout_s}, {max_start_failures}")
    if start_method == "fork":
      raise ValueError("start_method 'fork' is unsafe in a process with JAX threads; use forkserver or spawn")
    self.timeout_s = timeout_s
    self.restarts = 0
    self._ctx = multiprocessing.get_context(start_method)
    self._memory_limit_mb = memory_limit_mb
    self._startup_timeout_s = startup_timeout_s
    self._max_start_failures = max_start_failures
    self._start_failures = 0  # in a row, over all workers; a worker that becomes ready resets it
    self._workers = [self._start() for _ in range(num_workers)]

  def _start(self) -> _Worker:
    parent_conn, child_conn = self._ctx.Pipe()
    process = self._ctx.Process(target=_worker_main, name="k15-math-verifier", daemon=True,
                                args=(child_conn, self._memory_limit_mb))
    process.start()
    child_conn.close()  # so the parent sees EOF when the worker dies
    return _Worker(process, parent_conn, deadline=time.monotonic() + self._startup_timeout_s)

  def _replace(self, worker: _Worker) -> _Worker:
    worker.process.kill()
    worker.process.join(5)
    worker.conn.close()
    self.restarts += 1
    new = self._start()
    self._workers[self._workers.index(worker)] = new
    return new

  def score(self, responses: Sequence[str], references: Sequence[str]) -> list[RewardResult]:
    if len(responses) != len(references):
      raise ValueError(f"{len(responses)} responses but {len(references)} references")
    if self._workers is None:
      raise RuntimeError("MathVerifierPool is closed")
    results: list[Optional[RewardResult]] = [None] * len(responses)
    todo = collections.deque(range(len(responses)))
    while todo or any(w.item is not None for w in self._workers):
      for w in list(self._workers):
        if w.ready and w.item is None and todo:
          index = todo.popleft()
          try:
            w.conn.send((index, responses[index], references[index]))
          except (BrokenPipeError, OSError):  # died while idle: not the item's fault, requeue it
            todo.appendleft(index)
            self._replace(w)
            continue
          w.item, w.deadline = index, time.monotonic() + self.timeout_s
      active = [w.deadline for w in self._workers if w.item is not None or not w.ready]
      wait_s = max(0.0, min(active) - time.monotonic()) if active else 0.0
      for conn in connection.wait([w.conn for w in self._workers], timeout=wait_s):
        w = next(w for w in self._workers if w.conn is conn)
        try:
          msg = conn.recv()
        except (EOFError, OSError):
          self._on_death(w, results)
          continue
        if msg == "ready":
          w.ready = True
          self._start_failures = 0
        else:
          index, result = msg
          results[index], w.item = result, None
      now = time.monotonic()
      for w in list(self._workers):
        if w.deadline > now:
          continue
        if w.item is not None:
          log.warning("math verifier: item %d timed out after %.1f s; worker %d killed and replaced",
                      w.item, self.timeout_s, w.process.pid)
          results[w.item] = RewardResult(0.0, f"timeout after {self.timeout_s:g} s")
          self._replace(w)
        elif not w.ready:
          self._failed_start(w, f"did not start within {self._startup_timeout_s:g} s")
    return results

  def _on_death(self, w: _Worker, results: list) -> None:
    w.process.join(5)
    reason = f"verifier worker died (exit code {w.process.exitcode})"
    if not w.ready:
      self._failed_start(w, reason)
      return
    if w.item is not None:
      log.warning("math verifier: item %d: %s; worker replaced", w.item, reason)
      results[w.item] = RewardResult(0.0, reason)
    self._replace(w)

  def _failed_start(self, w: _Worker, reason: str) -> None:
    """Replaces a worker that failed to start; raises when too many starts failed in a row (it would not heal)."""
    self._start_failures += 1
    if self._start_failures > self._max_start_failures:
      raise RuntimeError(f"math verifier workers failed to start {self._start_failures} times in a row; "
                         f"the last one: {reason}")
    log.warning("math verifier: a worker failed to start (%s); replaced (%d in a row)", reason, self._start_failures)
    self._replace(w)

  def close(self) -> None:
    if self._workers is None:
      return
    for w in self._workers:
      try:
        w.conn.send(None)
      except (BrokenPipeError, OSError):
        pass
    for w in self._workers:
      w.process.join(2)
      if w.process.is_alive():  # busy on a hanging item, or slow to exit
        w.process.kill()
        w.process.join(5)
      w.conn.close()
    self._workers = None

  def __enter__(self) -> "MathVerifierPool":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  # interpreter shutdown: modules may be gone
      pass
