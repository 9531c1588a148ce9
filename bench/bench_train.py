"""Training-step speed on CPU: our jitted LDM UNet step vs diffusers' PyTorch UNet2DConditionModel step.

    python3 bench/bench_train.py [--batch 4] [--size 32] [--channels 64] [--steps 10] [--reps 3]

Both sides run the same denoising step on given latents and text context: draw t and ε, form
z_t = sqrt(ᾱ_t)·z + sqrt(1−ᾱ_t)·ε, predict ε with the UNet (same architecture: our kwargs converted
with `ldm_jax.interop.unet.config_to_diffusers`), MSE, backward, AdamW with global-norm clipping.
Ours is `ldm_jax.training.loop`'s step machinery minus the frozen first stage (jit, donated state).
Timings alternate the two --reps times and keep the fastest mean step of each; the CPU is shared with
other work, so absolute numbers are noisy — the ratio measured in the same run is the result.
ratio = torch step time / our step time (> 1: ours is faster). Compile time = first call minus a step.
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
import optax  # noqa: E402

from ldm_jax.diffusion import losses, schedules  # noqa: E402
from ldm_jax.models.unet import UNet  # noqa: E402


def unet_kwargs(channels: int, context_dim: int) -> dict:
    return dict(in_channels=4, out_channels=4, model_channels=channels, channel_mult=(1, 2, 2), num_res_blocks=1,
                attention_resolutions=(2, 4), num_heads=-1, num_head_channels=32, transformer_depth=1,
                context_dim=context_dim)


def make_ours(kw, batch, size, context_len, context_dim, ab):
    model = UNet(**kw)
    z = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 4)), jnp.float32)
    ctx = jnp.asarray(np.random.default_rng(1).normal(size=(batch, context_len, context_dim)), jnp.float32)
    params = model.init(jax.random.key(0), z[:1], jnp.zeros((1,), jnp.int32), ctx[:1])["params"]
    params = jax.tree_util.tree_map(lambda x: x.value if hasattr(x, "value") else x, params,
                                    is_leaf=lambda x: hasattr(x, "value"))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=0.01))
    ab = jnp.asarray(ab, jnp.float32)

    def step(state, z, ctx, key):
        params, opt = state
        kt, kn = jax.random.split(key)
        t = jax.random.randint(kt, (z.shape[0],), 0, ab.shape[0])
        noise = jax.random.normal(kn, z.shape)

        def loss_fn(p):
            out = model.apply({"params": p}, losses.q_sample(z, noise, t, ab), t, ctx)
            return jnp.mean(jnp.square(out - noise))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, upd), opt), loss

    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    return jax.jit(step, donate_argnums=(0,)), (params, tx.init(params)), z, ctx, n_params


def make_torch(kw, batch, size, context_len, context_dim, ab, threads):
    import torch
    from diffusers import UNet2DConditionModel

    from ldm_jax.interop.unet import config_to_diffusers

    torch.set_num_threads(threads)
    cfg = {k: v for k, v in config_to_diffusers(kw).items() if not k.startswith("_")}
    model = UNet2DConditionModel(**cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    z = torch.randn(batch, 4, size, size)
    ctx = torch.randn(batch, context_len, context_dim)
    ab = torch.tensor(ab, dtype=torch.float32)

    def step():
        t = torch.randint(0, ab.shape[0], (batch,))
        noise = torch.randn_like(z)
        a = ab[t].view(-1, 1, 1, 1)
        out = model(a.sqrt() * z + (1 - a).sqrt() * noise, t, encoder_hidden_states=ctx).sample
        loss = torch.nn.functional.mse_loss(out, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    return step, sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=32, help="latent side")
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--context-dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="steps per timing")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    kw = unet_kwargs(a.channels, a.context_dim)
    ab = schedules.alphas_cumprod(schedules.make_betas("linear", 1000))
    step, state, z, ctx, n_ours = make_ours(kw, a.batch, a.size, 77, a.context_dim, ab)
    t0 = time.perf_counter()
    state, loss = step(state, z, ctx, jax.random.key(0))
    jax.block_until_ready(loss)
    first = time.perf_counter() - t0
    torch_step, n_torch = make_torch(kw, a.batch, a.size, 77, a.context_dim, ab, a.threads)
    assert n_ours == n_torch, (n_ours, n_torch)
    torch_step()  # warm-up
    ours_best, torch_best = float("inf"), float("inf")
    for rep in range(a.reps):
        t0 = time.perf_counter()
        for i in range(a.steps):
            state, loss = step(state, z, ctx, jax.random.key(rep * 1000 + i))
        jax.block_until_ready(loss)
        ours_best = min(ours_best, (time.perf_counter() - t0) / a.steps)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            torch_step()
        torch_best = min(torch_best, (time.perf_counter() - t0) / a.steps)
    print(f"UNet {n_ours:,} params, batch {a.batch}, latents {a.size}x{a.size}x4, context 77x{a.context_dim}, "
          f"{a.threads} threads")
    print(f"ours (JAX jit):     {ours_best * 1e3:8.1f} ms/step  {a.batch / ours_best:7.1f} img/s  "
          f"compile {max(first - ours_best, 0):.1f} s")
    print(f"diffusers (torch):  {torch_best * 1e3:8.1f} ms/step  {a.batch / torch_best:7.1f} img/s")
    print(f"ratio torch/ours:   {torch_best / ours_best:.2f}x")


if __name__ == "__main__":
    main()
