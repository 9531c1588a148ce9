"""LoRA training step vs full fine-tuning step of the same UNet: step time and parameter + optimizer bytes.

    python3 bench/bench_lora.py [--rank 8] [--width 64] [--latent 16] [--batch 1] [--steps 3] [--reps 3] [--targets attn]

1. Counts, shape only (jax.eval_shape, nothing allocated): the SD1 UNet (UNET_PRESETS["sd1"], 860M
   parameters) with AdamW — trainable parameters, optimizer state bytes (from the abstract arrays
   optax.adamw(...).init returns) for the full fine-tune and for a rank-`rank` LoRA on the attention
   projections (to_q/k/v/out, the default targets).
2. Timing: the SD1 architecture at `--width` base channels (SD1: 320) and context 768 on `--latent`² latents
   (eps loss, AdamW, jit with the trainable tree and optimizer state donated; the LoRA steps' frozen base
   is an ordinary, not donated, argument). Three steps alternate `--reps` times (the fastest mean step of
   each is kept): the full fine-tune, LoRA as the parameter transform (`lora.apply`: W + s·down@up, whose
   backward forms each targeted kernel's gradient) and LoRA on the activations (`lora.activations`, what
   the LoRA objective trains with: no kernel gradient at all). full/this > 1: faster than the full step.
   Memory: trainable + optimizer bytes from the arrays, and XLA's temp buffer size of each compiled step.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def nbytes(tree) -> int:
    import jax

    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--targets", default="attn", help="LoRA target presets (models/lora.py UNET_TARGETS)")
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import optax
    from flax.core import meta

    from ldm_jax.models import lora
    from ldm_jax.models.unet import UNET_PRESETS, UNet

    tx = optax.adamw(1e-4)

    def shapes(kw, latent):
        m = UNet(**kw)
        x = jnp.zeros((1, latent, latent, 4))
        ctx = jnp.zeros((1, 77, kw["context_dim"]))
        return m, meta.unbox(jax.eval_shape(lambda: m.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32), ctx))["params"])

    # ------------------------------------------------------------------ 1. SD1 counts, shape only
    sd1 = dict(UNET_PRESETS["sd1"])
    _, p_sd1 = shapes(sd1, 8)
    mods = lora.select_targets(p_sd1, ["attn"])
    ad_sd1 = jax.eval_shape(lambda p: lora.init_adapters(jax.random.key(0), p, mods, a.rank), p_sd1)
    full_opt, lora_opt = jax.eval_shape(tx.init, p_sd1), jax.eval_shape(tx.init, ad_sd1)
    n_full, n_lora = sum(x.size for x in jax.tree.leaves(p_sd1)), lora.count(ad_sd1)
    print(f"SD1 UNet: {n_full / 1e6:.1f}M params; rank-{a.rank} LoRA on {len(mods)} attention projections: "
          f"{n_lora / 1e6:.3f}M params ({n_lora * 4 / 2**20:.1f} MiB fp32 file)")
    print(f"  optimizer state (AdamW): full {nbytes(full_opt) / 2**30:.2f} GiB, LoRA {nbytes(lora_opt) / 2**20:.2f} MiB, "
          f"ratio {nbytes(full_opt) / nbytes(lora_opt):.0f}x")
    print(f"  trainable + optimizer: full {(nbytes(p_sd1) + nbytes(full_opt)) / 2**30:.2f} GiB, "
          f"LoRA {(nbytes(ad_sd1) + nbytes(lora_opt)) / 2**20:.2f} MiB (+ the frozen base {nbytes(p_sd1) / 2**30:.2f} GiB, "
          f"{nbytes(p_sd1) / 2**31:.2f} GiB in bf16)")

    # ------------------------------------------------------------------ 2. step time, same CPU, alternating
    kw = {**sd1, "model_channels": a.width}
    model, abstract = shapes(kw, a.latent)
    key = jax.random.key(0)
    params = jax.tree.map(lambda s: 0.02 * jax.random.normal(key, s.shape, s.dtype), abstract)
    mods = lora.select_targets(params, a.targets.split(","))
    adapters = lora.init_adapters(key, params, mods, a.rank)
    x = jax.random.normal(key, (a.batch, a.latent, a.latent, 4))
    ctx = jax.random.normal(key, (a.batch, 77, kw["context_dim"]))
    t = jnp.full((a.batch,), 500)

    def loss(p):
        return jnp.mean((model.apply({"params": p}, x, t, ctx) - x) ** 2)

    def full_step(p, o):
        g = jax.grad(loss)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    def lora_loss_weights(ad, base):  # the parameter transform: W + (alpha/rank)·down@up, then the model
        return loss(lora.apply(base, [(ad, 1.0)], alpha=float(a.rank)))

    def lora_loss_activations(ad, base):  # what the LoRA objective trains with: W x + (alpha/rank)·up(down(x))
        with lora.activations({UNet: "unet"}, {"unet": [(ad, 1.0)]}, alpha=float(a.rank)):
            return loss(base)

    def lora_step(lora_loss):
        def step(ad, o, base):
            g = jax.grad(lora_loss)(ad, base)
            u, o = tx.update(g, o, ad)
            return optax.apply_updates(ad, u), o
        return step

    # the full step donates (consumes) its params; the LoRA steps' base is one shared, never donated copy
    base = jax.tree.map(jnp.copy, params)
    runs = {"full": (full_step, [params, tx.init(params)], ()),
            "lora_weights": (lora_step(lora_loss_weights), [adapters, tx.init(adapters)], (base,)),
            "lora_activations": (lora_step(lora_loss_activations), [jax.tree.map(jnp.copy, adapters),
                                                                    tx.init(adapters)], (base,))}
    times, compiled = {k: float("inf") for k in runs}, {}
    for name, (fn, st, extra) in runs.items():
        t0 = time.perf_counter()
        compiled[name] = jax.jit(fn, donate_argnums=(0, 1)).lower(*st, *extra).compile()
        st[:] = jax.block_until_ready(compiled[name](*st, *extra))
        print(f"{name}: compile + first step {time.perf_counter() - t0:.1f} s")
    for _ in range(a.reps):
        for name, (fn, st, extra) in runs.items():
            t0 = time.perf_counter()
            for _ in range(a.steps):
                st[:] = compiled[name](*st, *extra)
            jax.block_until_ready(st)
            times[name] = min(times[name], (time.perf_counter() - t0) / a.steps)
    assert not any(x.is_deleted() for x in jax.tree.leaves(base))  # the LoRA steps never donated the base
    n_small = sum(x.size for x in jax.tree.leaves(params))
    print(f"timing UNet: SD1 layout at width {a.width} ({n_small / 1e6:.1f}M params), {a.latent}x{a.latent} latents, "
          f"batch {a.batch}, LoRA rank {a.rank} on {len(mods)} modules ({a.targets}):")
    for name, (fn, st, extra) in runs.items():
        m = compiled[name].memory_analysis()
        trained = nbytes(st)  # trainable + optimizer state (the step's donated carry)
        temp = f", XLA temp {m.temp_size_in_bytes / 2**20:.1f} MiB" if m is not None else ""
        print(f"  {name:17s} {times[name] * 1e3:7.1f} ms/step  full/this {times['full'] / times[name]:.2f}x  "
              f"trainable+opt {trained / 2**20:8.2f} MiB{temp}")
    print(f"machine: {cpu_name()}, avx512f {'avx512f' in open('/proc/cpuinfo').read()}, jax {jax.__version__} "
          f"{jax.default_backend()}, load {' '.join(open('/proc/loadavg').read().split()[:3])}")


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
