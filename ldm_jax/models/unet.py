"""The LDM / Stable Diffusion UNet ("openaimodel" topology, Rombach et al. 2022, arXiv 2112.10752), NHWC Flax linen.

Conditioning modes: cross-attention on `context` (text), class labels `y` added to the time embedding
(`num_classes`), a float vector `y` (B, adm_in_channels) projected by a two-layer MLP and added to the
time embedding (SDXL's pooled text + micro-conditioning, SGM's `label_emb` / diffusers' `add_embedding`
with `addition_embed_type="text_time"`; build it with `UNet.added_cond`), concatenated inputs (the
caller concatenates channels; `in_channels` counts them), none.
`use_spatial_transformer=False` gives the unconditional LDMs' plain self-attention blocks.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from ldm_jax.models import layers
from ldm_jax.models.unet_blocks import (
    AttentionBlock,
    Downsample,
    ResBlock,
    SpatialTransformer,
    Upsample,
    coordinate_features,
    micro_conditioning,
    timestep_embedding,
)

Dtype = layers.Dtype

_SD1 = dict(
    in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
    attention_resolutions=(4, 2, 1), num_heads=8, transformer_depth=1, context_dim=768,
)
# Presets are kwargs of `UNet` (LDM paper configs: configs/latent-diffusion/*.yaml, SD: v1/v2-inference.yaml).
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "sd1": _SD1,
    "sd2": {**_SD1, "num_heads": -1, "num_head_channels": 64, "context_dim": 1024, "use_linear_in_transformer": True},
    # unconditional LDM-4 on VQ-f4 latents (64x64x3): celebahq, ffhq and lsun-bedrooms share the UNet
    "ldm4-celebahq": dict(
        in_channels=3, out_channels=3, model_channels=224, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
        attention_resolutions=(8, 4, 2), num_heads=-1, num_head_channels=32, use_spatial_transformer=False,
    ),
    "ldm8-lsun-churches": dict(
        in_channels=4, out_channels=4, model_channels=192, channel_mult=(1, 2, 2, 4, 4), num_res_blocks=2,
        attention_resolutions=(1, 2, 4, 8), num_heads=8, use_scale_shift_norm=True, resblock_updown=True,
        use_spatial_transformer=False,
    ),
    # class-conditional ImageNet: the class embedding (ClassEmbedder 1000 -> 512) is a separate cond stage whose
    # output is the cross-attention context. "ldm-cin256-v2" is the released checkpoint's config (VQ-f8 latents,
    # 32x32x4, models/ldm/cin256-v2/config.yaml); "ldm4-cin256" the paper's LDM-4 (VQ-f4, ch 192, mult 1,2,3,5).
    "ldm-cin256-v2": dict(
        in_channels=4, out_channels=4, model_channels=256, channel_mult=(1, 2, 4), num_res_blocks=2,
        attention_resolutions=(4, 2, 1), num_heads=-1, num_head_channels=32, transformer_depth=1, context_dim=512,
    ),
    "ldm4-cin256": dict(
        in_channels=3, out_channels=3, model_channels=192, channel_mult=(1, 2, 3, 5), num_res_blocks=2,
        attention_resolutions=(8, 4, 2), num_heads=-1, num_head_channels=32, transformer_depth=1, context_dim=512,
    ),
    "ldm-kl8-txt2img": {**_SD1, "context_dim": 1280},
    # SDXL (Podell et al. 2023; diffusers stable-diffusion-xl-base-1.0 / -refiner-1.0 unet/config.json)
    "sdxl-base": dict(
        in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2,
        attention_resolutions=(4, 2), num_heads=-1, num_head_channels=64, transformer_depth=(1, 2, 10),
        context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816,
    ),
    "sdxl-refiner": dict(
        in_channels=4, out_channels=4, model_channels=384, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
        attention_resolutions=(4, 2), num_heads=-1, num_head_channels=64, transformer_depth=4,
        context_dim=1280, use_linear_in_transformer=True, adm_in_channels=2560,
    ),
    # SDXL-base topology for CPU benchmarks (bench/bench_unet.py): 0.4 x width (128 base channels, 64-wide heads) and
    # reduced depth (1, 1, 2 transformer blocks instead of 1, 2, 10): 155M params, so that ours and diffusers' fp32
    # weights and gradients fit in one process of ~3 GB (the full-width 849M version: ~3.4 GB per copy, 4+ copies)
    "sdxl-small": dict(
        in_channels=4, out_channels=4, model_channels=128, channel_mult=(1, 2, 4), num_res_blocks=2,
        attention_resolutions=(4, 2), num_heads=-1, num_head_channels=64, transformer_depth=(1, 1, 2),
        context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816,
    ),
    # the SDXL structure (no attention at the top level, per-level depth, text_time conditioning) in miniature
    "sdxl-tiny": dict(
        in_channels=4, out_channels=4, model_channels=8, channel_mult=(1, 2, 4), num_res_blocks=1,
        attention_resolutions=(4, 2), num_heads=-1, num_head_channels=8, transformer_depth=(1, 1, 1),
        context_dim=32, use_linear_in_transformer=True, adm_in_channels=16 + 6 * 8, addition_time_embed_dim=8,
        norm_num_groups=4,
    ),
    # small enough to train on a CPU; text-conditioned like SD
    "tiny": dict(
        in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(2,), num_heads=-1, num_head_channels=32, transformer_depth=1, context_dim=64,
        use_linear_in_transformer=True,
    ),
}
UNET_PRESETS["ldm4-ffhq"] = dict(UNET_PRESETS["ldm4-celebahq"])
UNET_PRESETS["ldm4-lsun-bedrooms"] = dict(UNET_PRESETS["ldm4-celebahq"])


class UNet(nn.Module):
    """openaimodel UNetModel: time embedding, input blocks, middle block, output blocks with skip connections."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (4, 2, 1)  # downsampling factors at which to attend
    num_heads: int = 8  # -1 when num_head_channels gives the head width
    num_head_channels: int = -1
    transformer_depth: int | Sequence[int] = 1  # an int, or one per level
    transformer_depth_middle: int | None = None  # None: the last level's depth (SGM's default)
    context_dim: int | None = None
    use_spatial_transformer: bool = True
    use_linear_in_transformer: bool = False
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    conv_resample: bool = True
    num_classes: int | None = None
    adm_in_channels: int | None = None  # width of a float vector y added through an MLP (SDXL: 2816 / 2560)
    addition_time_embed_dim: int = 256  # Fourier width per micro-conditioning id in `added_cond` (SDXL)
    # > 0: Fourier features of each latent pixel's relative (y, x) (`coordinate_features`, this many frequencies per
    # axis), projected to model_channels and added after conv_in: absolute position for captions that name a place
    # ("at the top left"). 0 (every SD/SDXL/LDM preset): none, the original topology.
    coordinate_frequencies: int = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5  # ResBlocks and norm_out (the transformers' GroupNorm keeps LDM's 1e-6)
    dropout: float = 0.0
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def heads(self, channels: int) -> int:
        """Attention heads at a level of `channels` width (openaimodel's num_heads / num_head_channels rule)."""
        if self.num_head_channels != -1:
            if channels % self.num_head_channels:
                raise ValueError(f"{channels} channels are not divisible by num_head_channels={self.num_head_channels}")
            return channels // self.num_head_channels
        if self.num_heads < 1 or channels % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must be >= 1 and divide {channels} channels")
        return self.num_heads

    def depth(self, level: int) -> int:
        """Transformer blocks per attention layer at `level` (`level == len(channel_mult)`: the middle block)."""
        if level == len(self.channel_mult) and self.transformer_depth_middle is not None:
            return self.transformer_depth_middle
        d = self.transformer_depth
        return d if isinstance(d, int) else tuple(d)[min(level, len(self.channel_mult) - 1)]

    def example_inputs(self, batch: int = 1) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
        """Smallest valid (x, timesteps, context, y) of this UNet, for `init` / `jax.eval_shape`."""
        f = 2 ** (len(self.channel_mult) - 1)
        ctx = None if self.context_dim is None else jnp.zeros((batch, 1, self.context_dim))
        if self.adm_in_channels is not None:
            y = jnp.zeros((batch, self.adm_in_channels))
        else:
            y = None if self.num_classes is None else jnp.zeros((batch,), jnp.int32)
        return jnp.zeros((batch, f, f, self.in_channels)), jnp.zeros((batch,)), ctx, y

    def added_cond(self, pooled: jax.Array, ids: jax.Array) -> jax.Array:
        """The vector `y` of an SDXL-style UNet: pooled text embedding (B, P) and micro-conditioning ids (B, n)."""
        if self.adm_in_channels is None:
            raise ValueError("this UNet takes no added conditioning (adm_in_channels=None)")
        width = pooled.shape[-1] + ids.shape[-1] * self.addition_time_embed_dim
        if pooled.ndim != 2 or ids.ndim != 2 or width != self.adm_in_channels:
            raise ValueError(f"pooled {pooled.shape} + ids {ids.shape} x {self.addition_time_embed_dim} give width "
                             f"{width}, but adm_in_channels={self.adm_in_channels}")
        return micro_conditioning(pooled, ids, self.addition_time_embed_dim)

    def _check(self, x: jax.Array, timesteps: jax.Array, context: jax.Array | None, y: jax.Array | None) -> None:
        if self.coordinate_frequencies < 0:
            raise ValueError(f"coordinate_frequencies must be >= 0, got {self.coordinate_frequencies}")
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"UNet expects x of shape (B, H, W, {self.in_channels}), got {x.shape}")
        f = 2 ** (len(self.channel_mult) - 1)
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"UNet input height/width {x.shape[1:3]} must be divisible by {f}")
        if jnp.ndim(timesteps) != 1 or timesteps.shape[0] != x.shape[0]:
            raise ValueError(f"timesteps must have shape ({x.shape[0]},), got {jnp.shape(timesteps)}")
        if self.context_dim is not None:
            if context is None or context.ndim != 3 or context.shape[-1] != self.context_dim:
                got = None if context is None else context.shape
                raise ValueError(f"UNet with context_dim={self.context_dim} needs context (B, L, {self.context_dim}), got {got}")
        elif context is not None:
            raise ValueError("this UNet has no cross-attention (context_dim=None) but context was given")
        if self.num_classes is not None and self.adm_in_channels is not None:
            raise ValueError("num_classes and adm_in_channels are exclusive (both feed y)")
        if self.adm_in_channels is not None:
            if y is None or y.shape != (x.shape[0], self.adm_in_channels):
                got = None if y is None else y.shape
                raise ValueError(f"UNet with adm_in_channels={self.adm_in_channels} needs y of shape "
                                 f"({x.shape[0]}, {self.adm_in_channels}) (see UNet.added_cond), got {got}")
        elif (self.num_classes is None) != (y is None):
            raise ValueError(f"class labels y must be given iff num_classes is set (num_classes={self.num_classes})")

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        timesteps: jax.Array,
        context: jax.Array | None = None,
        y: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> jax.Array:
        """Predicts the model output (eps / v / x0) for NHWC latents `x` at `timesteps`."""
        timesteps = jnp.asarray(timesteps)
        self._check(x, timesteps, context, y)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mc = self.model_channels
        emb = timestep_embedding(timesteps, mc)
        emb = layers.dense(4 * mc, name="time_embedding_linear_1", **kw)(emb)
        emb = layers.dense(4 * mc, name="time_embedding_linear_2", **kw)(nn.silu(emb))
        if self.num_classes is not None:
            table = nn.Embed(
                self.num_classes, 4 * mc, param_dtype=self.param_dtype, name="class_embedding",
                embedding_init=layers.partitioned(nn.initializers.normal(1.0), ("vocab", "embed")),
            )
            emb = emb + table(y).astype(emb.dtype)
        if self.adm_in_channels is not None:
            a = layers.dense(4 * mc, name="add_embedding_linear_1", **kw)(y.astype(self.dtype))
            emb = emb + layers.dense(4 * mc, name="add_embedding_linear_2", **kw)(nn.silu(a))
        if context is not None:
            context = context.astype(self.dtype)

        res = layers.maybe_remat(ResBlock, self.remat_policy, static_argnums=(3,))
        attn_cls = SpatialTransformer if self.use_spatial_transformer else AttentionBlock
        attn_cls = layers.maybe_remat(attn_cls, self.remat_policy, static_argnums=(3,))

        def resblock(ch: int, name: str, **extra: Any) -> nn.Module:
            return res(ch, self.use_scale_shift_norm, dropout=self.dropout, norm_eps=self.norm_eps,
                       norm_groups=self.norm_num_groups, name=name, **extra, **kw)

        def attention(ch: int, level: int, name: str) -> nn.Module:
            if self.use_spatial_transformer:
                heads = self.heads(ch)
                return attn_cls(heads, ch // heads, self.depth(level), self.dropout, self.remat_policy,
                                self.norm_num_groups, name=name, **kw)
            return attn_cls(self.heads(ch), self.norm_eps, self.norm_num_groups, name=name, **kw)

        constrain = lambda t: nn.with_logical_constraint(t, ("batch", "height", "width", "channels"))  # noqa: E731
        h = layers.conv(mc, 3, name="conv_in", **kw)(x.astype(self.dtype))
        if self.coordinate_frequencies > 0:
            coords = coordinate_features(x.shape[1], x.shape[2], self.coordinate_frequencies).astype(self.dtype)
            h = h + layers.dense(mc, names=(None, "embed"), name="coordinate_embedding", **kw)(coords)[None]
        h = constrain(h)
        skips = [h]
        ds = 1
        levels = len(self.channel_mult)
        for level, mult in enumerate(self.channel_mult):
            ch = mult * mc
            for i in range(self.num_res_blocks):
                h = resblock(ch, f"down_{level}_res_{i}")(h, emb, train)
                if ds in self.attention_resolutions:
                    h = attention(ch, level, f"down_{level}_attn_{i}")(h, context, train)
                skips.append(h)
            if level != levels - 1:
                if self.resblock_updown:
                    h = resblock(ch, f"down_{level}_downsample", down=True)(h, emb, train)
                else:
                    h = Downsample(ch, self.conv_resample, name=f"down_{level}_downsample", **kw)(h)
                skips.append(constrain(h))
                ds *= 2

        h = resblock(h.shape[-1], "mid_res_0")(h, emb, train)
        h = attention(h.shape[-1], levels, "mid_attn")(h, context, train)
        h = resblock(h.shape[-1], "mid_res_1")(h, emb, train)

        for level in reversed(range(levels)):
            ch = self.channel_mult[level] * mc
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = resblock(ch, f"up_{level}_res_{i}")(h, emb, train)
                if ds in self.attention_resolutions:
                    h = attention(ch, level, f"up_{level}_attn_{i}")(h, context, train)
            if level:
                if self.resblock_updown:
                    h = resblock(ch, f"up_{level}_upsample", up=True)(h, emb, train)
                else:
                    h = Upsample(ch, self.conv_resample, name=f"up_{level}_upsample", **kw)(h)
                h = constrain(h)
                ds //= 2

        h = nn.silu(layers.group_norm(self.norm_num_groups, epsilon=self.norm_eps, name="norm_out", **kw)(h))
        return layers.conv(self.out_channels, 3, kernel_init=nn.initializers.zeros_init(), name="conv_out", **kw)(h)
