"""The FID InceptionV3 (Szegedy et al. 2016, arXiv 1512.00567) in Flax linen: 2048-d pool3 features.

This is the network of TensorFlow's original FID code (Heusel et al. 2017, arXiv 1706.08500) with the
`inception-2015-12-05` weights, as pytorch-fid ports it (`pt_inception-2015-12-05-6726825d.pth`) and
clean-fid uses it. It differs from torchvision's `inception_v3` where pytorch-fid patches it:
  * FIDInceptionA / FIDInceptionC / FIDInceptionE_1 average-pool without counting the zero padding
    (TensorFlow's `avg_pool`), FIDInceptionE_2 (Mixed_7c) max-pools its pool branch;
  * 1008 output classes (unused here: features stop at the global average pool).
Every convolution is BasicConv2d: conv (no bias) -> BatchNorm (eps 1e-3, inference statistics) -> ReLU.

Parameter paths mirror the torch state dict (`Mixed_5b.branch1x1.conv.weight` <-> `Mixed_5b/branch1x1/conv/kernel`,
`bn.weight|bias|running_mean|running_var` <-> `bn/scale|bias|mean|var`), see `ldm_jax.interop.inception`.
Input: NHWC float in [-1, 1], normally 299x299 (`ldm_jax.evaluation.features` does the reference resize).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any
Pad = tuple[tuple[int, int], tuple[int, int]]

FEATURE_DIM = 2048
BN_EPS = 1e-3


def _pad(padding: int | tuple[int, int]) -> Pad:
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return ((ph, ph), (pw, pw))


class BasicConv2d(nn.Module):
    """conv (bias-free) -> BatchNorm with stored statistics -> ReLU."""

    features: int
    kernel: int | tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0
    dtype: Dtype = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = (self.kernel, self.kernel) if isinstance(self.kernel, int) else tuple(self.kernel)
        x = nn.Conv(self.features, k, strides=(self.stride, self.stride), padding=_pad(self.padding), use_bias=False,
                    dtype=self.dtype, precision=self.precision, name="conv")(x)
        bn = _BatchNormParams(self.features, name="bn")
        scale, bias, mean, var = bn()
        inv = scale * jax.lax.rsqrt(var + BN_EPS)
        return nn.relu(x * inv.astype(x.dtype) + (bias - mean * inv).astype(x.dtype))


class _BatchNormParams(nn.Module):
    """The four BatchNorm tensors as plain parameters (a frozen feature extractor keeps no batch statistics)."""

    features: int

    @nn.compact
    def __call__(self) -> tuple[jax.Array, ...]:
        c = (self.features,)
        return (self.param("scale", nn.initializers.ones_init(), c), self.param("bias", nn.initializers.zeros_init(), c),
                self.param("mean", nn.initializers.zeros_init(), c), self.param("var", nn.initializers.ones_init(), c))


def _avg_pool_same(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool that ignores the zero padding (TensorFlow's, FID blocks)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x: jax.Array, stride: int = 2, padding: int = 0) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=_pad(padding))


class _Block(nn.Module):
    """Base for the mixed blocks: `conv(name, features, kernel, ...)` makes a named BasicConv2d."""

    dtype: Dtype = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    def conv(self, name: str, features: int, kernel: int | tuple[int, int], stride: int = 1,
             padding: int | tuple[int, int] = 0) -> BasicConv2d:
        return BasicConv2d(features, kernel, stride, padding, self.dtype, self.precision, name=name)


class InceptionA(_Block):
    """Mixed_5b/5c/5d (FIDInceptionA)."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv("branch1x1", 64, 1)(x)
        b5 = self.conv("branch5x5_2", 64, 5, padding=2)(self.conv("branch5x5_1", 48, 1)(x))
        b3 = self.conv("branch3x3dbl_1", 64, 1)(x)
        b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3))
        bp = self.conv("branch_pool", self.pool_features, 1)(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """Mixed_6a: the 35 -> 17 grid reduction."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv("branch3x3", 384, 3, stride=2)(x)
        bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(self.conv("branch3x3dbl_1", 64, 1)(x))
        bd = self.conv("branch3x3dbl_3", 96, 3, stride=2)(bd)
        return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(_Block):
    """Mixed_6b..6e (FIDInceptionC): factorised 7x7 convolutions."""

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.channels_7x7
        b1 = self.conv("branch1x1", 192, 1)(x)
        b7 = self.conv("branch7x7_1", c, 1)(x)
        b7 = self.conv("branch7x7_2", c, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
        bd = self.conv("branch7x7dbl_1", c, 1)(x)
        for i, (feat, k, p) in enumerate([(c, (7, 1), (3, 0)), (c, (1, 7), (0, 3)), (c, (7, 1), (3, 0)),
                                          (192, (1, 7), (0, 3))], start=2):
            bd = self.conv(f"branch7x7dbl_{i}", feat, k, padding=p)(bd)
        bp = self.conv("branch_pool", 192, 1)(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """Mixed_7a: the 17 -> 8 grid reduction."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv("branch3x3_2", 320, 3, stride=2)(self.conv("branch3x3_1", 192, 1)(x))
        b7 = self.conv("branch7x7x3_1", 192, 1)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, 3, stride=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(_Block):
    """Mixed_7b (FIDInceptionE_1, average pool) and Mixed_7c (FIDInceptionE_2, max pool)."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv("branch1x1", 320, 1)(x)
        b3 = self.conv("branch3x3_1", 384, 1)(x)
        b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                              self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], axis=-1)
        bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(self.conv("branch3x3dbl_1", 448, 1)(x))
        bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                              self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], axis=-1)
        pooled = _max_pool(x, stride=1, padding=1) if self.max_pool else _avg_pool_same(x)
        bp = self.conv("branch_pool", 192, 1)(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


# (name, block class, keyword arguments) in forward order after the stem.
MIXED: Sequence[tuple[str, type[_Block], dict[str, Any]]] = (
    ("Mixed_5b", InceptionA, dict(pool_features=32)),
    ("Mixed_5c", InceptionA, dict(pool_features=64)),
    ("Mixed_5d", InceptionA, dict(pool_features=64)),
    ("Mixed_6a", InceptionB, {}),
    ("Mixed_6b", InceptionC, dict(channels_7x7=128)),
    ("Mixed_6c", InceptionC, dict(channels_7x7=160)),
    ("Mixed_6d", InceptionC, dict(channels_7x7=160)),
    ("Mixed_6e", InceptionC, dict(channels_7x7=192)),
    ("Mixed_7a", InceptionD, {}),
    ("Mixed_7b", InceptionE, dict(max_pool=False)),
    ("Mixed_7c", InceptionE, dict(max_pool=True)),
)


class FIDInceptionV3(nn.Module):
    """(B, H, W, 3) in [-1, 1] -> (B, 2048) pool3 features (pytorch-fid's InceptionV3 block 3)."""

    dtype: Dtype = jnp.float32
    # FID numbers are compared across papers: full float32 matmuls/convs unless the caller opts out.
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"FIDInceptionV3 takes NHWC RGB images, got shape {x.shape}")
        kw = dict(dtype=self.dtype, precision=self.precision)
        x = x.astype(self.dtype)
        x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3", **kw)(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3", **kw)(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3", **kw)(x)
        x = _max_pool(x)
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1", **kw)(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3", **kw)(x)
        x = _max_pool(x)
        for name, cls, extra in MIXED:
            x = cls(name=name, **kw, **extra)(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
