"""The local multi-process launcher: 2 processes x 4 CPU devices form one 8-device JAX cluster on 127.0.0.1."""
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

WORKER_SCRIPT = r'''
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
assert jax.distributed.is_initialized()
mesh = Mesh(np.asarray(jax.devices()), ("data",))
x = np.arange(32, dtype=np.float32).reshape(16, 2)
g = jax.make_array_from_callback(x.shape, NamedSharding(mesh, P("data")), lambda idx: x[idx])
total = jax.jit(lambda a: jnp.sum(a ** 2), out_shardings=NamedSharding(mesh, P()))(g)
print("RESULT", jax.process_index(), jax.process_count(), jax.device_count(), jax.local_device_count(),
      float(total), " ".join(sys.argv[1:]), flush=True)
'''


def _run(tmp_path, script: str, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
    path = tmp_path / "worker.py"
    path.write_text(script)
    cmd = [sys.executable, str(ROOT / "launch" / "local.py"), "--num_processes=2", "--devices_per_process=4",
           f"--timeout={timeout}", "--", str(path), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30, cwd=tmp_path)


def test_two_processes_form_one_cluster(tmp_path):
    res = _run(tmp_path, WORKER_SCRIPT, "--flag=1")
    assert res.returncode == 0, res.stdout + res.stderr
    rows = sorted(re.findall(r"\[(\d)\] RESULT (\d) (\d) (\d+) (\d+) ([\d.]+) (.*)", res.stdout))
    assert len(rows) == 2, res.stdout
    expected = float(sum(i * i for i in range(32)))
    for prefix, (rank, pid, nproc, ndev, nlocal, total, argv) in enumerate(rows):
        assert int(rank) == prefix and int(pid) == prefix  # the launcher's id is JAX's process index
        assert (int(nproc), int(ndev), int(nlocal)) == (2, 8, 4)
        assert float(total) == expected  # the cross-process reduction saw all 16 rows
        assert argv.strip() == "--flag=1"


def test_a_failing_process_fails_the_launch(tmp_path):
    script = "import jax, sys\nsys.exit(3 if jax.process_index() == 1 else 0)\n"
    res = _run(tmp_path, script)
    assert res.returncode == 3, res.stdout + res.stderr


def test_local_launcher_needs_a_command():
    res = subprocess.run([sys.executable, str(ROOT / "launch" / "local.py"), "--num_processes=2"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "give the command" in res.stderr


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm.sbatch"])
def test_cluster_scripts_parse_and_use_the_worker(script):
    path = ROOT / "launch" / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "launch/run_worker.py" in path.read_text()
