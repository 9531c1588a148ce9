"""`cpu_devices`: the training entry point splits the host CPU into N JAX devices (sharding.set_cpu_devices)."""
import os
import subprocess
import sys
import textwrap

import pytest

from ldm_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, xla_flags: str = "") -> str:
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_set_cpu_devices_splits_the_host_before_jax_starts():
    got = _run("""
        import jax
        from ldm_jax import sharding
        sharding.set_cpu_devices(3)
        print(len(jax.devices()), sharding.make_mesh((-1, 1, 1)).shape["data"])
    """)
    assert got == "3 3"


def test_xla_flags_device_count_wins_and_late_call_keeps_the_running_backend():
    got = _run("""
        import jax
        from ldm_jax import sharding
        sharding.set_cpu_devices(2)
        print(len(jax.devices()))
    """, xla_flags="--xla_force_host_platform_device_count=4")
    assert got == "4"  # the 4 of XLA_FLAGS, not the 2 asked for
    got = _run("""
        import jax
        from ldm_jax import sharding
        jax.numpy.zeros(1).block_until_ready()  # backends up with 1 device
        sharding.set_cpu_devices(2)
        print(len(jax.devices()))
    """)
    assert got == "1"


def test_bad_count_is_a_config_error():
    with pytest.raises(ValueError, match="cpu_devices=-1 must be >= 0"):
        sharding.set_cpu_devices(-1)


def test_the_main_job_asks_for_two_cpu_devices_and_plans_its_mesh_on_them(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "ldm_jax.train", "--config=configs/shapes.py",
                          f"--workdir={tmp_path}/wd", "--dry_run"], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mesh data=2 fsdp=1 tensor=1 (2 devices)" in out.stdout
    out = subprocess.run([sys.executable, "-m", "ldm_jax.train", "--config=configs/shapes.py",
                          f"--workdir={tmp_path}/wd", "--dry_run", "--config.cpu_devices=0"], env=env,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mesh data=1 fsdp=1 tensor=1 (1 devices)" in out.stdout
