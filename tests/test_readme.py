"""README.md: its library snippet runs as written, and the guide stays short."""
import os
import re

import jax
import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _readme():
  with open(README) as f:
    return f.read()


def test_library_snippet_runs():
  (code,) = re.findall(r"## Using the library\n\n```python\n(.*?)```", _readme(), re.S)
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)  # pylint: disable=exec-used
  trajs, k, prompts = scope["trajs"], scope["k"], scope["prompts"]
  assert [list(t.prompt_tokens) for t in trajs] == [p for p in prompts for _ in range(k)]  # groups of k, in order
  assert all(t.finish_reason in ("eos", "max_length") and len(t.logprobs) == len(t.response_tokens) for t in trajs)
  assert np.isfinite(float(scope["loss"])) and float(scope["metrics"]["num_tokens"]) == scope["mask"].sum()
  grads, params = scope["grads"], scope["params"]
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  if np.ptp(scope["rewards"].reshape(-1, k), axis=1).max() > 0:  # some group's rewards differ: a policy gradient
    assert any(float(np.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_readme_is_a_short_guide():
  text = _readme()
  assert len(text.splitlines()) <= 150
  for command in ("python -m experiments.train --config=experiments/configs/arith.py --workdir=/tmp/k15_arith",
                  "python -m pytest"):
    assert command in text
