"""Checkpoints keep the latest N and the best by held-out accuracy; stage directories appear only when complete."""
import os

import numpy as np
import pytest

from k15 import checkpoint


def _state(x):
  return {"w": np.full(3, x, np.float32)}


def test_latest_and_best_by_accuracy_are_kept(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=2)
  for step, accuracy in ((1, 0.5), (2, 0.7), (3, 0.6), (4, None), (5, None)):
    ckpt.save(step, _state(step), {"iteration": step}, eval_accuracy=accuracy)
  assert ckpt.all_steps() == [4, 5]
  assert ckpt.best.all_steps() == [2]  # the best held-out accuracy, besides the latest two
  state, host = ckpt.restore(5, _state(0))
  np.testing.assert_array_equal(state["w"], [5, 5, 5])
  assert host == {"iteration": 5}
  ckpt.close()
  with pytest.raises(ValueError, match="keep must be >= 1"):
    checkpoint.Checkpointer(str(tmp_path / "none"), keep=0)


def test_stage_dir_appears_only_when_complete(tmp_path):
  path = str(tmp_path / "stage")
  with pytest.raises(RuntimeError):
    with checkpoint.stage_dir(path) as tmp:
      with open(os.path.join(tmp, "half"), "w") as f:
        f.write("x")
      raise RuntimeError("killed")
  assert not os.path.exists(path) and not checkpoint.is_complete(path)
  with checkpoint.stage_dir(path) as tmp:
    with open(os.path.join(tmp, "whole"), "w") as f:
      f.write("x")
  assert checkpoint.is_complete(path) and sorted(os.listdir(path)) == [".complete", "whole"]
