"""A trainer that only scores code: run by tests/test_sandbox.py as an unprivileged user.

  python sandbox_trainer.py '{"work_root": ..., "responses": [...], "tests": [[...], ...]}'

Prints {"isolation": ..., "rewards": [[reward, reason], ...]}, or {"unavailable": why} if the sandbox refuses
to run here.
"""
import json
import sys

from k15.rewards.code import CodeVerifier
from k15.rewards.sandbox import SandboxConfig, SandboxUnavailable


def main():
  job = json.loads(sys.argv[1])
  try:
    verifier = CodeVerifier(SandboxConfig(work_root=job["work_root"], wall_timeout_s=5.0), num_workers=1)
  except SandboxUnavailable as e:
    print(json.dumps({"unavailable": str(e)}))
    return
  with verifier:
    results = verifier.score(job["responses"], job["tests"])
  print(json.dumps({"isolation": verifier.sandbox.isolation, "rewards": [[r.reward, r.reason] for r in results]}))


if __name__ == "__main__":
  main()
