"""Test setup: 8 fake CPU devices for sharding tests, TensorFlow/TFDS kept out of $HOME; fixtures shared by the
test files."""
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
# Executables kept on disk for the session: a test that reruns a job (resume, kill, a subprocess, a second
# process) loads what an earlier run compiled instead of compiling it again.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_SCRATCH, "jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

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


@pytest.fixture(scope="session")
def untimed():
  """A metrics row without its wall-clock fields (times, throughput), which differ between identical runs."""
  return lambda row: {k: v for k, v in row.items() if not any(t in k for t in ("time", "tokens_per_s"))}


PROMPT_FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "prompts")


@pytest.fixture(scope="session")
def prompt_files():
  """The prompt-file fixtures by name: gsm8k_style, math_style (MATH's field names), code_style."""
  return {name: os.path.join(PROMPT_FIXTURES, f"{name}.jsonl") for name in ("gsm8k_style", "math_style", "code_style")}


@pytest.fixture(scope="session")
def math_main_job(tmp_path_factory):
  """The main job of experiments/configs/qwen_math.py:smoke (prompt files, math-verify rewards, a tiny random
  model), run once: (workdir, typed config, summary)."""
  from experiments import train  # pylint: disable=g-import-not-at-top
  from experiments.configs import qwen_math  # pylint: disable=g-import-not-at-top
  from k15 import config as config_lib  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("math_main_job"))
  config = config_lib.from_config_dict(qwen_math.get_config("smoke"))
  return workdir, config, train.run(config, workdir)
