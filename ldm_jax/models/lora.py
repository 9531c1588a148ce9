"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685): on parameter trees or on the activations.

A LoRA on a kernel W is a pair (down, up) with W' = W + scale · (alpha / rank) · down @ up:
  Dense kernel (in, out):       down (in, r),        up (r, out)
  Conv kernel (kh, kw, in, out): down (kh, kw, in, r), up (r, out)   (LoCon: a kh×kw conv to r channels,
                                                                      then a 1×1 conv; composed exactly)
`up` starts at zero (peft's default), so W' = W at step 0. The adapters are a nested dict that mirrors
the parameter tree down to the module: adapters["down_0_attn_0"]["transformer_blocks_0"]["attn1"]["to_q"]
= {"down": ..., "up": ...} for the kernel params[...]["to_q"]["kernel"]. A loaded LoRA may carry a
per-module "alpha" leaf (kohya files store one per module); otherwise the config's alpha applies.

Two forms of one definition (`terms`), tested equal (loss and adapter gradients, tests/test_lora.py):
- `apply` / `merge`, the parameter transform: kernels W + Σ factor · down @ up. Inference uses it (the pipeline
  forms the delta once per call, with traced scales: changing one does not recompile; merging is the same
  function). The base is an ordinary input in any dtype.
- `activations`, a flax method interceptor: each adapted Dense/Conv returns W x + b + Σ factor · up(down(x)).
  Training uses it: the backward pass never forms a targeted kernel's gradient (tokens · in · out per layer),
  only the adapters' small products, and the base stays a constant (not differentiated, not donated, any dtype).
qwix's `LoraProvider` (also an interception) was considered and not used: it fixes alpha/rank as Python
constants (a scale change recompiles), supports one adapter per weight and creates adapters in the base
weight's dtype; the forms here take any number of LoRAs with traced scales and need no new sharding (the
adapters are replicated; the base keeps its own shardings).

Dropout (peft's `lora_dropout`, on the adapter's input): each step one mask over the input features, shared
by the batch, with 1/(1-p) rescaling — on the input channels in `activations`, on the rows of `down` in `apply`
(the same numbers).
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax.core import meta
from flax import linen as nn
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


def with_alpha(adapters: Mapping[str, Any], alpha: float) -> dict[str, Any]:
    """`adapters` with an "alpha" leaf in every module (as a loaded file has), so no config alpha is needed."""
    flat = traverse_util.flatten_dict(dict(adapters))
    flat.update({(*k[:-1], "alpha"): jnp.float32(alpha) for k in list(flat) if k[-1] == "up"})
    return traverse_util.unflatten_dict(flat)


def delta(down: jax.Array, up: jax.Array) -> jax.Array:
    """down @ up with the kernel's shape: (in, out) or (kh, kw, in, out)."""
    return jnp.einsum("...r,ro->...o", down, up, precision=jax.lax.Precision.HIGHEST)


def _module_scale(a: Mapping[str, jax.Array], alpha: float | None) -> Any:
    """alpha / rank of one module: its own "alpha" leaf (kohya files) wins over `alpha`; None means alpha = rank."""
    rank = a["up"].shape[0]
    return a["alpha"] / rank if "alpha" in a else (1.0 if alpha is None else alpha / rank)


def terms(loras: Sequence[tuple[Mapping[str, Any], Any]], alpha: float | None = None, dropout: float = 0.0,
          key: jax.Array | None = None) -> dict[str, list[tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]]]:
    """{module path: [(down, up, factor, keep), ...]}: the one definition both LoRA paths compute from.

    Module m's output gains Σ factor · ((x ⊙ keep) ⋆ down) @ up, i.e. its kernel gains Σ factor · (keep ⊙ down) @ up:
    factor = lora scale · alpha / rank; keep (None without dropout) is the dropout mask over the input features,
    one per step and module (`fold_in(fold_in(key, lora index), module index)`), already divided by 1 - p.
    """
    out: dict[str, list] = {}
    for j, (adapters, scale) in enumerate(loras):
        sub = None if key is None else jax.random.fold_in(key, j)
        for i, (m, a) in enumerate(sorted(modules_of(adapters).items())):
            down, up = a["down"], a["up"]
            factor = jnp.asarray(_module_scale(a, alpha), up.dtype) * jnp.asarray(scale, up.dtype)
            keep = None
            if dropout > 0.0 and sub is not None:
                mask = jax.random.bernoulli(jax.random.fold_in(sub, i), 1.0 - dropout, (down.shape[-2],))
                keep = mask.astype(down.dtype) / (1.0 - dropout)
            out.setdefault(m, []).append((down, up, factor, keep))
    return out


def lora_deltas(adapters: Mapping[str, Any], alpha: float | None = None, dropout: float = 0.0,
                key: jax.Array | None = None) -> dict[str, jax.Array]:
    """{module path: (alpha / rank) · down @ up} of one LoRA (dropout: see `terms`)."""
    return {m: _weight_delta(t) for m, t in terms([(adapters, 1.0)], alpha, dropout, key).items()}


def _weight_delta(ts: Sequence[tuple]) -> jax.Array:
    """Σ factor · (keep ⊙ down) @ up in the kernel's shape."""
    total = None
    for down, up, factor, keep in ts:
        d = delta(down if keep is None else down * keep[:, None], up) * factor
        total = d if total is None else total + d
    return total


def apply(params: Mapping[str, Any], loras: Sequence[tuple[Mapping[str, Any], Any]], *,
          alpha: float | None = None, dropout: float = 0.0, key: jax.Array | None = None) -> dict[str, Any]:
    """params with W + Σ_i scale_i · Δ_i for every (adapters_i, scale_i) in `loras` (scales may be traced).

    The sum is formed in the adapters' dtype (float32) and the result kernel has the promoted dtype of the
    base and the adapters, so a bf16 base with fp32 adapters yields fp32 kernels for the adapted modules.
    """
    params = meta.unbox(params)
    flat = traverse_util.flatten_dict(dict(params))
    kernels = {"/".join(k[:-1]): k for k in flat if k[-1] == "kernel"}
    out = dict(flat)
    for m, ts in terms(loras, alpha, dropout, key).items():
        if m not in kernels:
            raise KeyError(f"lora module {m!r} is not in the model (kernels look like {sorted(kernels)[:3]})")
        w, d = flat[kernels[m]], _weight_delta(ts)
        if d.shape != w.shape:
            raise ValueError(f"lora module {m!r}: delta {d.shape} does not fit kernel {w.shape}")
        out[kernels[m]] = w.astype(jnp.promote_types(w.dtype, d.dtype)) + d
    return traverse_util.unflatten_dict(out)


def _branch(module: nn.Module, x: jax.Array, ts: Sequence[tuple]) -> jax.Array:
    """Σ factor · ((x ⊙ keep) ⋆ down) @ up for a Dense (⋆ = matmul) or Conv module (⋆ = the module's conv, r out)."""
    total = None
    for down, up, factor, keep in ts:
        dtype = module.dtype or jnp.result_type(x, down)
        h = x.astype(dtype) if keep is None else x.astype(dtype) * keep.astype(dtype)
        if isinstance(module, nn.Conv):  # the base conv's strides/padding/dilation, to `rank` channels
            conv = module.clone(parent=None, name=None, features=up.shape[0], use_bias=False)
            h = conv.apply({"params": {"kernel": down.astype(dtype)}}, h)
        else:
            h = jnp.einsum("...i,ir->...r", h, down.astype(dtype), precision=module.precision)
        h = jnp.einsum("...r,ro->...o", h, up.astype(dtype), precision=module.precision) * factor.astype(dtype)
        total = h if total is None else total + h
    return total


@contextlib.contextmanager
def activations(models: Mapping[type, str], loras: Mapping[str, Sequence[tuple[Mapping[str, Any], Any]]], *,
                alpha: float | None = None, dropout: float = 0.0, keys: Mapping[str, jax.Array] | None = None):
    """Within this context, flax calls of the adapted Dense/Conv modules return W x + b + Σ factor · up(down(x)).

    The activation-side form of `apply` (the same `terms`, equal up to float rounding; tests/test_lora.py): the
    LoRA training step uses it, so the backward pass never forms a gradient of a kernel — only the small
    (tokens · in · rank) products of down and up — and the base enters as an ordinary constant (any dtype).
    `models` maps a root module class (UNet, CLIPTextTransformer) to its name in `loras` ({name: [(adapters,
    scale), ...]}); `keys[name]` seeds that model's dropout as `apply(..., key=keys[name])` does. Inference keeps
    the parameter transform (`apply`, `merge`): there the delta is formed once per call, not per token.
    """
    tables = {m: terms(ls, alpha, dropout, None if keys is None else keys.get(m)) for m, ls in loras.items()}
    current: list[str | None] = []  # the model whose root call is being traced (remat'd blocks see no root parent)
    seen: dict[str, set[str]] = {m: set() for m in tables}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if module.scope is None:  # a method of an unbound module (a property, a helper such as UNet.added_cond)
            return next_fun(*args, **kwargs)
        if not module.path:  # a root: UNet.apply, the text encoder, the first stage, a helper clone
            current.append(models.get(type(module)))
            try:
                return next_fun(*args, **kwargs)
            finally:
                current.pop()
        name = current[-1] if current else None
        if name not in tables or context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv)):
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        ts = tables[name].get(path)
        if ts is None:
            return next_fun(*args, **kwargs)
        seen[name].add(path)
        y = next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        return y + _branch(module, x, ts).astype(y.dtype)

    with nn.intercept_methods(interceptor):
        yield
    for m, table in tables.items():  # a module that was never called would silently train nothing
        if seen[m] and set(table) - seen[m]:
            raise KeyError(f"lora modules {sorted(set(table) - seen[m])[:3]} of {m!r} were not called by the model")


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
