"""Image reconstruction metrics: PSNR and SSIM (Wang et al. 2004, "Image quality assessment: from error
visibility to structural similarity"), per image, NHWC, jittable.

SSIM uses the paper's settings, as tf.image.ssim and skimage (gaussian_weights=True) do: an 11x11 Gaussian
window with sigma 1.5, K1 = 0.01, K2 = 0.03, 'valid' filtering, the mean over positions and channels.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def psnr(x: jax.Array, y: jax.Array, max_val: float = 1.0) -> jax.Array:
    """Per-image PSNR in dB, 10 log10(max^2 / MSE), for NHWC batches with values in [0, max_val]."""
    mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(1, 2, 3))
    return 10.0 * jnp.log10(max_val**2 / mse)


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    g = np.exp(-0.5 * ((np.arange(size) - (size - 1) / 2.0) / sigma) ** 2)
    return (g / g.sum()).astype(np.float32)


def ssim(
    x: jax.Array, y: jax.Array, max_val: float = 1.0, *, size: int = 11, sigma: float = 1.5, k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
    """Per-image SSIM (mean over valid window positions and channels) for NHWC batches in [0, max_val]."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim takes two NHWC batches of the same shape, got {x.shape} and {y.shape}")
    if min(x.shape[1:3]) < size:
        raise ValueError(f"ssim needs images of at least {size}x{size} pixels (the window), got {x.shape[1:3]}")
    g = jnp.asarray(_gaussian_window(size, sigma))
    c = x.shape[-1]

    def blur(a: jax.Array) -> jax.Array:
        # Separable Gaussian, depthwise over channels.
        kh = jnp.tile(g.reshape(size, 1, 1, 1), (1, 1, 1, c))
        kw = jnp.tile(g.reshape(1, size, 1, 1), (1, 1, 1, c))
        dn = ("NHWC", "HWIO", "NHWC")
        hi = jax.lax.Precision.HIGHEST
        a = jax.lax.conv_general_dilated(a, kh, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c, precision=hi)
        return jax.lax.conv_general_dilated(a, kw, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c, precision=hi)

    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return jnp.mean(s, axis=(1, 2, 3))


def to_unit(x: jax.Array) -> jax.Array:
    """Images in [-1, 1] -> [0, 1], clipped (what the metrics and the PNGs see)."""
    return jnp.clip((x.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
