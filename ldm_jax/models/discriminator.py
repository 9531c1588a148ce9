"""PatchGAN discriminator (pix2pix, Isola et al. 2017, arXiv 1611.07004) as in taming-transformers, and its losses.

`NLayerDiscriminator` is taming's `NLayerDiscriminator` (use_actnorm=False): conv4x4 s2 + LeakyReLU(0.2), then
`n_layers - 1` blocks of conv4x4 s2 (no bias) + BatchNorm + LeakyReLU, one conv4x4 s1 + BatchNorm + LeakyReLU
and a conv4x4 s1 to one logit per patch. Init follows taming's `weights_init`: conv weights N(0, 0.02),
BatchNorm scale N(1, 0.02), bias 0 (our conv biases start at 0 too; torch leaves its default uniform there).

BatchNorm, functionally: running statistics live in the `batch_stats` collection and are only used when
`train=False` (evaluation). In training the reference runs the discriminator in train mode everywhere, so every
call normalises with the statistics of the batch it is given; `apply(..., train=True, mutable=["batch_stats"])`
does the same and returns the updated running averages (torch momentum 0.1 == flax momentum 0.9). Two
deliberate differences: under `jit` on a sharded batch the statistics are those of the GLOBAL batch (like
SyncBatchNorm, not per-device BatchNorm under DDP), and the running variance is the biased one.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ldm_jax.models.layers import conv, partitioned

Dtype = Any


def _normal(mean: float, std: float):
    def init(key, shape, dtype=jnp.float32):
        return mean + std * jax.random.normal(key, shape, dtype)

    return init


class NLayerDiscriminator(nn.Module):
    """(B,H,W,in_channels) images in [-1, 1] -> (B,H',W',1) patch logits; `train` picks batch vs running stats."""

    in_channels: int = 3
    ndf: int = 64
    n_layers: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"discriminator expects NHWC images with {self.in_channels} channels, got {x.shape}")
        kw = dict(padding=1, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_normal(0.0, 0.02))
        x = x.astype(self.dtype)
        x = nn.leaky_relu(conv(self.ndf, 4, stride=2, name="conv_0", **kw)(x), 0.2)
        mult = 1
        for n in range(1, self.n_layers + 1):
            mult = min(2**n, 8)
            stride = 2 if n < self.n_layers else 1
            x = conv(self.ndf * mult, 4, stride=stride, use_bias=False, name=f"conv_{n}", **kw)(x)
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=0.9,
                epsilon=1e-5,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                scale_init=partitioned(_normal(1.0, 0.02), ("norm",)),
                bias_init=partitioned(nn.initializers.zeros_init(), ("norm",)),
                name=f"norm_{n}",
            )(x)
            x = nn.leaky_relu(x, 0.2)
        x = conv(1, 4, name=f"conv_{self.n_layers + 1}", **kw)(x)
        return x.astype(jnp.float32)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """taming `hinge_d_loss`: 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))  (Lim & Ye 2017)."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """taming `vanilla_d_loss`: 0.5 * (mean softplus(-D(x)) + mean softplus(D(x_hat)))  (Goodfellow et al. 2014)."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
