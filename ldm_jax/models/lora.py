"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685) as a functional transform of parameter trees.

A LoRA on a kernel W is a pair (down, up) with W' = W + scale · (alpha / rank) · down @ up:
  Dense kernel (in, out):       down (in, r),        up (r, out)
  Conv kernel (kh, kw, in, out): down (kh, kw, in, r), up (r, out)   (LoCon: a kh×kw conv to r channels,
                                                                      then a 1×1 conv; composed exactly)
`up` starts at zero (peft's default), so W' = W at step 0. The adapters are a nested dict that mirrors
the parameter tree down to the module: adapters["down_0_attn_0"]["transformer_blocks_0"]["attn1"]["to_q"]
= {"down": ..., "up": ...} for the kernel params[...]["to_q"]["kernel"]. A loaded LoRA may carry a
per-module "alpha" leaf (kohya files store one per module); otherwise the config's alpha applies.

Why a parameter transform and not an interception of the layers (qwix's `LoraProvider` intercepts
dot_general/conv inside flax modules): the transform leaves the models untouched, so the base weights
are an ordinary frozen input (never in the optimizer state, never donated, in any dtype), the scales are
traced arrays (changing one does not recompile), any number of LoRAs add up in one place, merging is
the same function the training step uses, and sharding needs nothing new (the delta is added to the
kernel where it lives). qwix fixes alpha/rank as Python constants, supports one adapter per weight and
creates adapters in the base weight's dtype. The cost: the backward pass forms the gradient of each
*targeted* kernel (tokens · in · out per layer) before projecting it onto down/up, which an activation-
space LoRA avoids; non-targeted layers cost nothing extra (bench/bench_lora.py measures the step).

Dropout (peft's `lora_dropout`, applied to the adapter's input) is expressed in weight space: each step
one mask over the input features (rows of `down`), shared by the batch, with 1/(1-p) rescaling.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax.core import meta
from flax import traverse_util

from ldm_jax.models.layers import torch_default_kernel_init

# Target presets: regular expressions over our module paths ("a/b/c" without the trailing "/kernel").
UNET_TARGETS: dict[str, str] = {
    "attn": r".*/attn[12]/(to_q|to_k|to_v|to_out)",
    "ff": r".*/transformer_blocks_\d+/(ff_proj|ff_out)",
    "proj": r".*_attn(_\d+)?/(proj_in|proj_out)",
    "conv": r".*_res(_\d+)?/(conv1|conv2|conv_shortcut)|.*_(downsample|upsample)/conv",
}
TEXT_TARGETS: dict[str, str] = {
    "attn": r"layers_\d+/self_attn/(q_proj|k_proj|v_proj|out_proj)",
    "mlp": r"layers_\d+/(fc1|fc2)",
}
TARGET_PRESETS = {"unet": UNET_TARGETS, "text": TEXT_TARGETS}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how: rank, alpha (scale alpha/rank), dropout, target patterns per model.

    `targets` maps a model name ("unet", "text") to preset names (see `TARGET_PRESETS`) or regular
    expressions matched (fully) against our module paths; a model that is not named is not adapted.
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=lambda: {"unet": ("attn",)})

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")
        for model in self.targets:
            if model not in TARGET_PRESETS:
                raise ValueError(f"lora targets name a model {model!r}; valid: {sorted(TARGET_PRESETS)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (stored with checkpoints and files)."""
        return dict(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                    targets={k: list(v) for k, v in self.targets.items()})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoraConfig":
        """Inverse of `to_dict`."""
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d.get("dropout", 0.0)),
                   targets={k: tuple(v) for k, v in d.get("targets", {"unet": ("attn",)}).items()})


def _kernels(params: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """{module path: kernel shape} of every Dense/Conv kernel in a (possibly boxed) parameter tree."""
    flat = traverse_util.flatten_dict(dict(meta.unbox(params)))
    return {"/".join(k[:-1]): tuple(v.shape) for k, v in flat.items() if k[-1] == "kernel" and len(v.shape) in (2, 4)}


def select_targets(params: Mapping[str, Any], patterns: Iterable[str], model: str = "unet") -> list[str]:
    """Module paths whose kernel matches one of `patterns` (preset names or regexes); each must match something."""
    presets = TARGET_PRESETS.get(model, {})
    kernels = _kernels(params)
    chosen: set[str] = set()
    for p in patterns:
        rx = re.compile(presets.get(p, p))
        hits = [m for m in kernels if rx.fullmatch(m)]
        if not hits:
            raise ValueError(f"lora target {p!r} matches no {model} module; presets: {sorted(presets)}; "
                             f"module paths look like {sorted(kernels)[:3]}")
        chosen.update(hits)
    return sorted(chosen)


def init_adapters(key: jax.Array, params: Mapping[str, Any], modules: Sequence[str], rank: int,
                  dtype: Any = jnp.float32) -> dict[str, Any]:
    """Fresh adapters for `modules`: down ~ PyTorch's default init (peft's kaiming-uniform), up = 0."""
    kernels = _kernels(params)
    flat = {}
    for i, m in enumerate(modules):
        shape = kernels[m]
        down_shape = (*shape[:-1], rank)
        flat[(*m.split("/"), "down")] = torch_default_kernel_init(jax.random.fold_in(key, i), down_shape, dtype)
        flat[(*m.split("/"), "up")] = jnp.zeros((rank, shape[-1]), dtype)
    return traverse_util.unflatten_dict(flat)


def modules_of(adapters: Mapping[str, Any]) -> dict[str, dict[str, jax.Array]]:
    """{module path: {"down", "up"[, "alpha"]}} of a nested adapter tree."""
    flat = traverse_util.flatten_dict(dict(adapters))
    out: dict[str, dict[str, jax.Array]] = {}
    for k, v in flat.items():
        out.setdefault("/".join(k[:-1]), {})[k[-1]] = v
    return out


def delta(down: jax.Array, up: jax.Array) -> jax.Array:
    """down @ up with the kernel's shape: (in, out) or (kh, kw, in, out)."""
    return jnp.einsum("...r,ro->...o", down, up, precision=jax.lax.Precision.HIGHEST)


def lora_deltas(adapters: Mapping[str, Any], alpha: float | None = None, dropout: float = 0.0,
                key: jax.Array | None = None) -> dict[str, jax.Array]:
    """{module path: (alpha / rank) · down @ up}; a module's own "alpha" leaf wins over `alpha` (None: alpha = rank)."""
    out = {}
    for i, (m, a) in enumerate(sorted(modules_of(adapters).items())):
        down, up = a["down"], a["up"]
        rank = up.shape[0]
        scale = a["alpha"] / rank if "alpha" in a else (1.0 if alpha is None else alpha / rank)
        if dropout > 0.0 and key is not None:
            keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - dropout, (down.shape[-2], 1))
            down = down * keep.astype(down.dtype) / (1.0 - dropout)
        out[m] = delta(down, up) * jnp.asarray(scale, up.dtype)
    return out


def apply(params: Mapping[str, Any], loras: Sequence[tuple[Mapping[str, Any], Any]], *,
          alpha: float | None = None, dropout: float = 0.0, key: jax.Array | None = None) -> dict[str, Any]:
    """params with W + Σ_i scale_i · Δ_i for every (adapters_i, scale_i) in `loras` (scales may be traced).

    The sum is formed in the adapters' dtype (float32) and the result kernel has the promoted dtype of the
    base and the adapters, so a bf16 base with fp32 adapters yields fp32 kernels for the adapted modules.
    """
    params = meta.unbox(params)
    flat = traverse_util.flatten_dict(dict(params))
    kernels = {"/".join(k[:-1]): k for k in flat if k[-1] == "kernel"}
    total: dict[str, jax.Array] = {}
    for j, (adapters, scale) in enumerate(loras):
        sub = None if key is None else jax.random.fold_in(key, j)
        for m, d in lora_deltas(adapters, alpha, dropout, sub).items():
            if m not in kernels:
                raise KeyError(f"lora module {m!r} is not in the model (kernels look like {sorted(kernels)[:3]})")
            if d.shape != flat[kernels[m]].shape:
                raise ValueError(f"lora module {m!r}: delta {d.shape} does not fit kernel {flat[kernels[m]].shape}")
            d = d * jnp.asarray(scale, d.dtype)
            total[m] = total[m] + d if m in total else d
    out = dict(flat)
    for m, d in total.items():
        w = flat[kernels[m]]
        out[kernels[m]] = w.astype(jnp.promote_types(w.dtype, d.dtype)) + d
    return traverse_util.unflatten_dict(out)


def merge(params: Mapping[str, Any], loras: Sequence[tuple[Mapping[str, Any], Any]], *,
          alpha: float | None = None) -> dict[str, Any]:
    """The merged weights, cast back to each base kernel's dtype (jitted `apply`)."""
    merged = jax.jit(lambda p, l: apply(p, l, alpha=alpha))(params, loras)
    return jax.tree.map(lambda m, b: m.astype(b.dtype), merged, meta.unbox(params))


def unmerge(merged: Mapping[str, Any], loras: Sequence[tuple[Mapping[str, Any], Any]], *,
            alpha: float | None = None) -> dict[str, Any]:
    """W − Σ scale_i Δ_i: the base up to float rounding (keep the base tree when you need it bit for bit;
    `Pipeline.unmerge_loras` does)."""
    neg = [(a, -jnp.asarray(s, jnp.float32)) for a, s in loras]
    return merge(merged, neg, alpha=alpha)


def count(adapters: Mapping[str, Any]) -> int:
    """Number of adapter numbers (alpha leaves excluded)."""
    return sum(int(a["down"].size + a["up"].size) for a in modules_of(adapters).values())
