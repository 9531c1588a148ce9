"""Per-process entry used by every launcher: start `jax.distributed`, then run the given module or script.

    python3 launch/run_worker.py -m ldm_jax.train --config=configs/shapes.py --workdir=DIR
    python3 launch/run_worker.py path/to/script.py ARGS...

With JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID set (what
`launch/local.py` sets) the cluster is formed from them; with LDM_JAX_DISTRIBUTED=1 (what the TPU pod and
Slurm scripts set) `jax.distributed.initialize()` detects TPU pods, Slurm, Open MPI and Kubernetes by
itself. With neither, a single process runs unchanged. `ldm_jax.sharding.initialize_distributed`, which
ldm_jax.train calls again, is then a no-op.
"""
from __future__ import annotations

import os
import runpy
import sys


def initialize() -> None:
    """Forms the JAX cluster (`ldm_jax.sharding.initialize_distributed`); a lone process stays alone."""
    from ldm_jax import sharding

    sharding.initialize_distributed()


def main(argv: list[str]) -> None:
    """Initializes the cluster, then runs `-m module args...` or `script.py args...` as __main__."""
    if not argv:
        raise SystemExit(__doc__)
    # `python -m` would put the working directory on sys.path; a script run puts launch/ there instead.
    sys.path[:0] = [os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    initialize()
    from ldm_jax import distributed

    if argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit("-m needs a module name")
        sys.argv = [argv[1], *argv[2:]]
        # a failure in one process (exception, sys.exit(1)) stops the others instead of leaving them in a collective
        distributed.guard(lambda: runpy.run_module(argv[1], run_name="__main__", alter_sys=True))
    else:
        sys.argv = list(argv)
        distributed.guard(lambda: runpy.run_path(argv[0], run_name="__main__"))


if __name__ == "__main__":
    main(sys.argv[1:])
