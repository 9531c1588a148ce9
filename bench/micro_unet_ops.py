"""Per-op CPU timing of the SD1 UNet's building blocks, ours (jax.jit) vs PyTorch, on the real SD1 shapes (batch 1).

    python3 bench/micro_unet_ops.py [--reps 3] [--only attn,conv,gn,ff]

Each row: median seconds for one call, ours / torch, and how many times the op runs in one SD1 UNet forward
(so count * time estimates its share of the forward; GroupNorm counts are approximate, the 1x1/stride-2/in/out
convs are left out). `block` times whole transformer blocks instead (they contain the attn and ff rows).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median(fn, reps: int) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="attn,conv,gn,ff", help="comma-separated subset of attn,conv,gn,ff,block")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    only = set(args.only.split(","))

    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    from ldm_jax.models import layers

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []

    def row(name, count, jfn, jargs, tfn, targs, compare=True):
        jf = jax.jit(jfn)
        jargs = [jnp.asarray(a) for a in jargs]
        targs = [torch.from_numpy(np.ascontiguousarray(a)) for a in targs]
        a = np.asarray(jf(*jargs))
        with torch.no_grad():
            b = tfn(*targs).numpy()
        err = float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30)) if compare else float("nan")
        ours = _median(lambda: jf(*jargs).block_until_ready(), args.reps)
        with torch.no_grad():
            theirs = _median(lambda: tfn(*targs), args.reps)
        rows.append((name, count, ours, theirs))
        print(f"{name:38s} x{count:2d}  ours {ours * 1e3:8.1f} ms  torch {theirs * 1e3:8.1f} ms  "
              f"ratio {ours / theirs:5.2f}  (x count: {count * ours:6.2f} s vs {count * theirs:6.2f} s, rel err {err:.1e})",
              flush=True)

    def randn(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    if "attn" in only:
        # (tokens, heads, head_dim, kv tokens, count in SD1 forward)
        for t, h, d, s, n in [(4096, 8, 40, 4096, 5), (1024, 8, 80, 1024, 5), (256, 8, 160, 256, 5),
                              (4096, 8, 40, 77, 5), (1024, 8, 80, 77, 5), (256, 8, 160, 77, 5)]:
            q, k, v = randn(1, t, h, d), randn(1, s, h, d), randn(1, s, h, d)
            tq = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731
            row(f"attention q{t} kv{s} h{h} d{d}", n, lambda q, k, v: layers.attention(q, k, v), (q, k, v),
                lambda q, k, v: F.scaled_dot_product_attention(q, k, v).transpose(1, 2), (tq(q), tq(k), tq(v)))
    if "conv" in only:
        # (spatial, cin, cout, count): the 3x3 stride-1 convs of SD1
        for hw, ci, co, n in [(64, 320, 320, 7), (64, 640, 320, 2), (64, 960, 320, 1), (64, 640, 640, 1),
                              (32, 640, 640, 6), (32, 1280, 640, 1), (32, 1280, 1280, 1), (16, 1280, 1280, 7),
                              (16, 2560, 1280, 2), (8, 1280, 1280, 11), (8, 2560, 1280, 3)]:
            x, w = randn(1, hw, hw, ci), randn(3, 3, ci, co) * 0.02
            jconv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
                x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
            row(f"conv3x3 {hw}x{hw} {ci}->{co}", n, jconv, (x, w),
                lambda x, w: F.conv2d(x, w, padding=1).permute(0, 2, 3, 1), (x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)))
    if "gn" in only:
        import flax.linen as nn
        for hw, c, n in [(64, 320, 12), (64, 640, 4), (32, 640, 12), (16, 1280, 12)]:
            x = randn(1, hw, hw, c)
            gn = nn.GroupNorm(32, epsilon=1e-5)
            p = gn.init(jax.random.key(0), x[:, :1, :1])
            row(f"groupnorm+silu {hw}x{hw}x{c}", n, lambda x: nn.silu(gn.apply(p, x)), (x,),
                lambda x: F.silu(F.group_norm(x, 32, eps=1e-5)).permute(0, 2, 3, 1), (x.transpose(0, 3, 1, 2),))
    if "ff" in only:
        for t, c, n in [(4096, 320, 5), (1024, 640, 5), (256, 1280, 5)]:
            x, w1, w2 = randn(1, t, c), randn(c, 8 * c) * 0.05, randn(4 * c, c) * 0.05

            def jff(x, w1, w2):  # in row chunks where the model's TransformerBlock chunks (layers.row_chunk_size)
                def ff(rows):
                    h, g = jnp.split(rows @ w1, 2, axis=-1)
                    return (h * jax.nn.gelu(g, approximate=False)) @ w2
                chunk = layers.row_chunk_size(x.size // x.shape[-1], w1.shape[-1])
                return layers.map_row_chunks(ff, x, chunk) if chunk else ff(x)

            def tff(x, w1, w2):
                h, g = (x @ w1).chunk(2, dim=-1)
                return (h * F.gelu(g)) @ w2
            row(f"GEGLU ff {t}x{c}", n, jff, (x, w1, w2), tff, (x, w1, w2))
    if "block" in only:  # a whole SD1 transformer block (LayerNorms, projections, self/cross attention, GEGLU)
        from diffusers.models.attention import BasicTransformerBlock

        from ldm_jax.models.unet_blocks import TransformerBlock
        for t, c, n in [(4096, 320, 5), (1024, 640, 5), (256, 1280, 5)]:
            x, ctx = randn(1, t, c), randn(1, 77, 768)
            ours = TransformerBlock(8, c // 8)
            p = ours.init(jax.random.key(0), x[:, :8], ctx)
            theirs = BasicTransformerBlock(c, 8, c // 8, cross_attention_dim=768, activation_fn="geglu").eval()
            row(f"transformer block {t}x{c} (random weights)", n, lambda x, c: ours.apply(p, x, c), (x, ctx),
                lambda x, c: theirs(x, encoder_hidden_states=c), (x, ctx), compare=False)
    ops = [r for r in rows if not r[0].startswith("transformer block")]  # blocks contain the attn/ff rows
    tot_o, tot_t = sum(n * o for _, n, o, _ in ops), sum(n * t for _, n, _, t in ops)
    print(f"total of the op rows (x count): ours {tot_o:.2f} s  torch {tot_t:.2f} s")


if __name__ == "__main__":
    main()
