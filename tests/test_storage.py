"""A bucket workdir (gs://) without a mount: the main job writes and resumes it through k15.storage and orbax.

No network here: gs:// itself is kept, and only its bottom layer is replaced. etils epath's gs:// backend (the one
k15.storage and orbax read and write through) and orbax's tensorstore kvstore for gs:// paths map gs://BUCKET/PATH
to a local directory, so every code path above them is the one a real bucket takes. Any file written around the
path library would land in a local directory named "gs:" instead, which the test looks for.
"""
import json
import os

import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath

from k15 import storage
from k15.rl import metrics as metrics_lib


class LocalBucket(epath_backend._OsPathBackend):  # pylint: disable=protected-access
  """epath's backend for gs:// paths, keeping the buckets under `root`."""

  def __init__(self, root):
    self.root = root

  def local(self, path):
    path = os.fspath(path)
    return os.path.join(self.root, path[len("gs://"):]) if path.startswith("gs://") else path

  def url(self, path):
    return "gs://" + os.path.relpath(path, self.root)


def _mapped(name):
  method = getattr(epath_backend._OsPathBackend, name)  # pylint: disable=protected-access

  def call(self, path, *args, **kwargs):
    args = [self.local(a) if isinstance(a, (str, os.PathLike)) else a for a in args]
    out = method(self, self.local(path), *args, **kwargs)
    if name == "glob":
      return [self.url(p) for p in out]
    if name == "walk":
      return ((self.url(d), dirs, files) for d, dirs, files in out)
    return out
  return call


for _name in ("open", "exists", "isdir", "listdir", "glob", "walk", "makedirs", "mkdir", "rmtree", "remove", "rename",
              "replace", "copy", "stat"):
  setattr(LocalBucket, _name, _mapped(_name))


@pytest.fixture
def local_gcs(tmp_path, monkeypatch):
  """gs://... kept in tmp_path/buckets; the working directory is tmp_path/cwd (where stray writes would go)."""
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
  bucket = LocalBucket(str(tmp_path / "buckets"))
  monkeypatch.setattr(epath_backend, "tf_backend", bucket)
  monkeypatch.setattr(gpath, "_GCS_BACKENDS", frozenset({bucket}))
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", lambda path: {"driver": "file", "path": bucket.local(path)})
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  (tmp_path / "cwd").mkdir()
  monkeypatch.chdir(tmp_path / "cwd")
  return bucket


def test_storage_round_trip(local_gcs, tmp_path):
  url = "gs://bkt/run/a/b.txt"
  assert storage.is_url(url) and not storage.exists(url)
  storage.write_text(url, "hello")
  assert storage.read_text(url) == "hello" and (tmp_path / "buckets" / "bkt" / "run" / "a" / "b.txt").exists()
  local = tmp_path / "local"
  (local / "sub").mkdir(parents=True)
  (local / "sub" / "x.bin").write_bytes(b"\0\1")
  storage.upload(str(local), "gs://bkt/run/up")
  assert storage.listdir("gs://bkt/run/up") == ["sub"]
  with storage.local_copy("gs://bkt/run/up") as copy:
    assert open(os.path.join(copy, "sub", "x.bin"), "rb").read() == b"\0\1"
  assert not os.path.exists(copy)  # removed after use
  storage.rmtree("gs://bkt/run")
  assert not storage.exists(url)
  assert not os.path.exists(tmp_path / "cwd" / "gs:")


def test_main_job_writes_and_resumes_a_bucket_workdir(local_gcs, tmp_path, untimed):
  """The smoke main job in gs://bkt/run: a first run stops after RL iteration 1, the rerun resumes it and finishes;
  data, warm-up and final models, checkpoints, metrics, TensorBoard, plot and summary are in the bucket."""
  from experiments import train  # pylint: disable=g-import-not-at-top
  from experiments.configs import arith  # pylint: disable=g-import-not-at-top
  from k15 import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = arith.get_config("smoke")
  cfg.sft.steps, cfg.rl.iterations, cfg.data.n_train, cfg.data.n_eval = 4, 1, 64, 8
  workdir = "gs://bkt/run"
  train.run(config_lib.from_config_dict(cfg), workdir)
  first = metrics_lib.read_jsonl(storage.join(workdir, "rl.jsonl"))
  cfg.rl.iterations = 2
  out = train.run(config_lib.from_config_dict(cfg), workdir)

  bucket = tmp_path / "buckets" / "bkt" / "run"
  for name in ("config.json", "data/.complete", "data/spm.model", "warmup/.complete", "warmup/model.safetensors",
               "final/.complete", "final/model.safetensors", "checkpoints/1", "checkpoints/2", "rl.jsonl",
               "sft.jsonl", "rl_curves.png", "summary.json", "summary.md", "warmup_eval.json"):
    assert (bucket / name).exists(), name
  assert os.listdir(bucket / "tensorboard" / "rl")  # event files uploaded
  assert not os.path.exists(tmp_path / "cwd" / "gs:")  # nothing written around the path library
  rows = metrics_lib.read_jsonl(storage.join(workdir, "rl.jsonl"))
  assert [r["step"] for r in rows] == [1, 2] and untimed(rows[0]) == untimed(first[0])
  assert json.loads(storage.read_text(storage.join(workdir, "summary.json")))["k1.5 RL"] == out["k1.5 RL"]
