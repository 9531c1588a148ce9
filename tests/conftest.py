"""Test set-up: 8 fake CPU devices for sharding tests, set before jax is imported."""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tensorflow must never take an accelerator

import pathlib  # noqa: E402

import pytest  # noqa: E402

GOLDENS = pathlib.Path(__file__).parent / "goldens"


@pytest.fixture(scope="session")
def goldens_dir() -> pathlib.Path:
    return GOLDENS
