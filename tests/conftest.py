"""Test set-up: 8 fake CPU devices for sharding tests, set before jax is imported."""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# The tests compile hundreds of tiny programs, each run a few times: LLVM's optimisation of XLA:CPU's own loops costs
# more than it saves there (measured: tests/test_unet.py + test_pipeline_lora.py + test_samplers.py 148 -> 103 s CPU,
# tests/test_first_stage_train.py + test_checkpoint.py 252 s either way; the same tolerances pass). Convolutions and
# matmuls are library calls either way. The programs the tests start with their own XLA_FLAGS keep the default.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tensorflow must never take an accelerator

import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

# One persistent compilation cache for the whole run, empty at its start (never the user's ~/.cache, so a run does not
# depend on what an earlier one left): a program that several tests compile (the tiny models' steps and samplers,
# in the pytest workers and in the command-line programs the tests start) is compiled once. LDM_JAX_COMPILE_CACHE=off (or
# a folder) overrides it. The multi-process workers do not turn it on (see test_multiprocess).
_OWN_CACHE = "LDM_JAX_COMPILE_CACHE" not in os.environ  # False in pytest-xdist's workers: they inherit the folder
if _OWN_CACHE:
    os.environ["LDM_JAX_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="ldm_jax_test_xla_")

from ldm_jax import compile_cache  # noqa: E402

compile_cache.enable()  # in this process too (pytest-xdist's workers share the folder: the environment is inherited)

GOLDENS = pathlib.Path(__file__).parent / "goldens"


@pytest.fixture(scope="session")
def goldens_dir() -> pathlib.Path:
    return GOLDENS


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the process that made the folder removes it at the end
        shutil.rmtree(os.environ["LDM_JAX_COMPILE_CACHE"], ignore_errors=True)
