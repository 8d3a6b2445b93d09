"""Code rewards: the response's program against test cases, each run in the sandbox (k15.rewards.sandbox).

Two kinds of test case (dicts, as stored in prompt files):
  stdin/stdout   {"input": "1 2\\n", "output": "3\\n"}: the output must match up to whitespace (judges' rule);
  function call  {"fn_name": "add", "args": [1, 2], "expected": 3} (optional "kwargs"): the program defines
                 `add` (or a LeetCode-style class Solution with that method); results compare as JSON values,
                 floats to 1e-6 relative.
The reward is 1 when every test passes (tests stop at the first failure), else 0 with the reason.
"""
import concurrent.futures
import json
import math
import os
import re
from typing import Any, Optional, Sequence

from k15.rewards.math import RewardResult
from k15.rewards.sandbox import RunResult, Sandbox, SandboxConfig

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_RESULT_MARKER = "\x1e<k15-result>"  # the harness prints the call's value after this

# Runs in the sandbox: imports the candidate as a module, calls the function on the JSON arguments from stdin.
_HARNESS = """\
import json, sys
case = json.loads(sys.stdin.read())
ns = {"__name__": "solution"}
exec(compile(open("solution.py").read(), "solution.py", "exec"), ns)
fn = ns.get(case["fn_name"])
if fn is None and "Solution" in ns:
  fn = getattr(ns["Solution"](), case["fn_name"], None)
if fn is None:
  sys.exit("no function " + case["fn_name"])
value = fn(*case["args"], **case.get("kwargs", {}))
sys.stdout.write("\\n" + MARKER + json.dumps(value) + "\\n")
"""


def extract_code(response: str) -> Optional[str]:
  """The last fenced code block (```python, ```py or bare ```): the final program after any drafts."""
  blocks = _FENCE.findall(response)
  return blocks[-1] if blocks else None


def _same_value(a: Any, b: Any) -> bool:
  if isinstance(a, bool) or isinstance(b, bool):
    return a is b
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
  if isinstance(a, dict) and isinstance(b, dict):
    return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
  return a == b


def _failure(i: int, run: RunResult) -> str:
  tail = run.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
  what = {"timeout": "timeout", "output_limit": "output limit exceeded"}.get(run.status, "runtime error")
  return f"test {i}: {what} ({run.detail}) {tail[0][:200]}".rstrip()


def _check(i: int, program: str, test: dict, sandbox: Sandbox) -> Optional[str]:
  """None if the test passes, else why not."""
  if "fn_name" in test:
    stdin = json.dumps({"fn_name": test["fn_name"], "args": test.get("args", []), "kwargs": test.get("kwargs", {})})
    run = sandbox.run({"main.py": _HARNESS.replace("MARKER", repr(_RESULT_MARKER)), "solution.py": program}, stdin)
    if run.status != "ok":
      return _failure(i, run)
    out = run.stdout.decode(errors="replace")
    if _RESULT_MARKER not in out:
      return f"test {i}: no result"
    try:
      value = json.loads(out.rsplit(_RESULT_MARKER, 1)[1])
    except json.JSONDecodeError:
      return f"test {i}: result is not JSON"
    expected = json.loads(json.dumps(test["expected"]))  # tuples -> lists, like the harness's output
    return None if _same_value(value, expected) else f"test {i}: wrong answer"
  run = sandbox.run({"main.py": program}, test.get("input", ""))
  if run.status != "ok":
    return _failure(i, run)
  if run.stdout.decode(errors="replace").split() != str(test["output"]).split():
    return f"test {i}: wrong answer"
  return None


class CodeVerifier:
  """Scores responses against their test cases; items run in parallel on a thread pool, each test in the sandbox.

  Usable as a context manager; `close()` stops the threads. A failure of the sandbox itself (SandboxError, not
  the program's) raises from `score`; SandboxUnavailable from the constructor where the sandbox cannot isolate.
  """

  def __init__(self, config: SandboxConfig = SandboxConfig(), num_workers: Optional[int] = None):
    self.num_workers = num_workers or os.cpu_count() or 1
    self.sandbox = Sandbox(config, slots=self.num_workers)
    self._executor = concurrent.futures.ThreadPoolExecutor(self.num_workers, thread_name_prefix="k15-code")

  def score_one(self, response: str, tests: Sequence[dict]) -> RewardResult:
    program = extract_code(response)
    if program is None:
      return RewardResult(0.0, "no code block")
    if not tests:
      return RewardResult(0.0, "no test cases")
    for i, test in enumerate(tests):
      why = _check(i, program, test, self.sandbox)
      if why is not None:
        return RewardResult(0.0, why)
    return RewardResult(1.0, "correct")

  def score(self, responses: Sequence[str], tests: Sequence[Sequence[dict]]) -> list[RewardResult]:
    if len(responses) != len(tests):
      raise ValueError(f"{len(responses)} responses but {len(tests)} test lists")
    return list(self._executor.map(self.score_one, responses, tests))

  def close(self) -> None:
    self._executor.shutdown(wait=True)
    self.sandbox.close()

  def __enter__(self) -> "CodeVerifier":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
