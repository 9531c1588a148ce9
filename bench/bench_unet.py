"""Forward and forward+backward time of our UNet under jax.jit vs diffusers' PyTorch UNet2DConditionModel.

Same config and weights (diffusers' random init, copied with our converter), same CPU, one process:

    python3 bench/bench_unet.py --config small --reps 5
    python3 bench/bench_unet.py --config sd1 --reps 3 [--backward]
    python3 bench/bench_unet.py --config sdxl-small --reps 3 --backward   # SDXL topology, text_time conditioning

Prints the median times (ours and PyTorch's calls alternate), the ratio ours/PyTorch (< 1 means we are faster),
our compile time and the 1-minute load average (the ratio is only meaningful on otherwise idle cores).
Needs torch + diffusers (requirements-dev.txt).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

CONFIGS = {
    # a ~35M-parameter 4-level SD-style UNet at 32x32 latents (the REFERENCE.md small case)
    "small": (dict(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                   attention_resolutions=(4, 2, 1), num_heads=8, transformer_depth=1, context_dim=768), 32),
    "sd1": ("sd1", 64),
    # SDXL base's topology (no attention at the top level, 64-wide heads, linear projections, context 2048, the
    # pooled-text + micro-conditioning vector y) at reduced width and depth (models/unet.py "sdxl-small")
    "sdxl-small": ("sdxl-small", 32),
}


def _median_times(fns, reps: int) -> list[float]:
    """Median time of each fn, calling them in turn rep by rep (load changes on a shared machine hit all alike)."""
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--backward", action="store_true", help="also time forward+backward (grad wrt all params)")
    args = ap.parse_args()

    import diffusers
    import jax
    import jax.numpy as jnp
    import torch

    from ldm_jax.interop import unet as iu
    from ldm_jax.interop.common import StrictStateDict
    from ldm_jax.models.unet import UNET_PRESETS, UNet

    torch.set_num_threads(args.threads)
    kw, size = CONFIGS[args.config]
    kw = UNET_PRESETS[kw] if isinstance(kw, str) else kw
    cfg = iu.config_to_diffusers(kw)
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if k != "_class_name"}).eval()
    n_params = sum(p.numel() for p in ref.parameters())
    params = iu.from_diffusers(StrictStateDict({k: v.numpy() for k, v in ref.state_dict().items()}), kw)
    params = jax.tree_util.tree_map(jnp.asarray, params)  # on the device once; the host copy is freed
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    avx512 = any("avx512f" in line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    print(f"machine: {cpu}, {os.cpu_count()} cores, avx512f {'yes' if avx512 else 'no'}")
    print(f"config {args.config}: {n_params / 1e6:.1f}M params, batch {args.batch}, {size}x{size} latents, "
          f"context 77x{kw['context_dim']}, {args.threads} threads, jax {jax.__version__} on {jax.devices()[0].platform}")

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, size, size, 4)).astype(np.float32)
    t = np.full((args.batch,), 500, np.int32)
    ctx = rng.standard_normal((args.batch, 77, kw["context_dim"])).astype(np.float32)
    tx, tt, tc = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(t), torch.from_numpy(ctx)
    model = UNet(**kw)
    added, y = {}, None
    if kw.get("adm_in_channels"):  # SDXL: pooled text (B, P) + micro-conditioning ids (B, n) -> y
        n_ids = 6
        pooled = rng.standard_normal((args.batch, kw["adm_in_channels"] - n_ids * 256)).astype(np.float32)
        ids = np.tile(np.asarray([[1024, 1024, 0, 0, 1024, 1024]], np.float32), (args.batch, 1))
        y = np.asarray(model.added_cond(jnp.asarray(pooled), jnp.asarray(ids)))
        added = {"added_cond_kwargs": {"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(ids)}}

    fwd = jax.jit(lambda p, x, t, c, y: model.apply({"params": p}, x, t, c, y))
    t0 = time.perf_counter()
    fwd_c = fwd.lower(params, x, t, ctx, y).compile()
    compile_fwd = time.perf_counter() - t0
    jx, jt, jc, jy = jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), None if y is None else jnp.asarray(y)

    out = np.asarray(fwd_c(params, jx, jt, jc, jy))
    with torch.no_grad():
        ref_out = ref(tx, tt, encoder_hidden_states=tc, **added).sample.permute(0, 2, 3, 1).numpy()
    err = np.abs(out - ref_out).max() / np.abs(ref_out).max()

    def torch_fwd():
        with torch.no_grad():
            ref(tx, tt, encoder_hidden_states=tc, **added)

    ours, theirs = _median_times([lambda: fwd_c(params, jx, jt, jc, jy).block_until_ready(), torch_fwd], args.reps)
    print(f"forward: ours {ours:.3f}s  diffusers {theirs:.3f}s  ratio {ours / theirs:.2f}  "
          f"(compile {compile_fwd:.1f}s, max rel diff {err:.1e}, load average {os.getloadavg()[0]:.2f})")

    if args.backward:
        loss = lambda p, x, t, c, y: jnp.mean(model.apply({"params": p}, x, t, c, y) ** 2)  # noqa: E731
        grad = jax.jit(jax.grad(loss))
        t0 = time.perf_counter()
        grad_c = grad.lower(params, x, t, ctx, y).compile()
        compile_bwd = time.perf_counter() - t0

        def torch_bwd():
            ref.zero_grad(set_to_none=True)
            ref(tx, tt, encoder_hidden_states=tc, **added).sample.pow(2).mean().backward()

        ours_b, theirs_b = _median_times([lambda: jax.block_until_ready(grad_c(params, jx, jt, jc, jy)), torch_bwd],
                                         args.reps)
        print(f"forward+backward: ours {ours_b:.3f}s  diffusers {theirs_b:.3f}s  ratio {ours_b / theirs_b:.2f}  "
              f"(compile {compile_bwd:.1f}s)")


if __name__ == "__main__":
    main()
