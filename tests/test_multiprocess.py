"""Multi-process training for real: 2 local processes x 4 CPU devices (jax.distributed over 127.0.0.1)
give the same losses as 1 process with 8 devices; a process that fails or dies stops the other, naming it."""
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

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


FAILING = r"""
import sys, time
import numpy as np
from jax.experimental import multihost_utils
from ldm_jax import distributed, sharding
sharding.initialize_distributed()
me, how = int(sys.argv[1]), sys.argv[2]

def main():
    for i in range(10_000):  # both processes in a collective every 0.2 s, as in training
        multihost_utils.process_allgather(np.int32(i))
        if i == 3 and me == int(how[-1]):
            if how.startswith("raise"):
                raise RuntimeError("boom on one host")
            sys.exit("config error: only this host lacks the data")
        time.sleep(0.2)

main() if how.startswith("raise") else distributed.guard(main)
"""


def _pair(tmp_path, script: str, how: str, env_extra: dict) -> list[subprocess.Popen]:
    (tmp_path / "failing.py").write_text(script)
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
               "PYTHONPATH": str(HERE.parent), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid), **env_extra}
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "failing.py"), str(pid), how], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


@pytest.mark.parametrize("how", ["raise1", "exit0"])  # an exception on a worker; sys.exit on the coordinator
def test_a_python_failure_on_one_process_stops_the_other_naming_it(tmp_path, how):
    from ldm_jax.distributed import PEER_FAILED

    procs = _pair(tmp_path, FAILING, how, {})
    t0 = time.monotonic()
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    took = time.monotonic() - t0
    bad = int(how[-1])
    other = 1 - bad
    assert procs[bad].returncode == 1, outs[bad][-3000:]
    assert procs[other].returncode == PEER_FAILED, outs[other][-3000:]
    want = {"raise1": "process 1 failed: RuntimeError: boom on one host",
            "exit0": "process 0 failed: config error: only this host lacks the data"}[how]
    assert f"ldm_jax: {want} -- stopping process {other} too; re-run the same command" in outs[other], outs[other][-3000:]
    assert took < 60  # without the hand-off: the shutdown barrier's 300 s, then a hang in the collective
