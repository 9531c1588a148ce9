"""The CLIP vision transformer (Radford et al. 2021, arXiv 2103.00020) with its projection, in Flax linen.

transformers' `CLIPVisionModelWithProjection` / `CLIPModel.get_image_features`: a stride-`patch` conv
(no bias) cuts the image into patches, a learned class token is prepended, learned positions added,
`pre_layrnorm`, the pre-LN encoder blocks of the text tower (`ldm_jax.models.text.CLIPEncoderLayer`,
bidirectional), then `post_layernorm` on the class token and `visual_projection` (no bias).
Input: NHWC pixel values already normalised with CLIP's mean/std (`ldm_jax.evaluation.clip_score.preprocess`).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ldm_jax.models import layers
from ldm_jax.models.text import ACTIVATIONS, CLIPEncoderLayer

Dtype = Any

VISION_PRESETS: dict[str, dict[str, Any]] = {
    "clip-vit-l-14": dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096,
                          projection_dim=768, act="quick_gelu"),
}


class CLIPVisionTransformer(nn.Module):
    """(B, S, S, 3) normalised pixels -> (pooled (B, width) after post_layernorm, embeds (B, projection_dim))."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    projection_dim: int = 768
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        b, h, w, _ = pixels.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"pixels are {h}x{w}; this CLIP vision tower takes {self.image_size}x{self.image_size}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p = self.patch_size
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False, name="patch_embedding",
                    **kw)(pixels.astype(self.dtype))
        x = x.reshape(b, -1, self.width)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (self.width,), self.param_dtype)
        n_pos = (self.image_size // p) ** 2 + 1
        pos = self.param("position_embedding", nn.initializers.normal(0.02), (n_pos, self.width), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)), x], axis=1)
        x = x + pos.astype(self.dtype)[None]
        x = layers.layer_norm(epsilon=self.layer_norm_eps, name="pre_layrnorm", **kw)(x)
        for i in range(self.layers):
            x = CLIPEncoderLayer(self.width, self.heads, self.mlp_dim, self.act, False, self.layer_norm_eps,
                                 name=f"layers_{i}", **kw)(x)
        pooled = layers.layer_norm(epsilon=self.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])
        embeds = layers.dense(self.projection_dim, use_bias=False, name="visual_projection", **kw)(pooled)
        return pooled, embeds
