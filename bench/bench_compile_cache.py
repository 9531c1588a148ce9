"""First start vs second start with JAX's persistent compilation cache (ldm_jax/compile_cache.py).

    python3 bench/bench_compile_cache.py [--skip-sd1]

Each case runs twice in fresh processes sharing one new, empty cache folder; the second run loads the compiled
programs the first one wrote. Cases:
- `shapes:smoke`: `python -m ldm_jax.train --config=configs/shapes.py:smoke` into a new workdir each time (both
  stages, a few steps each, final eval): wall time of the whole command.
- `sd1-step`: the SD1 UNet (859.5M) bf16 training step (AdamW, remat dots_no_batch), compiled shape-only
  (`jit(...).lower(ShapeDtypeStruct...).compile()`, no weights allocated): compile seconds.
Prints the seconds of both starts and their ratio, with the machine and the load average.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

SD1_STEP = r"""
import time, sys
import jax, jax.numpy as jnp, optax
from ldm_jax import compile_cache
compile_cache.enable()
from ldm_jax.models.unet import UNET_PRESETS, UNet
model = UNet(**UNET_PRESETS["sd1"], dtype=jnp.bfloat16, remat_policy="dots_no_batch")
b = 1
x = jax.ShapeDtypeStruct((b, 64, 64, 4), jnp.float32)
t = jax.ShapeDtypeStruct((b,), jnp.int32)
c = jax.ShapeDtypeStruct((b, 77, 768), jnp.float32)
params = jax.eval_shape(lambda k: model.init(k, jnp.zeros(x.shape), jnp.zeros(t.shape, jnp.int32),
                                             jnp.zeros(c.shape))["params"], jax.random.key(0))
tx = optax.adamw(1e-4)
opt = jax.eval_shape(tx.init, params)
def step(p, o, x, t, c):
    loss, g = jax.value_and_grad(lambda p: jnp.mean(model.apply({"params": p}, x, t, c).astype(jnp.float32) ** 2))(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss
t0 = time.perf_counter()
jax.jit(step, donate_argnums=(0, 1)).lower(params, opt, x, t, c).compile()
print(f"COMPILE {time.perf_counter() - t0:.2f}")
"""


def _machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    avx512 = "avx512f" in open("/proc/cpuinfo").read()
    return f"{model}, {os.cpu_count()} cores, {'with' if avx512 else 'no'} AVX-512, load {os.getloadavg()[0]:.1f}"


def _run(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t0, out.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-sd1", action="store_true")
    ap.add_argument("--skip-shapes", action="store_true")
    args = ap.parse_args()
    print(_machine())
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LDM_JAX_COMPILE_CACHE": f"{tmp}/cache", "JAX_PLATFORMS": "cpu",
               "PYTHONPATH": str(ROOT)}
        if not args.skip_shapes:
            walls = []
            for i, cache in enumerate(("off", f"{tmp}/cache", f"{tmp}/cache")):  # run 0 only builds the dataset
                cmd = [sys.executable, "-m", "ldm_jax.train", "--config=configs/shapes.py:smoke", f"--workdir={tmp}/w{i}",
                       f"--config.data.data_dir={tmp}/tfds"]
                walls.append(_run(cmd, {**env, "LDM_JAX_COMPILE_CACHE": cache})[0])
            print(f"shapes:smoke train CLI wall (dataset already built): first start {walls[1]:.1f} s, second start "
                  f"{walls[2]:.1f} s (ratio {walls[2] / walls[1]:.2f})")
        if not args.skip_sd1:
            secs = [float(_run([sys.executable, "-c", SD1_STEP], env)[1].split("COMPILE")[1]) for _ in range(2)]
            print(f"sd1 bf16 training step, shape-only compile: first start {secs[0]:.1f} s, second start "
                  f"{secs[1]:.1f} s (ratio {secs[1] / secs[0]:.3f})")


if __name__ == "__main__":
    main()
