"""Subprocess entry of the checkpoint and multi-process tests: trains the tiny test config.

python tests/train_worker.py WORKDIR CONFIG_ARG NUM_STEPS CKPT_EVERY OUT_JSON [MESH e.g. 4,2,1]
Multi-process runs set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (+ XLA_FLAGS).
"""
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from ldm_jax import sharding as shd  # noqa: E402
from ldm_jax.training import loop, registry  # noqa: E402
from training_utils import batches, tiny_config  # noqa: E402


def main() -> None:
    workdir, arg, steps, every, out = sys.argv[1:6]
    shd.initialize_distributed()
    mesh_arg = {"mesh": tuple(int(x) for x in sys.argv[6].split(","))} if len(sys.argv) > 6 else {}
    config = tiny_config(arg, num_steps=int(steps), **{"checkpoint.every": int(every)}, **mesh_arg)
    mesh = shd.mesh_from_config(config.mesh)
    objective = registry.make_objective(config, workdir)
    result = loop.train(config, workdir, objective, dataset=batches(config, mesh), mesh=mesh)
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump({"losses": result.losses, "stopped": result.stopped, "start": result.start_step,
                       "step": int(jax.device_get(result.state.step)), "devices": jax.device_count(),
                       "processes": jax.process_count()}, f)
    print(f"worker done: {result.stopped} at {int(jax.device_get(result.state.step))}", flush=True)


if __name__ == "__main__":
    from ldm_jax import distributed

    distributed.guard(main)
