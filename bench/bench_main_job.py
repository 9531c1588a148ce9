"""Where the main job's time goes, piece by piece, normalised by the machine's measured matmul/conv rate.

    python3 bench/bench_main_job.py [--config configs/shapes.py] [--reps 3] [--iters 10] [--pieces all]

Builds the two objectives of `configs/shapes.py` (random weights: the cost does not depend on them) and
times, each in its own jitted function at the config's batch sizes:
  ae_step     stage 1: one autoencoder train step (loss, gradients, Adam)
  encode      stage 2: the frozen first-stage encoder on one LDM batch (what the LDM step pays per step
              unless latents are cached)
  text        the text encoder's forward on one batch of token ids
  unet_fwd    the UNet's forward (train mode) on one batch of latents
  loss_grad   the LDM loss and its gradients (encode + text + UNet forward and backward)
  ldm_step    loss_grad + clipping + Adam (objective.train_step)
  ema         the EMA update of the trained parameters
  cached_step the LDM step from a cached latent mean/std (`first_stage.latent_cache` objective path)
and a fixed machine probe in the same process: a 1024^3 float32 matmul and a 3x3 conv (64 -> 64 channels,
32 x 32, batch 32), in GFLOP/s. Each round times the probe and then every piece, so that load on a shared
machine hits both alike; the fastest round of each is kept. `norm ms` = ms * (probe GFLOP/s) / 100: the
time on a machine whose matmul runs at 100 GFLOP/s, comparable across machines (a slow machine shows
larger ms but the same norm ms; a regression shows larger norm ms). Prints the CPU model, whether it has
AVX-512 and the load average.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine_line() -> str:
    """`lscpu` model name, AVX-512 or not, core count and load average."""
    model = platform.processor() or "?"
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    avx = "avx512f" if " avx512f" in flags else ("avx2, no avx512" if " avx2" in flags else "no avx2")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{model} ({avx}), {os.cpu_count()} cores, load {load:.1f}"


def _time(fn, iters: int) -> float:
    """Mean seconds of `fn()` (which blocks) over `iters` calls, after one warm call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def probes():
    """{name: (fn, flops)}: the machine-normalising matmul and conv."""
    import jax
    import jax.numpy as jnp

    k = jax.random.split(jax.random.key(0), 4)
    a, b = jax.random.normal(k[0], (1024, 1024)), jax.random.normal(k[1], (1024, 1024))
    x, w = jax.random.normal(k[2], (32, 32, 32, 64)), jax.random.normal(k[3], (3, 3, 64, 64))
    mm = jax.jit(jnp.matmul)
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                             dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return {"matmul": (lambda: mm(a, b).block_until_ready(), 2 * 1024 ** 3),
            "conv": (lambda: conv(x, w).block_until_ready(), 2 * 32 * 32 * 32 * 9 * 64 * 64)}


def load_config(path: str, arg: str):
    spec = importlib.util.spec_from_file_location("bench_config", ROOT / path if not Path(path).is_absolute() else path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _state(objective, seed: int = 0):
    """A TrainState of random weights, made directly (no mesh: one device)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from ldm_jax.training.state import TrainState

    init = jax.jit(lambda k: nn.unbox(objective.init(k)))(jax.random.key(seed))
    opt = {g: tx.init(init["params"][g]) for g, tx in objective.optimizers().items()}
    ema = {g: init["params"][g] for g in objective.ema_groups}
    return TrainState(step=jnp.zeros((), jnp.int32), params=init["params"], opt_state=opt, ema=ema,
                      frozen=init["frozen"], extra=init["extra"], rng=jax.random.key_data(jax.random.key(seed)))


def pieces(config, which: set[str]):
    """{name: (fn, images per call)} for the pieces in `which`."""
    import jax
    import jax.numpy as jnp

    from ldm_jax.training import autoencoder, ldm
    from ldm_jax.training.state import update_ema

    out = {}
    key = jax.random.key(1)
    if "ae_step" in which:
        ae_cfg = config.first_stage_train
        ae = autoencoder.build(ae_cfg)
        ae_state = _state(ae)
        n = int(ae_cfg.global_batch_size)
        res = int(ae_cfg.data.resolution)
        ae_batch = {"image": jax.random.uniform(key, (n, res, res, 3), minval=-1, maxval=1)}
        ae_step = jax.jit(ae.train_step)
        out["ae_step"] = (lambda: jax.block_until_ready(ae_step(ae_state, ae_batch, key)), n)

    obj = ldm.build(config)
    state = _state(obj)
    n, res = int(config.global_batch_size), int(config.image_size)
    length = int(obj.text_kwargs.get("max_length", 77)) if obj.text is not None else 0
    batch = {"image": jax.random.uniform(key, (n, res, res, 3), minval=-1, maxval=1)}
    if obj.text is not None:
        batch["input_ids"] = jax.random.randint(key, (n, length), 0, int(obj.text_kwargs["vocab_size"]))
    model = state.params["model"]
    fs = state.frozen["first_stage"]
    if "encode" in which:
        enc = jax.jit(lambda p, x: obj.encode(p, x, key))
        out["encode"] = (lambda: enc(fs, batch["image"]).block_until_ready(), n)
    if "text" in which and obj.text is not None:
        txt = jax.jit(lambda p, ids: obj.text.apply({"params": p}, ids)[0])
        out["text"] = (lambda: txt(model["text"], batch["input_ids"]).block_until_ready(), n)
    if "unet_fwd" in which:
        z = jnp.zeros((n, *obj.latent_shape))
        ctx = jnp.zeros((n, length, int(obj.unet_kwargs["context_dim"]))) if obj.text is not None else None
        t = jnp.zeros((n,), jnp.int32)
        fwd = jax.jit(lambda p: obj.unet.apply({"params": p}, z, t, ctx, None, train=True, rngs={"dropout": key}))
        out["unet_fwd"] = (lambda: fwd(model["unet"]).block_until_ready(), n)
    if "loss_grad" in which:
        lg = jax.jit(jax.value_and_grad(lambda m, b: obj.loss(m, state, b, key)[0]))
        out["loss_grad"] = (lambda: jax.block_until_ready(lg(model, batch)), n)
    if "ldm_step" in which:
        step = jax.jit(obj.train_step)
        out["ldm_step"] = (lambda: jax.block_until_ready(step(state, batch, key)), n)
    if "ema" in which:
        ema = jax.jit(lambda e, p: update_ema(e, p, jnp.float32(0.999)))
        out["ema"] = (lambda: jax.block_until_ready(ema(state.ema["model"], model)), n)
    if "cached_step" in which:
        cached = {k: v for k, v in batch.items() if k != "image"}
        cached["latent_mean"] = jnp.zeros((n, *obj.latent_shape))
        cached["latent_std"] = jnp.ones((n, *obj.latent_shape))
        cstep = jax.jit(obj.train_step)
        out["cached_step"] = (lambda: jax.block_until_ready(cstep(state, cached, key)), n)
    return out


ALL = ("ae_step", "encode", "text", "unet_fwd", "loss_grad", "ldm_step", "ema", "cached_step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/shapes.py")
    ap.add_argument("--arg", default="", help="config argument, e.g. smoke")
    ap.add_argument("--reps", type=int, default=3, help="rounds (probe, then every piece); the fastest is kept")
    ap.add_argument("--iters", type=int, default=10, help="calls per timing")
    ap.add_argument("--pieces", default="all", help=f"comma-separated subset of {','.join(ALL)}")
    ap.add_argument("--set", action="append", default=[], help="config override key=value (python literal)")
    a = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT))
    import ast

    import jax

    config = load_config(a.config, a.arg)
    with config.unlocked():
        for kv in a.set:
            k, v = kv.split("=", 1)
            node = config
            *path, last = k.split(".")
            for p in path:
                node = node[p]
            try:
                node[last] = ast.literal_eval(v)
            except (ValueError, SyntaxError):
                node[last] = v
    which = set(ALL) if a.pieces == "all" else set(a.pieces.split(","))
    unknown = which - set(ALL)
    if unknown:
        sys.exit(f"--pieces: unknown {sorted(unknown)}; known: {','.join(ALL)}")
    print(f"machine: {machine_line()}; jax {jax.__version__}, {jax.device_count()} device(s)", flush=True)
    t0 = time.perf_counter()
    probe, work = probes(), pieces(config, which)
    compile_s = {}
    for name, (fn, _) in {**probe, **work}.items():
        t = time.perf_counter()
        fn()
        compile_s[name] = time.perf_counter() - t
    print(f"built and compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    best: dict[str, float] = {}
    for _ in range(a.reps):
        for name, (fn, _) in {**probe, **work}.items():
            best[name] = min(best.get(name, float("inf")), _time(fn, a.iters))
    rate = {name: flops / best[name] / 1e9 for name, (_, flops) in probe.items()}
    print(f"probe: matmul 1024^3 f32 {rate['matmul']:.1f} GFLOP/s, conv 3x3 64ch 32x32 b32 {rate['conv']:.1f} GFLOP/s")
    print(f"{'piece':12s} {'ms':>9s} {'norm ms':>9s} {'img/s':>8s} {'first call s':>12s}")
    for name, (_, n) in work.items():
        ms = best[name] * 1e3
        print(f"{name:12s} {ms:9.2f} {ms * rate['matmul'] / 100:9.2f} {n / best[name]:8.1f} {compile_s[name]:12.1f}")
    print(f"machine after: {machine_line()}")


if __name__ == "__main__":
    main()
