"""Per-iteration metrics: TensorBoard (clu writers), a JSONL file, a one-line progress display and a PNG.

The workdir may be a URL (k15.storage): the JSONL file is rewritten whole each step, and TensorBoard's event files
are written locally and uploaded after each step.
"""
import io
import shutil
import sys
import tempfile
import time
from typing import Mapping, Optional

import jax
import numpy as np

from k15 import storage
from k15.data import jsonl


def _scalar(v):
  return float(np.asarray(v))


class MetricsLogger:
  """Writes each step's scalars to workdir/<name>.jsonl and TensorBoard; only process 0 writes.

  start_step: the step training continues after (a resumed run's restored step; 0 for a fresh start). Rows logged
  past it by an earlier, interrupted run are dropped from the JSONL file, and TensorBoard's event files are rewritten
  from the rows kept, so every step appears once in both.
  """

  def __init__(self, workdir: str, name: str, total_steps: Optional[int] = None, stream=sys.stdout,
               start_step: int = 0):
    self.path = storage.join(workdir, f"{name}.jsonl")
    self.name, self.total, self.stream = name, total_steps, stream
    self.is_writer = jax.process_index() == 0
    self._start = time.time()
    self._tb = None
    if self.is_writer:
      storage.makedirs(workdir)
      self.rows = [r for r in jsonl.read(self.path) if r["step"] <= start_step] if storage.exists(self.path) else []
      jsonl.write(self.path, self.rows)
      self._tb_dir = storage.join(workdir, "tensorboard", name)
      storage.rmtree(self._tb_dir)
      self._tb_local = tempfile.mkdtemp(prefix="k15-tb-") if storage.is_url(workdir) else self._tb_dir
      from clu import metric_writers  # imports TensorFlow's summary writer lazily
      self._tb = metric_writers.create_default_writer(self._tb_local, just_logging=False, asynchronous=False)
      for row in self.rows:
        self._tb.write_scalars(row["step"], {k: v for k, v in row.items() if k != "step"})
      self._flush_tb()

  def _flush_tb(self):
    self._tb.flush()
    if self._tb_local != self._tb_dir:
      storage.upload(self._tb_local, self._tb_dir)

  def write(self, step: int, scalars: Mapping[str, float], show: tuple = ()):
    scalars = {k: _scalar(v) for k, v in scalars.items()}
    if not self.is_writer:
      return
    self.rows.append({"step": step, **scalars})
    jsonl.write(self.path, self.rows)
    self._tb.write_scalars(step, scalars)
    self._flush_tb()
    if show:
      elapsed = time.time() - self._start
      total = f"/{self.total}" if self.total else ""
      shown = "  ".join(f"{k}={scalars[k]:.4g}" for k in show if k in scalars)
      print(f"[{self.name} {step}{total} {elapsed:6.0f}s] {shown}", file=self.stream, flush=True)

  def close(self):
    if self._tb is not None:
      self._tb.close()
      if self._tb_local != self._tb_dir:
        storage.upload(self._tb_local, self._tb_dir)
        shutil.rmtree(self._tb_local, ignore_errors=True)
      self._tb = None


read_jsonl = jsonl.read


def plot_rl_curves(jsonl_path: str, png_path: str, title: str = "k1.5 RL", baseline: Optional[float] = None):
  """Accuracy and mean response length per iteration, side by side; baseline: the warm-up's held-out accuracy."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in read_jsonl(jsonl_path) if "accuracy" in r]  # iterations that trained at least one group
  steps = [r["step"] for r in rows]
  fig, (ax_acc, ax_len) = plt.subplots(1, 2, figsize=(10, 3.8))
  ax_acc.plot(steps, [r["accuracy"] for r in rows], label="train samples")
  evals = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
  if evals:
    ax_acc.plot(*zip(*evals), "o-", label="held-out")
  if baseline is not None:
    ax_acc.axhline(baseline, color="gray", linestyle="--", label="held-out after warm-up")
  ax_acc.set(xlabel="iteration", ylabel="accuracy", title="accuracy")
  ax_acc.legend()
  ax_len.plot(steps, [r["response_len_mean"] for r in rows], label="mean")
  ax_len.plot(steps, [r["response_len_max"] for r in rows], alpha=0.5, label="max")
  ax_len.set(xlabel="iteration", ylabel="response tokens", title="response length")
  ax_len.legend()
  fig.suptitle(title)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=110)
  plt.close(fig)
  storage.write_bytes(png_path, png.getvalue())
  return png_path
