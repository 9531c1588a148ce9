"""Test set-up: 8 fake CPU devices for sharding tests, set before jax is imported."""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tensorflow must never take an accelerator

import pathlib  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

# One persistent compilation cache for the whole run, empty at its start (never the user's ~/.cache, so a run does not
# depend on what an earlier one left): a program that several tests compile (the tiny models' steps and samplers,
# in this process and in the command-line programs the tests start) is compiled once. LDM_JAX_COMPILE_CACHE=off (or
# a folder) overrides it. The multi-process workers do not turn it on (see test_multiprocess).
os.environ.setdefault("LDM_JAX_COMPILE_CACHE", tempfile.mkdtemp(prefix="ldm_jax_test_xla_"))

from jax import monitoring  # noqa: E402

from ldm_jax import compile_cache  # noqa: E402

compile_cache.enable()
_CACHE_STATS = {"hits": 0, "saved_s": 0.0}


def _on_event(event: str, **kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _CACHE_STATS["hits"] += 1


def _on_duration(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/compilation_cache/compile_time_saved_sec":
        _CACHE_STATS["saved_s"] += duration


monitoring.register_event_listener(_on_event)
monitoring.register_event_duration_secs_listener(_on_duration)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"persistent compilation cache ({os.environ['LDM_JAX_COMPILE_CACHE']}): "
                                f"{_CACHE_STATS['hits']} hits in this process, {_CACHE_STATS['saved_s']:.0f} s of "
                                "compiling saved")

GOLDENS = pathlib.Path(__file__).parent / "goldens"


@pytest.fixture(scope="session")
def goldens_dir() -> pathlib.Path:
    return GOLDENS
