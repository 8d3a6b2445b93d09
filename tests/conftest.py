"""Test setup: 8 fake CPU devices for sharding tests, TensorFlow/TFDS kept out of $HOME."""
import os
import shutil
import tempfile

_SCRATCH = tempfile.mkdtemp(prefix="k15-tests-")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("KERAS_HOME", os.path.join(_SCRATCH, "keras"))
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(_SCRATCH, "tfds"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("K15_NATIVE_CACHE", os.path.join(_SCRATCH, "native"))  # the native decode step's build

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def scratch_dir():
  return _SCRATCH


@pytest.fixture(scope="session")
def needs_native_step():
  """Skips a test of the native CPU decode step (k15.sampling.native) on a machine without a C++ compiler."""
  if shutil.which(os.environ.get("CXX", "g++")) is None:
    pytest.skip("no C++ compiler for the native decode step")


@pytest.fixture(scope="session")
def needs_amx(needs_native_step):
  """Skips a test of the native step's AMX matmuls on a CPU (or a build) without AMX tiles."""
  from k15.sampling import native  # pylint: disable=g-import-not-at-top
  if not native.amx_available():
    pytest.skip("this CPU has no AMX tiles (or the native build does not target them)")
