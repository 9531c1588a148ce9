"""The accelerator check: SD1 UNet bf16 training step and SD1 sampling speed, with MFU and the attention path.

    bash bench/device_check.sh          # on a GPU/TPU host (bench/device_check.sh wraps this, ≤ 8 min on one H200)
    bash bench/device_check.sh --cpu    # the same program at smoke size on a CPU (checks that it runs)

Prints, and writes as JSON to $OUT/device_check.json when $OUT is set:
- the SD1 UNet (859.5M parameters) training step: bf16 compute over fp32 weights, batch 32, 64x64x4 latents,
  77x768 context, AdamW, remat as configs/ldm_f8.py sets it: ms/step, img/s, TFLOP/s per device and MFU from the
  compiled step's own cost analysis (ldm_jax.perf);
- SD1 512x512, 50 DPM++ 2M steps with CFG, batch 1 and 8 (random weights: speed does not depend on them): seconds
  per batch, compile time apart;
- which attention implementation the models used (cuDNN fused attention or XLA's).
`--model sdxl` (UNTESTED on an accelerator: written without one, only its CPU smoke size has run): the same for
the SDXL base UNet (2,567.5M) at 1024² (128x128x4 latents, batch 8, context 77x2048 + the text_time vector y) and
30 Euler steps at batch 1 and 4 with both text towers.
Anchors: MosaicML SD2 training ~137 img/s per A100 at 256² (latents precomputed); SD1.5 512² 50 steps batch 1 on
an H100: 1.44 s PyTorch eager, 0.75 s TensorRT.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from ldm_jax import perf  # noqa: E402
from ldm_jax.models import layers  # noqa: E402
from ldm_jax.models.unet import UNET_PRESETS, UNet  # noqa: E402
from ldm_jax.pipeline import Pipeline  # noqa: E402

FULL = dict(unet="sd1", vae="kl-f8", text="clip-vit-l-14", batch=32, latent=64, image=512, steps=50, sample_batches=(1, 8),
            train_reps=5)
SMOKE = dict(unet="tiny", vae="tiny", text="tiny", batch=2, latent=16, image=64, steps=4, sample_batches=(1, 2),
             train_reps=2)
# SDXL (`--model sdxl`; untested on an accelerator): base UNet, bf16, 1024² images, 30 Euler steps
FULL_SDXL = dict(FULL, unet="sdxl-base", text="sdxl-base", batch=8, latent=128, image=1024, steps=30,
                 sample_batches=(1, 4), sampler="euler")
_TINY_TOWER = dict(vocab_size=1000, width=16, layers=2, heads=2, mlp_dim=32, output_layer=-2, final_norm=False)
SMOKE_SDXL = dict(SMOKE, unet="sdxl-tiny", text="sdxl-tiny", latent=16, image=128, sampler="euler")


def _text_kwargs(name: str) -> dict:
    """Text-encoder kwargs: a TEXT_PRESETS name, or SDXL's two towers ("sdxl-base"; "sdxl-tiny" for the smoke size)."""
    from ldm_jax.models.text import SDXL_TEXT, TEXT_PRESETS

    if name == "sdxl-base":
        return {"encoders": {k: dict(v) for k, v in SDXL_TEXT["sdxl-base"].items()}}
    if name == "sdxl-tiny":  # widths 16 + 16 = sdxl-tiny's context 32, pooled 16 (+ 6 x 8 micro ids = its y)
        return {"encoders": {"text_encoder": dict(_TINY_TOWER, act="quick_gelu"),
                             "text_encoder_2": dict(_TINY_TOWER, act="gelu", projection_dim=16)}}
    return dict(TEXT_PRESETS[name])


def _timed(fn, reps: int) -> float:
    """Median seconds of `fn()` over `reps` calls (each call blocks until its result is ready)."""
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def train_step_check(size: dict, remat: str) -> dict:
    kw = dict(UNET_PRESETS[size["unet"]], dtype=jnp.bfloat16, remat_policy=remat)
    model = UNet(**kw)
    b, h, ctx_dim = size["batch"], size["latent"], kw["context_dim"]
    x = jnp.zeros((b, h, h, kw["in_channels"]), jnp.float32)
    t = jnp.zeros((b,), jnp.int32)
    ctx = jnp.zeros((b, 77, ctx_dim), jnp.float32)
    adm = kw.get("adm_in_channels")
    y = None if adm is None else jnp.zeros((b, adm), jnp.float32)  # SDXL: pooled text + micro-conditioning
    params = jax.jit(lambda k: model.init(k, x, t, ctx, y)["params"])(jax.random.key(0))
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    tx = optax.adamw(1e-4, weight_decay=1e-2)
    opt = jax.jit(tx.init)(params)

    def step(params, opt, key):
        k1, k2, k3 = jax.random.split(key, 3)
        x0 = jax.random.normal(k1, x.shape)
        noise = jax.random.normal(k2, x.shape)
        tt = jax.random.randint(k3, (b,), 0, 1000)
        c = jax.random.normal(k3, ctx.shape)
        yy = None if y is None else jax.random.normal(k3, y.shape)

        def loss_fn(p):
            pred = model.apply({"params": p}, x0 + noise, tt, c, yy)
            return jnp.mean((pred.astype(jnp.float32) - noise) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    jitted = jax.jit(step, donate_argnums=(0, 1))
    key = jax.random.key(1)
    t0 = time.perf_counter()
    compiled = jitted.lower(params, opt, key).compile()
    compile_s = time.perf_counter() - t0
    flops = perf.compiled_flops(compiled)
    state = [params, opt]

    def run():
        state[0], state[1], loss = compiled(state[0], state[1], key)
        return loss

    jax.block_until_ready(run())  # warm-up
    sec = _timed(run, size["train_reps"])
    out = dict(params=n_params, batch=b, latent=h, remat=remat, compile_s=compile_s, ms_per_step=sec * 1e3,
               img_per_s=b / sec, flops_per_step=flops)
    if flops:
        out.update(perf.utilisation(flops, sec))
    return out


def sampling_check(size: dict) -> list[dict]:
    unet_kw = dict(UNET_PRESETS[size["unet"]], dtype=jnp.bfloat16)
    from ldm_jax.models.autoencoder import VAE_PRESETS

    vae_kw = dict(VAE_PRESETS[size["vae"]])
    text_kw = _text_kwargs(size["text"])
    towers = len(text_kw.get("encoders", ())) or None
    if towers is None and text_kw.get("width") != unet_kw["context_dim"]:
        text_kw["width"] = unet_kw["context_dim"]
    ids_shape = (77,) if towers is None else (towers, 77)

    def tokenizer(texts):
        return np.zeros((len(texts), *ids_shape), np.int32)

    pipe = Pipeline.from_configs(unet_kw, vae_kw, text_kw, tokenizer, {}, default_size=size["image"])
    img = size["image"]
    f = pipe.downsample
    k = jax.random.split(jax.random.key(0), 3)
    adm = unet_kw.get("adm_in_channels")
    y0 = None if adm is None else jnp.zeros((1, adm))
    dummy = {
        "unet": jax.jit(lambda key: pipe.unet.init(key, jnp.zeros((1, img // f, img // f, unet_kw["in_channels"])),
                                                    jnp.zeros((1,), jnp.int32),
                                                    jnp.zeros((1, 77, unet_kw["context_dim"])), y0)["params"])(k[0]),
        "vae": jax.jit(lambda key: pipe.vae.init(key, jnp.zeros((1, img, img, 3)), sample_posterior=False)["params"])(k[1]),
        "text": jax.jit(lambda key: pipe.text_encoder.init(key, jnp.zeros((1, *ids_shape), jnp.int32))["params"])(k[2]),
    }
    rows = []
    for batch in size["sample_batches"]:
        sampler = size.get("sampler", "dpmpp_2m")
        gen = lambda: pipe.generate(["a photo"] * batch, sampler=sampler, schedule="karras",  # noqa: E731
                                    steps=size["steps"], guidance_scale=7.5, params=dummy, height=img, width=img)
        t0 = time.perf_counter()
        gen()
        first = time.perf_counter() - t0
        sec = _timed(gen, 2)
        rows.append(dict(batch=batch, image=img, steps=size["steps"], sampler=sampler, seconds=sec,
                         compile_s=max(first - sec, 0.0)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="smoke size (tiny models) on whatever backend is there")
    ap.add_argument("--remat", default="dots_no_batch", help="UNet remat policy (configs/ldm_f8.py: dots_no_batch)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: train,sample")
    ap.add_argument("--model", choices=("sd1", "sdxl"), default="sd1", help="sdxl: UNTESTED on an accelerator")
    args = ap.parse_args()
    size = {("sd1", True): SMOKE, ("sd1", False): FULL, ("sdxl", True): SMOKE_SDXL,
            ("sdxl", False): FULL_SDXL}[(args.model, args.cpu)]
    dev = jax.devices()[0]
    report = dict(jax=jax.__version__, backend=jax.default_backend(), device=str(dev.device_kind),
                  devices=jax.device_count(), size="smoke" if args.cpu else "full", model=args.model)
    peak, source = perf.peak_flops(dev)
    report["peak_tflops"], report["peak_source"] = peak / 1e12, source
    print(f"jax {jax.__version__} on {jax.device_count()} x {dev.device_kind} ({jax.default_backend()}); "
          f"peak {peak / 1e12:.3g} TFLOP/s ({source})", flush=True)
    skip = set(filter(None, args.skip.split(",")))
    if "train" not in skip:
        r = report["train"] = train_step_check(size, args.remat)
        mfu = f", {r['tflops_per_device']:.3g} TFLOP/s/device, MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
        print(f"train  {size['unet']} UNet ({r['params'] / 1e6:.1f}M) bf16 batch {r['batch']} {r['latent']}² latents "
              f"remat={r['remat']}: {r['ms_per_step']:.1f} ms/step, {r['img_per_s']:.1f} img/s{mfu} "
              f"(compile {r['compile_s']:.1f} s)", flush=True)
    if "sample" not in skip:
        report["sample"] = sampling_check(size)
        for r in report["sample"]:
            print(f"sample {r['image']}² {r['steps']} steps {r['sampler']} CFG batch {r['batch']}: {r['seconds']:.2f} s "
                  f"(compile {r['compile_s']:.1f} s)", flush=True)
    report["attention_paths"] = dict(layers.ATTENTION_PATHS)
    print(f"attention paths traced: {report['attention_paths']}", flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "device_check.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
