"""The LDM first-stage autoencoders: `AutoencoderKL` and `VQModel` (Rombach et al. 2022, arXiv 2112.10752, sec. 3.1).

The topology follows CompVis `ldm/modules/diffusionmodules/model.py` (Encoder/Decoder) and
`ldm/models/autoencoder.py`, in NHWC. Submodule names mirror the CompVis state-dict names
(`down_{level}_block_{i}` <-> `down.{level}.block.{i}`, `mid_attn_1` <-> `mid.attn_1`, ...) so that
`ldm_jax.interop.vae` converts by renaming. Attention placement is decided by the configured `resolution`
(not the input size), exactly as in CompVis: level `i` has attention when `resolution // 2**i` is in
`attn_resolutions`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from ldm_jax.models.layers import Dtype, attention, conv, dense, group_norm, maybe_remat, partitioned

# GroupNorm epsilon of every CompVis / diffusers VAE normalisation layer.
NORM_EPS = 1e-6


class ResnetBlock(nn.Module):
    """CompVis `ResnetBlock` without time embedding: x + conv(silu(norm(conv(silu(norm(x))))))."""

    out_channels: int
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(group_norm(self.norm_groups, epsilon=NORM_EPS, name="norm1", **kw)(x))
        h = conv(self.out_channels, 3, name="conv1", **kw)(h)
        h = nn.silu(group_norm(self.norm_groups, epsilon=NORM_EPS, name="norm2", **kw)(h))
        h = conv(self.out_channels, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="nin_shortcut", **kw)(x)
        return x + h


class AttnBlock(nn.Module):
    """CompVis `AttnBlock`: single-head self-attention over all H*W positions, residual."""

    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = group_norm(self.norm_groups, epsilon=NORM_EPS, name="norm", **kw)(x).reshape(b, h * w, 1, c)
        # CompVis uses 1x1 convs here; a Dense on NHWC is the same map and cheaper.
        q, k, v = (dense(c, names=("embed", "mlp"), name=n, **kw)(y) for n in ("q", "k", "v"))
        y = attention(q, k, v).reshape(b, h, w, c)
        y = dense(c, names=("mlp", "embed"), name="proj_out", **kw)(y)
        return x + y


def _downsample(x: jax.Array, conv_layer: nn.Module) -> jax.Array:
    # CompVis `Downsample(with_conv=True)`: asymmetric zero pad (right/bottom by one), 3x3 conv, stride 2.
    return conv_layer(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


def _upsample(x: jax.Array, conv_layer: nn.Module) -> jax.Array:
    # CompVis `Upsample(with_conv=True)`: nearest-neighbour x2, then a 3x3 conv.
    return conv_layer(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p, W/p, p*p*C): each p x p patch's pixels become channels (row, column, channel order)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
    """The inverse of `space_to_depth`: (B, h, w, p*p*C) -> (B, h*p, w*p, C)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c // (p * p))


class _Trunk(nn.Module):
    """Fields shared by `Encoder` and `Decoder`.

    `patch_size` p > 1 (not in CompVis / diffusers): the encoder first folds each p x p pixel patch into channels
    (`space_to_depth`) and the decoder's conv_out predicts p*p pixels per position (`depth_to_space`), so the
    trunk runs at 1/p of the image size (the downsampling factor is p * 2**(levels-1)): for small images on a
    CPU, wide convolutions at low resolution instead of narrow ones at full resolution (cf. DC-AE's
    space-to-channel shortcuts, Chen et al. 2024)."""

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    resolution: int = 256
    z_channels: int = 4
    norm_groups: int = 32
    mid_attn: bool = True
    patch_size: int = 1
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _blocks(self):
        kw = dict(norm_groups=self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype)
        res_cls = maybe_remat(ResnetBlock, self.remat_policy)
        attn_cls = maybe_remat(AttnBlock, self.remat_policy)
        return (lambda c, name: res_cls(c, name=name, **kw)), (lambda name: attn_cls(name=name, **kw))

    def _has_attn(self, level: int) -> bool:
        return self.resolution // (self.patch_size * 2**level) in tuple(self.attn_resolutions)

    def _mid(self, h: jax.Array) -> jax.Array:
        res, attn = self._blocks()
        c = self.ch * self.ch_mult[-1]
        h = res(c, "mid_block_1")(h)
        if self.mid_attn:
            h = attn("mid_attn_1")(h)
        return res(c, "mid_block_2")(h)


class Encoder(_Trunk):
    """CompVis `Encoder`: image (B,H,W,in_channels) -> moments (B,H/f,W/f,(1+double_z)*z_channels), f=2**(levels-1)."""

    in_channels: int = 3
    double_z: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res, attn = self._blocks()
        x = space_to_depth(x, self.patch_size) if self.patch_size > 1 else x
        h = conv(self.ch, 3, name="conv_in", **kw)(x.astype(self.dtype))
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = res(self.ch * mult, f"down_{level}_block_{i}")(h)
                if self._has_attn(level):
                    h = attn(f"down_{level}_attn_{i}")(h)
            if level != len(self.ch_mult) - 1:
                h = _downsample(h, conv(h.shape[-1], 3, stride=2, padding=0, name=f"down_{level}_downsample", **kw))
        h = self._mid(h)
        h = nn.silu(group_norm(self.norm_groups, epsilon=NORM_EPS, name="norm_out", **kw)(h))
        out = 2 * self.z_channels if self.double_z else self.z_channels
        return conv(out, 3, name="conv_out", **kw)(h)


class Decoder(_Trunk):
    """CompVis `Decoder`: latent (B,h,w,z_channels) -> image (B,h*f,w*f,out_ch)."""

    out_ch: int = 3

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res, attn = self._blocks()
        h = conv(self.ch * self.ch_mult[-1], 3, name="conv_in", **kw)(z.astype(self.dtype))
        h = self._mid(h)
        # CompVis numbers the up levels like the down levels (up.0 = full resolution) and runs them in reverse.
        for level in reversed(range(len(self.ch_mult))):
            for i in range(self.num_res_blocks + 1):
                h = res(self.ch * self.ch_mult[level], f"up_{level}_block_{i}")(h)
                if self._has_attn(level):
                    h = attn(f"up_{level}_attn_{i}")(h)
            if level != 0:
                h = _upsample(h, conv(h.shape[-1], 3, name=f"up_{level}_upsample", **kw))
        h = nn.silu(group_norm(self.norm_groups, epsilon=NORM_EPS, name="norm_out", **kw)(h))
        p = self.patch_size
        h = conv(self.out_ch * p * p, 3, name="conv_out", **kw)(h)
        return depth_to_space(h, p) if p > 1 else h


@struct.dataclass
class DiagonalGaussian:
    """CompVis `DiagonalGaussianDistribution` over NHWC latents (logvar clamped to [-30, 20])."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """Splits (…, 2C) moments into mean and log-variance along the channel axis (float32)."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """z = mean + std * eps, eps ~ N(0, I) (reparameterisation, Kingma & Welling 2014)."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        """The posterior mode (= mean)."""
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> jax.Array:
        """KL(self || other) summed over (H, W, C) per sample; `other=None` means N(0, I)."""
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (
                jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
            )
        return 0.5 * jnp.sum(terms, axis=(1, 2, 3))

    def nll(self, sample: jax.Array) -> jax.Array:
        """Negative log-likelihood of `sample` summed over (H, W, C) per sample."""
        terms = jnp.log(2.0 * jnp.pi) + self.logvar + jnp.square(sample - self.mean) / self.var
        return 0.5 * jnp.sum(terms, axis=(1, 2, 3))


class _Autoencoder(nn.Module):
    """Fields shared by both autoencoders (CompVis `ddconfig` names)."""

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    mid_attn: bool = True
    patch_size: int = 1
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        """Spatial factor between images and latents (f in 'kl-f8')."""
        return downsample_factor(self)

    def _trunk_kwargs(self) -> dict[str, Any]:
        if int(self.patch_size) < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        for c in {self.ch * m for m in self.ch_mult}:
            if c % self.norm_groups:
                raise ValueError(f"channel count {c} (ch {self.ch} x ch_mult) is not divisible by norm_groups {self.norm_groups}")
        return dict(
            ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
            attn_resolutions=tuple(self.attn_resolutions), resolution=self.resolution, z_channels=self.z_channels,
            norm_groups=self.norm_groups, mid_attn=self.mid_attn, patch_size=int(self.patch_size),
            remat_policy=self.remat_policy,
            dtype=self.dtype, param_dtype=self.param_dtype,
        )  # fmt: skip

    def _check_image(self, x: jax.Array) -> None:
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"expected NHWC images with {self.in_channels} channels, got shape {x.shape}")
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"image size {x.shape[1:3]} must be divisible by the downsampling factor {f}")

    def _check_latent(self, z: jax.Array, channels: int) -> None:
        if z.ndim != 4 or z.shape[-1] != channels:
            raise ValueError(f"expected NHWC latents with {channels} channels, got shape {z.shape}")


class AutoencoderKL(_Autoencoder):
    """KL-regularised autoencoder (LDM `AutoencoderKL`); images in [-1, 1], NHWC."""

    double_z: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    def setup(self):
        if not self.double_z:
            raise ValueError("AutoencoderKL needs double_z=True (the encoder predicts mean and log-variance)")
        if not self.use_quant_conv and self.embed_dim != self.z_channels:
            raise ValueError(f"without quant_conv embed_dim ({self.embed_dim}) must equal z_channels ({self.z_channels})")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(in_channels=self.in_channels, double_z=True, **self._trunk_kwargs())
        self.decoder = Decoder(out_ch=self.out_ch, **self._trunk_kwargs())
        self.quant_conv = conv(2 * self.embed_dim, 1, **kw) if self.use_quant_conv else None
        self.post_quant_conv = conv(self.z_channels, 1, **kw) if self.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Images (B,H,W,in_channels) -> posterior over latents (B,H/f,W/f,embed_dim)."""
        self._check_image(x)
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents (B,h,w,embed_dim) -> images (B,h*f,w*f,out_ch) in float32."""
        self._check_latent(z, self.embed_dim)
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def encode_latent(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Images -> latents in float32: a posterior sample with `key`, else its mode (LDM `encode(x).sample()`)."""
        posterior = self.encode(x)
        return (posterior.mode() if key is None else posterior.sample(key)).astype(jnp.float32)

    def decode_latent(self, z: jax.Array) -> jax.Array:
        """Latents -> images (the same as `decode`; the VQ model snaps to its codebook here)."""
        return self.decode(z)

    def latent_moments(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mean, std) of the latents of `x` in float32: `encode_latent(x, key)` = mean + std·N(0, 1)."""
        posterior = self.encode(x)
        return posterior.mean.astype(jnp.float32), posterior.std.astype(jnp.float32)

    def __call__(
        self, x: jax.Array, *, key: jax.Array | None = None, sample_posterior: bool = True
    ) -> tuple[jax.Array, DiagonalGaussian]:
        """Reconstruction from a posterior sample (or its mode) and the posterior."""
        if sample_posterior and key is None:
            raise ValueError("sample_posterior=True needs a PRNG key (key=...); pass sample_posterior=False for the mode")
        posterior = self.encode(x)
        z = posterior.sample(key) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class VectorQuantizer(nn.Module):
    """taming `VectorQuantizer2` (van den Oord et al. 2017, arXiv 1711.00937): nearest codebook entry,
    straight-through gradients, loss = ||sg[zq] - z||^2 + beta ||zq - sg[z]||^2 (legacy) or the beta on the
    first term (legacy=False)."""

    n_embed: int
    embed_dim: int
    beta: float = 0.25
    legacy: bool = True
    param_dtype: Dtype = jnp.float32

    def setup(self):
        bound = 1.0 / self.n_embed
        init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
        self.embedding = self.param(
            "embedding", partitioned(init, ("vocab", "table")), (self.n_embed, self.embed_dim), self.param_dtype
        )

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Codebook vectors for integer `indices` (any shape) -> indices.shape + (embed_dim,), float32."""
        return jnp.take(jnp.asarray(self.embedding, jnp.float32), indices, axis=0)

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """z (B,h,w,embed_dim) -> (quantised z with straight-through gradient, codebook loss, indices (B,h,w))."""
        z = z.astype(jnp.float32)
        e = jnp.asarray(self.embedding, jnp.float32)
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, as in the reference (one matmul instead of a (N, K, D) tensor).
        d = (
            jnp.sum(jnp.square(z), axis=-1, keepdims=True)
            + jnp.sum(jnp.square(e), axis=-1)
            - 2.0 * jnp.einsum("bhwd,kd->bhwk", z, e, precision=jax.lax.Precision.HIGHEST)
        )
        indices = jnp.argmin(d, axis=-1).astype(jnp.int32)
        zq = self.lookup(indices)
        commit = jnp.mean(jnp.square(jax.lax.stop_gradient(zq) - z))
        codebook = jnp.mean(jnp.square(zq - jax.lax.stop_gradient(z)))
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook
        zq = z + jax.lax.stop_gradient(zq - z)
        return zq, loss, indices


class VQModel(_Autoencoder):
    """Vector-quantised autoencoder (LDM `VQModel`); images in [-1, 1], NHWC."""

    z_channels: int = 3
    embed_dim: int = 3
    n_embed: int = 8192
    beta: float = 0.25
    legacy: bool = True

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(in_channels=self.in_channels, double_z=False, **self._trunk_kwargs())
        self.decoder = Decoder(out_ch=self.out_ch, **self._trunk_kwargs())
        self.quant_conv = conv(self.embed_dim, 1, **kw)
        self.post_quant_conv = conv(self.z_channels, 1, **kw)
        self.quantize = VectorQuantizer(self.n_embed, self.embed_dim, self.beta, self.legacy, self.param_dtype)

    def encode_latent(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Images -> pre-quantisation latents (B,H/f,W/f,embed_dim), float32 (LDM `VQModelInterface.encode`, what a
        latent diffusion model trains on); `key` is unused (the same call as `AutoencoderKL.encode_latent`)."""
        del key
        self._check_image(x)
        return self.quant_conv(self.encoder(x)).astype(jnp.float32)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Images -> (quantised latents, codebook loss, indices (B,h,w) int32)."""
        return self.quantize(self.encode_latent(x))

    def decode(self, quant: jax.Array, *, quantize: bool = False) -> jax.Array:
        """Latents (B,h,w,embed_dim) -> images; `quantize=True` snaps them to the codebook first (LDM's
        `VQModelInterface.decode`, what a latent diffusion model's samples go through)."""
        self._check_latent(quant, self.embed_dim)
        if quantize:
            quant = self.quantize(quant)[0]
        return self.decoder(self.post_quant_conv(quant.astype(self.dtype))).astype(jnp.float32)

    def decode_latent(self, z: jax.Array) -> jax.Array:
        """Latents -> images through the codebook (LDM `VQModelInterface.decode`: a diffusion sample is snapped)."""
        return self.decode(z, quantize=True)

    def latent_moments(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(latents, zeros): a VQ encoding is deterministic (the same call as `AutoencoderKL.latent_moments`)."""
        z = self.encode_latent(x)
        return z, jnp.zeros_like(z)

    def decode_code(self, indices: jax.Array) -> jax.Array:
        """Integer codes (B,h,w) -> images."""
        if indices.ndim != 3:
            raise ValueError(f"expected code indices of shape (B, h, w), got {indices.shape}")
        return self.decode(self.quantize.lookup(indices))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(reconstruction, codebook loss, indices)."""
        quant, loss, indices = self.encode(x)
        return self.decode(quant), loss, indices


_KL_F8 = dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(), z_channels=4, embed_dim=4)

# CompVis `models/first_stage_models/*/config.yaml` (resolution 256) plus small presets for tests / CPU runs.
VAE_PRESETS: dict[str, dict[str, Any]] = {
    "kl-f8": dict(_KL_F8),  # Stable Diffusion v1/v2
    "kl-f4": dict(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=(), z_channels=3, embed_dim=3),
    "kl-f16": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=16, embed_dim=16),
    "vq-f4": dict(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=(), z_channels=3, embed_dim=3, n_embed=8192),
    "vq-f8": dict(
        ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(32,), z_channels=4, embed_dim=4, n_embed=16384
    ),
    # 32x32 images -> 8x8x4 latents; ~0.95M parameters.
    "tiny": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), resolution=32, z_channels=4, embed_dim=4),
    "vq-tiny": dict(
        ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), resolution=32, z_channels=4, embed_dim=4,
        n_embed=256,
    ),
}  # fmt: skip


def downsample_factor(kwargs_or_module: Any) -> int:
    """Spatial factor between images and latents of an autoencoder or its kwargs: patch_size * 2**(levels-1)."""
    get = (lambda k, d=None: getattr(kwargs_or_module, k, d)) if isinstance(kwargs_or_module, nn.Module) \
        else kwargs_or_module.get
    return int(get("patch_size", 1) or 1) * 2 ** (len(get("ch_mult")) - 1)


def round_trip(module: AutoencoderKL | VQModel, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """`decode_latent(encode_latent(x, key))`: a reconstruction through the latent interface (use as
    `model.apply(variables, x, method=round_trip)`; `model.init(key, x, method=round_trip)` creates every parameter)."""
    return module.decode_latent(module.encode_latent(x, key))


def autoencoder_class(kwargs: dict[str, Any]) -> type[nn.Module]:
    """`VQModel` for kwargs with a codebook (`n_embed`), else `AutoencoderKL`."""
    return VQModel if "n_embed" in kwargs else AutoencoderKL


def build_autoencoder(preset_or_kwargs: str | dict[str, Any], **overrides: Any) -> nn.Module:
    """An autoencoder from a `VAE_PRESETS` name or a kwargs dict, with field overrides (dtype, remat_policy, ...)."""
    if isinstance(preset_or_kwargs, str):
        if preset_or_kwargs not in VAE_PRESETS:
            raise KeyError(f"unknown autoencoder preset {preset_or_kwargs!r}; choose one of {sorted(VAE_PRESETS)}")
        preset_or_kwargs = VAE_PRESETS[preset_or_kwargs]
    kwargs = {**preset_or_kwargs, **overrides}
    return autoencoder_class(kwargs)(**kwargs)
