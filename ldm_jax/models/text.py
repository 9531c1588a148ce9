"""The CLIP text transformer (Radford et al. 2021, arXiv 2103.00020) in Flax linen.

One module serves the frozen encoders of Stable Diffusion (OpenAI CLIP ViT-L/14 for SD1, OpenCLIP
ViT-H/14 for SD2) and the text encoders trained from scratch with the UNet (LDM paper, arXiv
2112.10752, LDM-KL-8-G). The block is CLIP's pre-LayerNorm transformer: x + attn(ln1(x)), then
x + mlp(ln2(x)), learned absolute positions, a causal mask, and a final LayerNorm.

Outputs mirror transformers' `CLIPTextModel`: `hidden_states` is `hidden_states[output_layer]`
(-1: the last layer, -2: the penultimate one as SD2 uses it), passed through the final LayerNorm when
`final_norm` is set; `pooled` is the final-LayerNorm output of the last layer at the EOS token
(projected by `text_projection` when `projection_dim` is set, as OpenCLIP's `encode_text`). Under
`jax.jit` the layers after `output_layer` are dead code when `pooled` is unused, so SD2's 24-layer
OpenCLIP tower costs 23 layers.

`TextEncoders` runs several towers on one prompt (SDXL: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14, each
at its penultimate layer without the final LayerNorm) and concatenates their hidden states; its pooled
output is the last tower's (bigG's projected EOS embedding).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from ldm_jax.models import layers

Dtype = Any

ACTIVATIONS = {
    # OpenAI CLIP's sigmoid approximation of GELU (x * sigmoid(1.702 x)).
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}

# Keyword arguments of CLIPTextTransformer. "openclip-vit-h-14" follows the diffusers SD2 text encoder:
# the 24-layer OpenCLIP ViT-H/14 text tower with its last layer dropped, so the last layer's output
# after the final LayerNorm equals SD2's "penultimate layer, then ln_final" (FrozenOpenCLIPEmbedder).
# A single-file SD2 checkpoint loads as the full 24-layer tower with output_layer=-2 instead (same
# hidden states; see ldm_jax.interop.clip).
TEXT_PRESETS: dict[str, dict[str, Any]] = {
    "clip-vit-l-14": dict(vocab_size=49408, width=768, layers=12, heads=12, mlp_dim=3072, act="quick_gelu"),
    "openclip-vit-h-14": dict(vocab_size=49408, width=1024, layers=23, heads=16, mlp_dim=4096, act="gelu"),
    # LDM-KL-8-G's jointly trained 32-layer width-1280 encoder (BERT tokenizer vocabulary, 8 heads,
    # bidirectional), expressed with this module's CLIP-style blocks.
    "ldm-kl-8-g": dict(vocab_size=30522, width=1280, layers=32, heads=8, mlp_dim=5120, act="gelu", causal=False),
    "tiny": dict(vocab_size=1000, width=32, layers=2, heads=4, mlp_dim=64, act="gelu"),
    # SDXL's towers as its conditioner uses them: hidden_states[-2] without the final LayerNorm (diffusers
    # StableDiffusionXLPipeline.encode_prompt, SGM FrozenCLIPEmbedder/FrozenOpenCLIPEmbedder2 "penultimate")
    "sdxl-clip-l": dict(vocab_size=49408, width=768, layers=12, heads=12, mlp_dim=3072, act="quick_gelu",
                        output_layer=-2, final_norm=False),
    "openclip-vit-bigg-14": dict(vocab_size=49408, width=1280, layers=32, heads=20, mlp_dim=5120, act="gelu",
                                 projection_dim=1280, output_layer=-2, final_norm=False),
}
# SDXL conditioners: TextEncoders(encoders=...) by the diffusers folder names of the towers
SDXL_TEXT = {"sdxl-base": {"text_encoder": TEXT_PRESETS["sdxl-clip-l"], "text_encoder_2": TEXT_PRESETS["openclip-vit-bigg-14"]},
             "sdxl-refiner": {"text_encoder_2": TEXT_PRESETS["openclip-vit-bigg-14"]}}


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (transformers' layout)."""

    width: int
    heads: int
    causal: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        split = lambda y: y.reshape(b, t, self.heads, self.width // self.heads)  # noqa: E731
        q = split(layers.dense(self.width, name="q_proj", **kw)(x))
        k = split(layers.dense(self.width, name="k_proj", **kw)(x))
        v = split(layers.dense(self.width, name="v_proj", **kw)(x))
        out = layers.attention(q, k, v, is_causal=self.causal).reshape(b, t, self.width)
        return layers.dense(self.width, names=("mlp", "embed"), name="out_proj", **kw)(out)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)); x + fc2(act(fc1(ln2(x))))."""

    width: int
    heads: int
    mlp_dim: int
    act: str = "quick_gelu"
    causal: bool = True
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.layer_norm(epsilon=self.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + CLIPAttention(self.width, self.heads, self.causal, name="self_attn", **kw)(h)
        h = layers.layer_norm(epsilon=self.layer_norm_eps, name="layer_norm2", **kw)(x)
        h = layers.dense(self.mlp_dim, name="fc1", **kw)(h)
        h = layers.dense(self.width, names=("mlp", "embed"), name="fc2", **kw)(ACTIVATIONS[self.act](h))
        x = x + h
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class CLIPTextTransformer(nn.Module):
    """CLIP text encoder: input_ids (B, L<=max_length) -> (hidden_states (B, L, width), pooled (B, width|proj))."""

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    max_length: int = 77
    act: str = "quick_gelu"
    causal: bool = True
    layer_norm_eps: float = 1e-5
    output_layer: int = -1  # -1 last layer, -2 penultimate (SD2), as an index into transformers' hidden_states
    final_norm: bool = True  # apply the final LayerNorm to the returned hidden states
    eos_token_id: int | None = None  # None: EOS is the largest id (argmax, transformers' legacy rule)
    projection_dim: int | None = None  # OpenCLIP/CLIPTextModelWithProjection text_projection on `pooled`
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def pooled_dim(self) -> int:
        """Width of `pooled` (the projection's, else the tower's)."""
        return int(self.projection_dim or self.width)

    def _check(self) -> None:
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.layers < 0:
            raise ValueError(f"layers must be >= 0, got {self.layers}")
        # layers=0: the embeddings (token + position, final LayerNorm) are the hidden states; output_layer -1
        if not -max(self.layers, 1) <= self.output_layer <= -1:
            raise ValueError(f"output_layer must be in [-{max(self.layers, 1)}, -1], got {self.output_layer}")

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        self._check()
        b, t = input_ids.shape
        if t > self.max_length:
            raise ValueError(f"input_ids has {t} tokens, more than max_length {self.max_length}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tok = nn.Embed(
            self.vocab_size,
            self.width,
            embedding_init=layers.partitioned(nn.initializers.normal(0.02), ("vocab", "table")),
            name="token_embedding",
            **kw,
        )
        pos = self.param(
            "position_embedding",
            layers.partitioned(nn.initializers.normal(0.01), (None, "table")),
            (self.max_length, self.width),
            self.param_dtype,
        )
        x = tok(input_ids) + jnp.asarray(pos[:t], self.dtype)[None]
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        block = layers.maybe_remat(CLIPEncoderLayer, self.remat_policy)
        final_ln = layers.layer_norm(epsilon=self.layer_norm_eps, name="final_layer_norm", **kw)
        selected = x
        for i in range(self.layers):
            x = block(
                self.width, self.heads, self.mlp_dim, self.act, self.causal, self.layer_norm_eps,
                name=f"layers_{i}", **kw,
            )(x)
            if i == self.layers + self.output_layer:
                selected = x
        last = final_ln(x)
        hidden = final_ln(selected) if self.final_norm else selected

        if self.eos_token_id is None:
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:  # the first EOS (padding may reuse the EOS id)
            eos_pos = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = last[jnp.arange(b), eos_pos]
        if self.projection_dim is not None:
            pooled = layers.dense(
                self.projection_dim, use_bias=False, names=("embed", "mlp"), name="text_projection", **kw
            )(pooled)
        return hidden, pooled


class TextEncoders(nn.Module):
    """Several text towers on one prompt: ids (B, n, L), one row per tower's tokenizer ->
    (hidden states concatenated on the feature axis (B, L, sum of widths), the last tower's pooled output).

    `encoders` maps each tower's name (its params key: diffusers' `text_encoder`, `text_encoder_2`) to its
    `CLIPTextTransformer` kwargs, in order.
    """

    encoders: Mapping[str, Mapping[str, Any]]
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def pooled_dim(self) -> int:
        """Width of `pooled` (the last tower's)."""
        return CLIPTextTransformer(**list(self.encoders.values())[-1]).pooled_dim

    @property
    def width(self) -> int:
        """The context width (sum of the towers' widths)."""
        return sum(int(CLIPTextTransformer(**kw).width) for kw in self.encoders.values())

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        if input_ids.ndim != 3 or input_ids.shape[1] != len(self.encoders):
            raise ValueError(f"TextEncoders with {len(self.encoders)} towers ({', '.join(self.encoders)}) needs ids "
                             f"(B, {len(self.encoders)}, L), got {input_ids.shape}")
        hidden, pooled = [], None
        for i, (name, kw) in enumerate(self.encoders.items()):
            kw = {"remat_policy": self.remat_policy, **kw}
            h, pooled = CLIPTextTransformer(**kw, dtype=self.dtype, param_dtype=self.param_dtype, name=name)(
                input_ids[:, i])
            hidden.append(h)
        return jnp.concatenate(hidden, axis=-1), pooled


def build_text_encoder(kwargs: Mapping[str, Any]) -> nn.Module:
    """`TextEncoders` when `kwargs` has "encoders" (SDXL), else one `CLIPTextTransformer`."""
    if "encoders" in kwargs:
        return TextEncoders(**kwargs)
    return CLIPTextTransformer(**kwargs)
