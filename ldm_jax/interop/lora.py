"""LoRA files in and out: the diffusers/peft layout and the kohya/A1111 layout (safetensors).

diffusers / peft:  unet.<module>.lora_A.weight (r, in[, kh, kw]), unet.<module>.lora_B.weight (out, r[, 1, 1]),
                   text_encoder.<module>..., text_encoder_2.<module>...; alpha in the safetensors metadata
                   "lora_adapter_metadata" (JSON of peft's LoraConfig per component: "unet.r",
                   "unet.lora_alpha", "unet.alpha_pattern", ...), as diffusers' `save_lora_weights` writes it;
                   without it alpha = rank (scale 1), diffusers' convention.
kohya / A1111:     lora_unet_<module with "_">.lora_down.weight, .lora_up.weight, .alpha (one per module);
                   text encoders lora_te_ (SD1/2) or lora_te1_ / lora_te2_ (SDXL); conv (LoCon) modules have
                   4-D down (r, in, kh, kw) and up (out, r, 1, 1). UNet modules use diffusers' names
                   (SD1/2) or CompVis names (`input_blocks_4_1_...`, SDXL) — both are read; `unet_names`
                   picks what is written.

Module names come from the weight converters (`interop/unet.py`, `interop/clip.py`), so every module our
models have is named exactly as diffusers names it. A loaded LoRA is {model: adapters} with models
"unet", "text", "text_2" and a per-module "alpha" leaf (see `ldm_jax.models.lora`).
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from ldm_jax.interop import clip as clip_io
from ldm_jax.interop import unet as unet_io
from ldm_jax.interop.common import CheckpointError, conv_to_flax, conv_to_torch, load_safetensors, save_safetensors
from ldm_jax.models import lora as lora_lib

FORMATS = ("diffusers", "kohya")
DIFFUSERS_PREFIX = {"unet": "unet.", "text": "text_encoder.", "text_2": "text_encoder_2."}
METADATA_KEY = "lora_adapter_metadata"


def _unet_modules(kwargs: Mapping[str, Any], layout: str) -> dict[str, tuple[str, str]]:
    """{our module path: (torch module name, kind)} for every UNet kernel with a torch Linear/Conv2d."""
    out = {}
    for path, (key, kind) in unet_io._leaf_map(kwargs, layout).items():  # the converter's own name table
        if path.endswith("/kernel") and kind in ("linear", "conv", "conv1x1"):
            out[path[: -len("/kernel")]] = (key[: -len(".weight")], kind)
    return out


def _text_modules(kwargs: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    kw = clip_io._kw(kwargs)
    entries = clip_io._hf_entries(kw, "", kw["layers"], kw["projection_dim"] is not None)
    return {path[: -len("/kernel")]: (key[: -len(".weight")], "linear")
            for key, path, kind, _ in entries if kind == "linear" and path.endswith("/kernel")}


def _tables(kwargs: Mapping[str, Mapping[str, Any]], unet_layout: str) -> dict[str, dict[str, tuple[str, str]]]:
    tables = {}
    for model, kw in kwargs.items():
        if kw is None:
            continue
        if model == "unet":
            tables[model] = _unet_modules(kw, unet_layout)
        elif model in ("text", "text_2"):
            tables[model] = _text_modules(kw)
        else:
            raise ValueError(f"unknown model {model!r} for a LoRA file; valid: unet, text, text_2")
    return tables


def _kohya_prefix(model: str, models: set[str]) -> str:
    if model == "unet":
        return "lora_unet_"
    if model == "text_2":
        return "lora_te2_"
    return "lora_te1_" if "text_2" in models else "lora_te_"


def _to_torch(down: np.ndarray, up: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Our (down, up) -> torch (A / lora_down, B / lora_up)."""
    if kind == "linear":
        return np.ascontiguousarray(down.T), np.ascontiguousarray(up.T)
    if kind == "conv1x1":
        return np.ascontiguousarray(down.T)[:, :, None, None], np.ascontiguousarray(up.T)[:, :, None, None]
    return conv_to_torch(down), np.ascontiguousarray(up.T)[:, :, None, None]


def _to_flax(a: np.ndarray, b: np.ndarray, kind: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """torch (A, B) -> our (down, up), checking the rank agrees."""
    if a.shape[0] != b.shape[1]:
        raise CheckpointError(f"LoRA module {name}: down has rank {a.shape[0]} but up has rank {b.shape[1]}")
    up = np.ascontiguousarray((b[:, :, 0, 0] if b.ndim == 4 else b).T)
    if kind == "conv":
        if a.ndim != 4:
            raise CheckpointError(f"LoRA module {name} is a conv: down must be 4-D, got {a.shape}")
        return conv_to_flax(a), up
    return np.ascontiguousarray((a[:, :, 0, 0] if a.ndim == 4 else a).T), up


def save(path: str | os.PathLike, loras: Mapping[str, Mapping[str, Any]], kwargs: Mapping[str, Mapping[str, Any]], *,
         format: str = "diffusers", alpha: float | None = None, dtype: Any = np.float32,
         unet_names: str = "diffusers", metadata: Mapping[str, str] | None = None) -> None:
    """Writes {model: adapters} (models unet / text / text_2) as a LoRA safetensors file.

    `kwargs` holds each model's constructor kwargs (UNet / CLIP text); `alpha` applies to modules without
    their own "alpha" leaf (None: alpha = rank); `dtype` the tensors' dtype (float16 halves the file).
    """
    if format not in FORMATS:
        raise ValueError(f"LoRA format {format!r}; valid: {FORMATS}")
    tables = _tables({m: kwargs.get(m) for m in loras}, "compvis" if unet_names == "compvis" else "diffusers")
    tensors: dict[str, np.ndarray] = {}
    peft_meta: dict[str, Any] = {}
    for model, adapters in loras.items():
        ranks, alphas, names = {}, {}, []
        for m, a in lora_lib.modules_of(adapters).items():
            if m not in tables[model]:
                raise CheckpointError(f"{model} module {m!r} has no {format} name (legacy attention blocks cannot be "
                                      "written in LoRA formats)")
            name, kind = tables[model][m]
            down, up = _to_torch(np.asarray(a["down"], np.float32), np.asarray(a["up"], np.float32), kind)
            rank = down.shape[0]
            al = float(np.asarray(a["alpha"])) if "alpha" in a else (float(rank) if alpha is None else float(alpha))
            if format == "diffusers":
                base = DIFFUSERS_PREFIX[model] + name
                tensors[base + ".lora_A.weight"], tensors[base + ".lora_B.weight"] = down, up
            else:
                base = _kohya_prefix(model, set(loras)) + name.replace(".", "_")
                tensors[base + ".lora_down.weight"], tensors[base + ".lora_up.weight"] = down, up
                tensors[base + ".alpha"] = np.asarray(al, np.float32)
            short = name.removeprefix("text_model.")  # peft matches suffixes: fits transformers 4 and 5 nesting
            ranks[short], alphas[short] = rank, al
            names.append(short)
        if format == "diffusers" and names:
            peft_meta[model] = _peft_config(ranks, alphas, names)
    tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    meta = dict(metadata or {})
    meta["format"] = "pt"
    if peft_meta:
        packed = {f"{DIFFUSERS_PREFIX[m][:-1]}.{k}": v for m, cfg in peft_meta.items() for k, v in cfg.items()}
        meta[METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
    save_safetensors(tensors, path, metadata=meta)


def _peft_config(ranks: dict[str, int], alphas: dict[str, float], names: list[str]) -> dict[str, Any]:
    """peft LoraConfig kwargs: the most common rank / alpha, patterns for the rest."""
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    a = max(set(alphas.values()), key=list(alphas.values()).count)
    return dict(r=r, lora_alpha=a, target_modules=sorted(names),
                rank_pattern={n: v for n, v in ranks.items() if v != r},
                alpha_pattern={n: v for n, v in alphas.items() if v != a})


def read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors as float32 numpy, safetensors metadata) of a LoRA file."""
    from safetensors import safe_open

    path = pathlib.Path(path)
    tensors = load_safetensors(path)
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
    return tensors, metadata


def detect(keys: Any) -> str:
    """'diffusers' or 'kohya' from the key names (raises naming an example key otherwise)."""
    keys = list(keys)
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "diffusers"
    if any(k.startswith("lora_") and (".lora_down." in k or ".lora_up." in k) for k in keys):
        return "kohya"
    raise CheckpointError(f"not a LoRA file in the diffusers/peft or kohya layout (keys like {keys[:3]}); "
                          "LoHa/LoKr and other LyCORIS kinds are not supported")


def load(path: str | os.PathLike, kwargs: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, Any], str]:
    """Reads a LoRA file (either layout) -> ({model: adapters with "alpha" leaves}, format).

    Every tensor must belong to a module of a model in `kwargs` (unet / text / text_2 kwargs; None skips
    a model): a key that names no module raises `CheckpointError` listing it.
    """
    tensors, metadata = read(path)
    fmt = detect(tensors)
    tensors = {_nest_text_model(k): v for k, v in tensors.items()}
    peft_meta = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else {}
    models = {m for m, kw in kwargs.items() if kw is not None}
    unet_layout = "compvis" if any(k.startswith("lora_unet_input_blocks_") for k in tensors) else "diffusers"
    tables = _tables({m: kwargs[m] for m in models}, unet_layout)
    lookup: dict[str, tuple[str, str, str, str]] = {}  # file module base -> (model, our path, kind, torch name)
    kohya_te = "text_2" in models or any(k.startswith("lora_te1_") for k in tensors)
    for model, table in tables.items():
        for ours, (name, kind) in table.items():
            if fmt == "diffusers":
                base = DIFFUSERS_PREFIX[model] + name
            else:
                pre = _kohya_prefix(model, {"text_2"} if kohya_te else set())
                base = pre + name.replace(".", "_")
            lookup[base] = (model, ours, kind, name)
    down_s, up_s = (".lora_A.weight", ".lora_B.weight") if fmt == "diffusers" else (".lora_down.weight", ".lora_up.weight")
    used: set[str] = set()
    flat: dict[str, dict[tuple[str, ...], np.ndarray]] = {}
    for base, (model, ours, kind, name) in lookup.items():
        if base + down_s not in tensors:
            continue
        a, b = tensors[base + down_s], tensors.get(base + up_s)
        if b is None:
            raise CheckpointError(f"{path}: {base + down_s} has no {base + up_s}")
        down, up = _to_flax(a, b, kind, base)
        rank = down.shape[-1]
        if fmt == "kohya":
            al = float(tensors[base + ".alpha"]) if base + ".alpha" in tensors else float(rank)
            used.add(base + ".alpha")
        else:
            pre = DIFFUSERS_PREFIX[model]
            cfg = {k[len(pre):]: v for k, v in peft_meta.items() if k.startswith(pre)}
            al = _pattern(cfg.get("alpha_pattern", {}), name, cfg.get("lora_alpha"))
            al = float(rank if al is None else al)
        tree = flat.setdefault(model, {})
        key = tuple(ours.split("/"))
        tree[key + ("down",)], tree[key + ("up",)] = down, up
        tree[key + ("alpha",)] = np.asarray(al, np.float32)
        used.update((base + down_s, base + up_s))
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} {fmt} LoRA tensors name no module of the models "
                              f"{sorted(models)}: {unknown[:8]}")
    return {m: traverse_util.unflatten_dict(t) for m, t in flat.items()}, fmt


def _nest_text_model(key: str) -> str:
    """transformers 5 names a bare CLIPTextModel's modules without `text_model.`: put it back."""
    for pre in ("text_encoder.", "text_encoder_2."):
        if key.startswith((pre + "encoder.", pre + "embeddings.", pre + "final_layer_norm.")):
            return pre + "text_model." + key[len(pre):]
    for pre in ("lora_te_", "lora_te1_", "lora_te2_"):
        if key.startswith(pre + "encoder_"):
            return pre + "text_model_" + key[len(pre):]
    return key


def _pattern(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """peft's alpha_pattern lookup: a key matching the end of the module name wins."""
    for k, v in patterns.items():
        if name == k or name.endswith("." + k):
            return v
    return default
