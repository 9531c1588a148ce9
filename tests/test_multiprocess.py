"""Multi-process training for real: 2 local processes x 4 CPU devices (jax.distributed over 127.0.0.1)
give the same losses as 1 process with 8 devices."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from ldm_jax import sharding as shd
from ldm_jax.training import loop
from training_utils import batches, shared_objective, tiny_config

HERE = pathlib.Path(__file__).parent
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid)}
        cmd = [sys.executable, str(HERE / "train_worker.py"), str(tmp_path / "mp"), "test", str(STEPS), "1000",
               str(tmp_path / "mp.json"), "4,2,1"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail("multi-process workers timed out")
    finally:
        for p in procs:  # never leave workers behind
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    mp = json.loads((tmp_path / "mp.json").read_text())
    assert mp["processes"] == 2 and mp["devices"] == 8 and mp["step"] == STEPS

    # The reference: one process, 8 devices, the same (data 4 x fsdp 2) mesh and the same objective as
    # test_training's sharded test (its compiled step is reused when both run in one pytest process).
    config = tiny_config("test", num_steps=STEPS, mesh=(4, 2, 1), **{"checkpoint.every": 1000})
    mesh = shd.mesh_from_config(config.mesh)
    single = loop.train(config, tmp_path / "sp", objective=shared_objective("test"), dataset=batches(config, mesh),
                        mesh=mesh)
    np.testing.assert_allclose(mp["losses"], single.losses, rtol=1e-6, atol=1e-7)
