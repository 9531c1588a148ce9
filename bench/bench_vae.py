"""Autoencoder encode/decode time under jax.jit against diffusers' PyTorch AutoencoderKL, same config and weights.

    python3 bench/bench_vae.py [--preset kl-f8] [--size 256] [--batch 1] [--reps 3]

Needs torch + diffusers (requirements-dev.txt). The diffusers model gets random weights, ours is loaded from
its state dict through `ldm_jax.interop.vae.from_diffusers`, and the outputs are compared before timing.
ratio = ours / PyTorch (goal <= 1.0). Timings on a shared CPU are noisy: the two are alternated --reps times
and the fastest of each kept.
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
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL as TorchAutoencoderKL  # noqa: E402

from ldm_jax.interop import vae as conv  # noqa: E402
from ldm_jax.models.autoencoder import VAE_PRESETS, AutoencoderKL  # noqa: E402


def _best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="kl-f8", choices=[k for k, v in VAE_PRESETS.items() if "n_embed" not in v])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    kwargs = conv.full_kwargs(VAE_PRESETS[args.preset])
    cfg = conv.config_to_diffusers(kwargs)
    cfg.pop("_class_name")
    torch.manual_seed(0)
    ref = TorchAutoencoderKL(**cfg).eval()
    params = conv.from_diffusers({k: v.numpy() for k, v in ref.state_dict().items()}, kwargs)
    params = jax.device_put(params)
    model = AutoencoderKL(**kwargs)

    x = np.random.RandomState(0).uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32)
    f = model.downsample_factor
    z = np.random.RandomState(1).randn(args.batch, args.size // f, args.size // f, kwargs["embed_dim"]).astype(np.float32)
    xt, zt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(z.transpose(0, 3, 1, 2).copy())

    enc = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode").mean)
    dec = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))
    t = time.perf_counter()
    ours_mean = enc(params, x).block_until_ready()
    t_enc_compile = time.perf_counter() - t
    t = time.perf_counter()
    ours_img = dec(params, z).block_until_ready()
    t_dec_compile = time.perf_counter() - t
    with torch.no_grad():
        ref_mean = ref.encode(xt).latent_dist.mean.permute(0, 2, 3, 1).numpy()
        ref_img = ref.decode(zt).sample.permute(0, 2, 3, 1).numpy()
    for name, a, b in (("encode mean", ours_mean, ref_mean), ("decode", ours_img, ref_img)):
        print(f"{name}: max |ours - torch| / max |torch| = {np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)):.2e}")

    ours_e, ours_d, ref_e, ref_d = [], [], [], []
    with torch.no_grad():
        for _ in range(args.reps):
            ours_e.append(_best(lambda: enc(params, x).block_until_ready(), 1))
            ref_e.append(_best(lambda: ref.encode(xt), 1))
            ours_d.append(_best(lambda: dec(params, z).block_until_ready(), 1))
            ref_d.append(_best(lambda: ref.decode(zt), 1))
    print(f"{args.preset} batch {args.batch} {args.size}x{args.size}, torch threads {torch.get_num_threads()}, "
          f"jax devices {jax.devices()[0].platform}")
    for name, ours, ref_t, comp in (("encode", ours_e, ref_e, t_enc_compile), ("decode", ours_d, ref_d, t_dec_compile)):
        print(f"{name}: ours {min(ours):.3f} s, diffusers {min(ref_t):.3f} s, ratio {min(ours) / min(ref_t):.2f} "
              f"(compile + first run {comp:.1f} s)")


if __name__ == "__main__":
    main()
