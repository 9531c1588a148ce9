"""Per-process entry used by every launcher: start `jax.distributed`, then run the given module or script.

    python3 launch/run_worker.py -m ldm_jax.train --config=configs/shapes.py --workdir=DIR
    python3 launch/run_worker.py path/to/script.py ARGS...

With LDM_JAX_COORDINATOR (host:port), LDM_JAX_NUM_PROCESSES and LDM_JAX_PROCESS_ID set (what
`launch/local.py` sets), the cluster is formed from them; otherwise `jax.distributed.initialize()` detects
TPU pods, Slurm, Open MPI and Kubernetes by itself. A single process (no cluster found) runs unchanged.
Code run afterwards should call `jax.distributed.initialize` only when `jax.distributed.is_initialized()`
is False.
"""
from __future__ import annotations

import os
import runpy
import sys


def initialize() -> None:
    """Forms the JAX cluster from LDM_JAX_* variables, else by auto-detection; no-op on a single host."""
    import jax

    if jax.distributed.is_initialized():
        return
    coordinator = os.environ.get("LDM_JAX_COORDINATOR")
    if coordinator:
        try:
            num, pid = int(os.environ["LDM_JAX_NUM_PROCESSES"]), int(os.environ["LDM_JAX_PROCESS_ID"])
        except KeyError as e:
            raise SystemExit(f"LDM_JAX_COORDINATOR is set but {e.args[0]} is not") from None
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
        return
    cluster = any(os.environ.get(v) for v in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                                               "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"))
    cluster = cluster or _on_tpu_pod()
    if cluster:
        jax.distributed.initialize()  # auto-detects coordinator, process count and id


def _on_tpu_pod() -> bool:
    # A multi-host TPU VM lists its workers in the metadata-derived env; single-host TPU VMs need no cluster.
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def main(argv: list[str]) -> None:
    """Initializes the cluster, then runs `-m module args...` or `script.py args...` as __main__."""
    if not argv:
        raise SystemExit(__doc__)
    # `python -m` would put the working directory on sys.path; a script run puts launch/ there instead.
    sys.path[:0] = [os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    initialize()
    if argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit("-m needs a module name")
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
