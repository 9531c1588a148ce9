"""Gradient accumulation on a data-parallel mesh: lax.scan under the partitioner vs the shard_map'd path.

    python3 bench/bench_accum.py [--devices 8] [--accum 4] [--per-device 1] [--steps 5] [--reps 3] [--arg test]

The LDM train step of configs/ldm_tiny.py:<arg> (trainer.jit_train_step: jit, donated state, EMA) on a
(data=devices, 1, 1) mesh of fake CPU devices, grad_accum micro-batches of per-device samples per device.
"scan" = optim.accum_shard_map=False (the all-reduce of all gradients runs inside the loop, once per
micro-batch), "shard_map" = the default (one all-reduce after the loop). Both are traced under
jax.set_mesh(mesh). Timings alternate the two --reps times and keep the fastest mean step of each.
Fake CPU devices share the host's cores and their "all-reduce" is a memory copy, so this shows the cost
of the collectives' count on CPU only; the HLO counts printed (collectives inside / after the loop) are
the portable result. ratio = scan step time / shard_map step time (> 1: shard_map is faster).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--per-device", type=int, default=1, help="samples per device per micro-batch")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--arg", default="test", help="configs/ldm_tiny.py argument")
    a = ap.parse_args()
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={a.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

    import jax

    from ldm_jax import sharding as shd
    from ldm_jax.training import ldm
    from ldm_jax.training import trainer as tr
    from training_utils import batches, host, max_diff, tiny_config

    from test_accumulate_shard_map import collectives  # the HLO reader of the test

    batch = a.devices * a.accum * a.per_device
    mesh = shd.make_mesh((a.devices, 1, 1))
    runs = {}
    for name, on in [("scan", False), ("shard_map", True)]:
        config = tiny_config(a.arg, **{"optim.grad_accum": a.accum, "global_batch_size": batch,
                                       "optim.accum_shard_map": on})
        objective = ldm.build(config)
        abstract, sh = tr.state_shardings(objective, mesh, config.seed)
        state = tr.create_state(objective, mesh, config.seed)
        data = batches(config, mesh)
        b = next(data)
        step = tr.jit_train_step(objective, config, mesh, sh, b)
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            compiled = step.lower(state, b, tr.step_key(state.rng, 0)).compile()
        compile_s = time.perf_counter() - t0
        c = collectives(compiled.as_text())
        count = lambda where: {op: [o for o, _ in c[where]].count(op) for op, _ in c[where]}  # noqa: E731
        runs[name] = dict(compiled=compiled, state=state, batch=b, compile_s=compile_s, times=[],
                          in_loop=count("in_loop"), outside=count("outside"))

    first = {}
    for _ in range(a.reps):
        for name, r in runs.items():
            state = r["state"]
            state, m = r["compiled"](state, r["batch"], tr.step_key(state.rng, 0))  # warm-up
            jax.block_until_ready(state)
            first.setdefault(name, (float(m["loss"]), host(state.params)))
            t0 = time.perf_counter()
            for i in range(a.steps):
                state, m = r["compiled"](state, r["batch"], tr.step_key(state.rng, i + 1))
            jax.block_until_ready(state)
            r["times"].append((time.perf_counter() - t0) / a.steps)
            r["state"] = state

    print(f"ldm_tiny:{a.arg} step, mesh data={a.devices} (fake CPU devices, {os.cpu_count()} cores), "
          f"global batch {batch}, grad_accum {a.accum}, {a.steps} steps x {a.reps} reps")
    for name, r in runs.items():
        print(f"  {name:9s}  {min(r['times']) * 1e3:8.1f} ms/step  (all reps: "
              f"{', '.join(f'{t * 1e3:.1f}' for t in r['times'])})  compile {r['compile_s']:.1f} s  "
              f"collectives in loop {r['in_loop']}  after {r['outside']}")
    ratio = min(runs["scan"]["times"]) / min(runs["shard_map"]["times"])
    dl = abs(first["scan"][0] - first["shard_map"][0])
    dp = max_diff(first["scan"][1], first["shard_map"][1])
    print(f"  ratio scan/shard_map = {ratio:.3f}   first step: |dloss| = {dl:.2e}, max |dparams| = {dp:.2e}")


if __name__ == "__main__":
    main()
