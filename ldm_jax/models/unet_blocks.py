"""Blocks of the LDM "openaimodel" UNet (Rombach et al. 2022, arXiv 2112.10752), NHWC.

Parameter names follow diffusers' `UNet2DConditionModel` (norm1/conv1/time_emb_proj/..., to_q/to_k/to_v/to_out,
ff_proj/ff_out) so the converters in `ldm_jax.interop.unet` are a renaming plus layout transposes.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from ldm_jax.models import layers

Dtype = layers.Dtype
# openaimodel zero-initialises the last layer of every residual branch (`zero_module`), so each block starts as
# the identity; we do the same for models trained from scratch (loaded weights replace it).
ZEROS = nn.initializers.zeros_init()


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [cos | sin] of (B,) timesteps, as diffusers with flip_sin_to_cos=True, freq_shift=0.

    freqs_i = exp(-log(max_period) * i / half) (Ho et al. 2020 / openaimodel `timestep_embedding`); float32.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def coordinate_features(height: int, width: int, frequencies: int) -> jax.Array:
    """(H, W, 4 * frequencies) Fourier features [sin | cos] (pi 2^k y, pi 2^k x), k < frequencies, of each pixel center.

    y and x run over [-1, 1] (the image's relative position, so a feature means the same place at any
    resolution). Added after conv_in they give a convolutional UNet the absolute position that its zero
    padding only hints at (CoordConv, Liu et al. 2018; DiT / U-ViT add position embeddings the same way).
    """
    ys = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height * 2 - 1
    xs = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width * 2 - 1
    scale = jnp.pi * 2.0 ** jnp.arange(frequencies, dtype=jnp.float32)
    y = jnp.broadcast_to(ys[:, None, None] * scale, (height, width, frequencies))
    x = jnp.broadcast_to(xs[None, :, None] * scale, (height, width, frequencies))
    return jnp.concatenate([jnp.sin(y), jnp.cos(y), jnp.sin(x), jnp.cos(x)], axis=-1)


def micro_conditioning(pooled: jax.Array, ids: jax.Array, dim: int = 256) -> jax.Array:
    """SDXL's added-conditioning vector (Podell et al. 2023, arXiv 2307.01952, sec. 2.2): [pooled | F(ids)].

    `ids` (B, n) are the micro-conditioning numbers (base: original h, w, crop top, left, target h, w;
    refiner: original h, w, crop top, left, aesthetic score); each gets a `dim`-wide sinusoidal embedding
    (diffusers' `add_time_proj`, SGM's `ConcatTimestepEmbedderND`), flattened after the pooled text embedding.
    """
    ids = jnp.asarray(ids, jnp.float32)
    fourier = timestep_embedding(ids.reshape(-1), dim).reshape(ids.shape[0], ids.shape[1] * dim)  # n = 0: none
    return jnp.concatenate([jnp.asarray(pooled, jnp.float32), fourier], axis=-1)


def upsample_nearest(x: jax.Array) -> jax.Array:
    """2x nearest-neighbour upsampling of an NHWC tensor (a broadcast, no gather)."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


def downsample_avg(x: jax.Array) -> jax.Array:
    """2x2 average pooling with stride 2 (openaimodel `Downsample(use_conv=False)`)."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class _Resample(nn.Module):
    """A 2x resampling with an optional 3x3 conv named "conv" (the fields Downsample and Upsample share)."""

    channels: int
    use_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _conv(self, x: jax.Array, stride: int = 1) -> jax.Array:
        return layers.conv(self.channels, 3, stride=stride, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="conv")(x)


class Downsample(_Resample):
    """Stride-2 3x3 conv (padding 1), or 2x2 average pooling when `use_conv` is off."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self._conv(x, stride=2) if self.use_conv else downsample_avg(x)


class Upsample(_Resample):
    """Nearest 2x upsampling followed by a 3x3 conv (when `use_conv`)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = upsample_nearest(x)
        return self._conv(x) if self.use_conv else x


class ResBlock(nn.Module):
    """openaimodel ResBlock == diffusers ResnetBlock2D: GN-SiLU-conv, + time embedding (add or scale-shift), GN-SiLU-conv.

    `up`/`down` resample inside the block (BigGAN-style `resblock_updown`).
    """

    out_channels: int
    use_scale_shift_norm: bool = False
    up: bool = False
    down: bool = False
    dropout: float = 0.0
    norm_eps: float = 1e-5
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(layers.group_norm(self.norm_groups, epsilon=self.norm_eps, name="norm1", **kw)(x))
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h, x = downsample_avg(h), downsample_avg(x)
        h = layers.conv(self.out_channels, 3, name="conv1", **kw)(h)
        t = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        t = layers.dense(t, name="time_emb_proj", **kw)(nn.silu(emb))[:, None, None, :]
        norm2 = layers.group_norm(self.norm_groups, epsilon=self.norm_eps, name="norm2", **kw)
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(t, 2, axis=-1)
            h = norm2(h) * (1 + scale) + shift
        else:
            h = norm2(h + t)
        h = nn.silu(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = layers.conv(self.out_channels, 3, kernel_init=ZEROS, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = layers.conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        return x + h


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (`context` None -> self-attention)."""

    heads: int
    head_dim: int
    qkv_bias: bool = False
    zero_out: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        context = x if context is None else context
        inner = self.heads * self.head_dim
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.head_dim)  # noqa: E731
        q = split(layers.dense(inner, use_bias=self.qkv_bias, name="to_q", **kw)(x))
        k = split(layers.dense(inner, use_bias=self.qkv_bias, name="to_k", **kw)(context))
        v = split(layers.dense(inner, use_bias=self.qkv_bias, name="to_v", **kw)(context))
        out = layers.attention(q, k, v).reshape(*x.shape[:-1], inner)
        init = ZEROS if self.zero_out else layers.torch_default_kernel_init
        return layers.dense(x.shape[-1], names=("mlp", "embed"), kernel_init=init, name="to_out", **kw)(out)


class TransformerBlock(nn.Module):
    """LDM BasicTransformerBlock: self-attn, cross-attn, GEGLU feed-forward (Shazeer 2020), pre-LayerNorm."""

    heads: int
    head_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        attn = lambda name: Attention(self.heads, self.head_dim, name=name, **kw)  # noqa: E731
        x = x + attn("attn1")(layers.layer_norm(name="norm1", **kw)(x))
        x = x + attn("attn2")(layers.layer_norm(name="norm2", **kw)(x), context)
        norm3 = layers.layer_norm(name="norm3", **kw)
        ff_proj = layers.dense(8 * dim, name="ff_proj", **kw)
        ff_out = layers.dense(dim, names=("mlp", "embed"), name="ff_out", **kw)
        chunk = layers.row_chunk_size(x.size // dim, 8 * dim)
        if chunk and not train and not self.is_initializing():
            # inference: norm3 + feed-forward + residual on chunks of tokens (cache-friendly on CPU; see
            # layers.ROW_CHUNK; equal up to float32 rounding); training keeps whole matmuls (and dropout)
            mods = [(m.clone(parent=None), m.variables) for m in (norm3, ff_proj, ff_out)]
            (n3, p3), (proj, p_proj), (out, p_out) = mods

            def ff(rows: jax.Array) -> jax.Array:
                a, g = jnp.split(proj.apply(p_proj, n3.apply(p3, rows)), 2, axis=-1)
                return rows + out.apply(p_out, a * nn.gelu(g, approximate=False))

            return layers.map_row_chunks(ff, x, chunk)
        h = norm3(x)
        h, gate = jnp.split(ff_proj(h), 2, axis=-1)
        h = h * nn.gelu(gate, approximate=False)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return x + ff_out(h)


class SpatialTransformer(nn.Module):
    """LDM SpatialTransformer / diffusers Transformer2DModel: GN(eps 1e-6), proj_in, `depth` blocks, proj_out, residual.

    proj_in/proj_out are 1x1 convs (SD1) or Linear layers (SD2, `use_linear`); both act on channels only, so
    they are Dense layers here and the flag only changes the checkpoint layout (see interop.unet).
    """

    heads: int
    head_dim: int
    depth: int = 1
    dropout: float = 0.0
    remat_policy: str = "none"
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hgt, wid, c = x.shape
        inner = self.heads * self.head_dim
        h = layers.group_norm(self.norm_groups, epsilon=1e-6, name="norm", **kw)(x).reshape(b, hgt * wid, c)
        h = layers.dense(inner, name="proj_in", **kw)(h)
        block = layers.maybe_remat(TransformerBlock, self.remat_policy, static_argnums=(3,))
        for i in range(self.depth):
            h = block(self.heads, self.head_dim, self.dropout, name=f"transformer_blocks_{i}", **kw)(h, context, train)
        h = layers.dense(c, names=("mlp", "embed"), kernel_init=ZEROS, name="proj_out", **kw)(h)
        return x + h.reshape(b, hgt, wid, c)


class AttentionBlock(nn.Module):
    """openaimodel AttentionBlock (unconditional LDMs): GN, self-attention over pixels with biased q/k/v, residual."""

    heads: int
    norm_eps: float = 1e-5
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, train: bool = False) -> jax.Array:
        del context, train  # same call signature as SpatialTransformer
        b, hgt, wid, c = x.shape
        h = layers.group_norm(self.norm_groups, epsilon=self.norm_eps, name="group_norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        h = Attention(self.heads, c // self.heads, qkv_bias=True, zero_out=True, dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(
            h.reshape(b, hgt * wid, c)
        )
        return x + h.reshape(b, hgt, wid, c)
