"""Sampling overhead and compile time of the lax.scan samplers, with a small UNet as denoiser.

    python3 bench/bench_sampling.py [--preset tiny] [--batch 2] [--size 32] [--steps 20] [--reps 5]

overhead = (time of one jitted sampling run) / (time of as many jitted denoiser calls as the sampler
makes, dispatched one after another from Python), alternated in this run on the same inputs
(goal <= 1.05; below 1 means the fused program saves the per-call dispatch that a Python loop over
steps would pay). Compile time is given for 10 and
100 steps: a constant means the program does not grow with the step count.
Timings on a shared CPU are noisy: the two are alternated --reps times and the fastest of each kept.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ldm_jax import sampling  # noqa: E402
from ldm_jax.diffusion import denoisers, schedules  # noqa: E402



def count_nfe(name: str, sigmas) -> int:
    """Denoiser calls of sampler `name` on `sigmas` (counted on a cheap stand-in: they do not depend
    on the model)."""
    calls = []

    def den(x, s):
        jax.debug.callback(lambda: calls.append(1), ordered=True)
        return x * 0.5

    x = jnp.ones((1, 4))
    opts = {"tau_interval": (10.0, 0.1)} if name.startswith("sa_solver") else {}
    jax.block_until_ready(jax.jit(lambda x: sampling.SAMPLERS[name](den, x, sigmas, key=jax.random.key(0),
                                                                     **opts))(x))
    return len(calls)


def build(preset: str, batch: int, size: int):
    """A UNet preset (ldm_jax.models.unet) wrapped as a discrete eps denoiser with fixed context."""
    from ldm_jax.models.unet import UNET_PRESETS, UNet

    kw = UNET_PRESETS[preset]
    model = UNet(**kw)
    x = jnp.zeros((batch, size, size, kw.get("in_channels", 4)))
    ctx = jnp.zeros((batch, 77, kw["context_dim"])) if kw.get("context_dim") else None
    params = jax.jit(model.init)(jax.random.key(0), x, jnp.zeros((batch,)), ctx)["params"]
    ac = schedules.alphas_cumprod(schedules.make_betas("linear"))

    def make_denoiser(params):
        return denoisers.DiscreteDenoiser(lambda x_in, t: model.apply({"params": params}, x_in, t, ctx), ac)

    n_params = sum(p.size for p in jax.tree.leaves(params))
    return make_denoiser, params, x, n_params, ac


def min_time(fn, reps: int, clock=time.perf_counter) -> float:
    """Fastest of `reps` runs: on a shared CPU the minimum is the least disturbed measurement."""
    jax.block_until_ready(fn())  # warm-up (compiled already)
    times = []
    for _ in range(reps):
        t = clock()
        jax.block_until_ready(fn())
        times.append(clock() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--samplers", default="euler,dpmpp_2m,heun,dpmpp_2m_sde,uni_pc,uni_pc_bh2,deis,ipndm,lcm",
                    help=f"comma-separated, from: {','.join(sampling.SAMPLERS)} (CFG++ ones need a guided model)")
    ap.add_argument("--skip-compile", action="store_true", help="do not time compilation")
    args = ap.parse_args()

    make_denoiser, params, x0, n_params, ac = build(args.preset, args.batch, args.size)
    train = schedules.sigmas_from_alphas_cumprod(ac)
    print(f"UNet preset {args.preset!r}: {n_params / 1e6:.2f}M params, x {tuple(x0.shape)}, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
    x = jax.random.normal(jax.random.key(1), x0.shape) * float(train.max())
    sigma = jnp.full((args.batch,), 3.0)

    call = jax.jit(lambda p, x, s: make_denoiser(p)(x, s))
    call(params, x, sigma)
    print(f"one denoiser call: {min_time(lambda: call(params, x, sigma), 10) * 1e3:.2f} ms")

    def calls(n):  # the reference: n separately jitted denoiser calls (dispatched asynchronously)
        y = x
        for _ in range(n):
            y = call(params, y, sigma)
        return y

    sig = {n: sampling.get_sigmas_karras(n, float(train.min()), float(train.max())) for n in (10, 100, args.steps)}
    print(f"{'sampler':14s} {'steps':>5s} {'nfe':>4s} {'sample s':>9s} {'nfe calls s':>11s} {'overhead':>8s} "
          f"{'cpu overhead':>12s} {'compile(10) s':>13s} {'compile(100) s':>14s}")
    for name in args.samplers.split(","):
        fn = sampling.SAMPLERS[name]
        run = jax.jit(lambda p, x, s, k: fn(make_denoiser(p), x, s, key=k))
        compile_s = {}
        for n in () if args.skip_compile else (10, 100):
            t = time.perf_counter()
            run.lower(params, x, sig[n], jax.random.key(0)).compile()
            compile_s[n] = time.perf_counter() - t
        nfe = count_nfe(name, sig[args.steps])
        sample = lambda: run(params, x, sig[args.steps], jax.random.key(0))  # noqa: E731
        jax.block_until_ready(sample())
        # alternate the two measurements so that both see the same load; ratio of the fastest runs
        # (and in process CPU time, which other processes on a shared machine disturb much less)
        t_sample, t_ref, c_sample, c_ref = [], [], [], []
        for _ in range(args.reps):
            t_sample.append(min_time(sample, 1))
            t_ref.append(min_time(lambda: calls(nfe), 1))
            c_sample.append(min_time(sample, 1, time.process_time))
            c_ref.append(min_time(lambda: calls(nfe), 1, time.process_time))
        ts, tr = min(t_sample), min(t_ref)
        print(f"{name:14s} {args.steps:5d} {nfe:4d} {ts:9.3f} {tr:11.3f} {ts / tr:8.3f} "
              f"{min(c_sample) / min(c_ref):12.3f} {compile_s.get(10, float('nan')):13.2f} "
              f"{compile_s.get(100, float('nan')):14.2f}")


if __name__ == "__main__":
    main()
