"""LPIPS perceptual distance (Zhang et al. 2018, arXiv 1801.03924) with the VGG16 trunk, in Flax.

Matches the `lpips` package (v0.1, net='vgg'), which is also what LDM's `LPIPSWithDiscriminator` uses:
  x -> (x - shift) / scale                       (ScalingLayer; inputs in [-1, 1])
  -> torchvision vgg16 `features`, tapped after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
  -> unit-normalise each feature over channels:  f / (||f||_2 + 1e-10)
  -> squared difference, 1x1 conv to one channel without bias (the learned heads lin0..lin4)
  -> spatial mean, summed over the five layers.
The weights cannot be downloaded here; `ldm_jax.interop.lpips` converts the files a user has.
Parameter names follow torchvision's indices (`features_0` is `features.0`) so conversion is a rename.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from ldm_jax.models.layers import conv

Dtype = Any

# torchvision vgg16 (configuration "D"): conv widths, "M" = 2x2 max-pool. Index = position in `features`.
VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# `features` indices of the ReLUs whose outputs LPIPS taps (the lpips package's slice ends minus one).
LPIPS_TAPS: tuple[int, ...] = (3, 8, 15, 22, 29)
LPIPS_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def vgg16_conv_indices() -> list[int]:
    """The `features` indices of torchvision vgg16's 13 convolutions (0, 2, 5, ...)."""
    idx, out = 0, []
    for item in VGG16_CFG:
        if item == "M":
            idx += 1
        else:
            out.append(idx)
            idx += 2  # conv + ReLU
    return out


class VGG16Features(nn.Module):
    """torchvision's vgg16 `features` up to relu5_3, returning the activations at `taps` (NHWC)."""

    taps: Sequence[int] = LPIPS_TAPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        outs, idx = [], 0
        for item in VGG16_CFG:
            if idx > max(self.taps):
                break
            if item == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))  # floor, like torch's MaxPool2d(2, 2)
                idx += 1
                continue
            x = conv(item, 3, padding=1, dtype=self.dtype, param_dtype=self.param_dtype, name=f"features_{idx}")(x)
            x = nn.relu(x)
            if idx + 1 in self.taps:
                outs.append(x)
            idx += 2
        return outs


def _unit_normalize(f: jax.Array, eps: float = 1e-10) -> jax.Array:
    # lpips.normalize_tensor: eps is added to the norm, not inside the sqrt.
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
    """LPIPS(x0, x1) -> (B,) distances for NHWC images in [-1, 1]; `per_layer=True` also returns the 5 terms.

    Computed in float32 whatever `dtype` says for the convolutions: the distance is a sum of small
    squared differences of unit vectors, which bf16 would mostly round away.
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x0: jax.Array, x1: jax.Array, per_layer: bool = False):
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
            raise ValueError(f"LPIPS takes two NHWC RGB batches of the same shape, got {x0.shape} and {x1.shape}")
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        b = x0.shape[0]
        # One trunk pass over both images (same weights, twice the batch).
        x = (jnp.concatenate([x0, x1], axis=0).astype(jnp.float32) - shift) / scale
        feats = VGG16Features(dtype=self.dtype, param_dtype=self.param_dtype, name="net")(x.astype(self.dtype))
        terms = []
        for k, f in enumerate(feats):
            f = _unit_normalize(f.astype(jnp.float32))
            diff = (f[:b] - f[b:]) ** 2
            head = conv(1, 1, padding=0, use_bias=False, param_dtype=self.param_dtype, name=f"lin{k}")
            terms.append(jnp.mean(head(diff), axis=(1, 2, 3)))
        total = sum(terms)
        return (total, jnp.stack(terms, axis=0)) if per_layer else total
