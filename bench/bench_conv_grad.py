"""The main job's train steps with `ldm_jax.models.conv_grad`'s convolution gradients vs XLA's own, on this CPU.

    python3 bench/bench_conv_grad.py [--reps 3] [--iters 5] [--pieces ae_step,gan_step,ldm_step,accum_step]

Builds each step twice from `configs/shapes.py` (random weights), once traced inside
`conv_grad.xla_gradients()` (the reference: `lax.conv_general_dilated`'s gradients) and once with ours, and
times them in alternating rounds in one process (the fastest round of each is kept), so load on a shared
machine hits both alike. Prints ms per step for both and the ratio reference / ours:
  ae_step     stage 1's autoencoder step (straight-line code)
  gan_step    the same with the GAN on (loss.disc_start=0, a 2-layer PatchGAN of 32 filters): the GAN part of
              the step is a `lax.cond` branch
  ldm_step    stage 2's LDM step, batch 32
  accum_step  the same with optim.grad_accum=2: the two micro-batches are a `lax.scan` (training/optim.py)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

PIECES = ("ae_step", "gan_step", "ldm_step", "accum_step")


def build(name: str):
    """A blocking `fn()` for piece `name`, not yet traced."""
    import jax

    import bench_main_job as bm
    from ldm_jax.training import autoencoder, ldm

    config = bm.load_config("configs/shapes.py", "")
    key = jax.random.key(1)
    if name in ("ae_step", "gan_step"):
        cfg = config.first_stage_train
        if name == "gan_step":
            with cfg.unlocked():
                cfg.loss.update(disc_start=0, disc_factor=1.0, disc_ndf=32, disc_layers=2)
        obj = autoencoder.build(cfg)
        n, res = int(cfg.global_batch_size), int(cfg.data.resolution)
        batch = {"image": jax.random.uniform(key, (n, res, res, 3), minval=-1, maxval=1)}
    else:
        with config.unlocked():
            config.optim.grad_accum = 2 if name == "accum_step" else 1
        obj = ldm.build(config)
        n, res = int(config.global_batch_size), int(config.image_size)
        batch = {"image": jax.random.uniform(key, (n, res, res, 3), minval=-1, maxval=1),
                 "input_ids": jax.random.randint(key, (n, 16), 0, int(obj.text_kwargs["vocab_size"]))}
    state = bm._state(obj)
    step = jax.jit(obj.train_step)
    return lambda: jax.block_until_ready(step(state, batch, key))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--pieces", default=",".join(PIECES))
    a = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    import bench_main_job as bm
    from ldm_jax.models import conv_grad

    which = a.pieces.split(",")
    if set(which) - set(PIECES):
        sys.exit(f"--pieces: unknown {sorted(set(which) - set(PIECES))}; known: {','.join(PIECES)}")
    print(f"machine: {bm.machine_line()}; jax {jax.__version__}, {jax.device_count()} device(s)", flush=True)
    fns = {}
    for name in which:
        for variant in ("xla", "ours"):
            fn, t = build(name), time.perf_counter()
            if variant == "xla":
                with conv_grad.xla_gradients():
                    fn()  # traced and compiled here, with XLA's gradients
            else:
                fn()
            fns[name, variant] = fn
            print(f"  {name} ({variant}) compiled in {time.perf_counter() - t:.1f} s", flush=True)
    best: dict = {}
    for _ in range(a.reps):
        for k, fn in fns.items():
            best[k] = min(best.get(k, float("inf")), bm._time(fn, a.iters))
    print(f"{'piece':12s} {'xla ms':>9s} {'ours ms':>9s} {'xla/ours':>9s}")
    for name in which:
        x, o = best[name, "xla"] * 1e3, best[name, "ours"] * 1e3
        print(f"{name:12s} {x:9.1f} {o:9.1f} {x / o:9.2f}")
    print(f"machine after: {bm.machine_line()}")


if __name__ == "__main__":
    main()
