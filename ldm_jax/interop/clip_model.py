"""A transformers CLIP folder (`CLIPModel`: openai/clip-vit-large-patch14 and the like) -> our two towers.

The folder holds `config.json` (a CLIPConfig: `text_config`, `vision_config`, `projection_dim`), the weights
(`model.safetensors`, or `pytorch_model.bin` with torch installed) and the tokenizer files. Keys:
`vision_model.embeddings.{class_embedding, patch_embedding.weight, position_embedding.weight}`,
`vision_model.{pre_layrnorm, encoder.layers.N.*, post_layernorm}`, `visual_projection.weight`; the text
side (`text_model.*`, `text_projection.weight`) goes through `ldm_jax.interop.clip`. `logit_scale` and the
`position_ids` buffers are not needed for embeddings.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping

import numpy as np

from ldm_jax.interop import clip as clip_text
from ldm_jax.interop.common import (
    CheckpointError,
    StrictStateDict,
    conv_to_flax,
    linear_to_flax,
    load_state_dict,
    unflatten,
)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclasses.dataclass
class CLIPWeights:
    """Both towers of a CLIPModel: kwargs for CLIPVisionTransformer / CLIPTextTransformer and their params."""

    vision_kwargs: dict[str, Any]
    vision_params: dict[str, Any]
    text_kwargs: dict[str, Any]
    text_params: dict[str, Any]
    folder: pathlib.Path | None = None


def vision_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """CLIPConfig dict -> CLIPVisionTransformer kwargs."""
    v = cfg.get("vision_config") or {}
    return dict(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32), width=v.get("hidden_size", 768),
                layers=v.get("num_hidden_layers", 12), heads=v.get("num_attention_heads", 12),
                mlp_dim=v.get("intermediate_size", 3072), projection_dim=cfg.get("projection_dim", 512),
                act=v.get("hidden_act", "quick_gelu"), layer_norm_eps=v.get("layer_norm_eps", 1e-5))


def text_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """CLIPConfig dict -> CLIPTextTransformer kwargs (with the text projection)."""
    return {**clip_text.config_from_diffusers(cfg), "projection_dim": cfg.get("projection_dim", 512)}


def vision_from_torch(sd: StrictStateDict, kw: Mapping[str, Any]) -> dict[str, Any]:
    """The `vision_model.*` + `visual_projection.weight` tensors -> CLIPVisionTransformer params."""
    w, m, p, b = kw["width"], kw["mlp_dim"], kw["patch_size"], "vision_model."
    n_pos = (kw["image_size"] // p) ** 2 + 1
    flat: dict[str, np.ndarray] = {}

    def put(key, path, shape, convert=np.asarray):
        v = sd.take(key, shape)
        if v is not None:
            flat[path] = convert(v).astype(np.float32)

    put(b + "embeddings.class_embedding", "class_embedding", (w,))
    put(b + "embeddings.patch_embedding.weight", "patch_embedding/kernel", (w, 3, p, p), conv_to_flax)
    put(b + "embeddings.position_embedding.weight", "position_embedding", (n_pos, w))
    for ours, theirs in (("pre_layrnorm", "pre_layrnorm"), ("post_layernorm", "post_layernorm")):
        put(f"{b}{theirs}.weight", f"{ours}/scale", (w,))
        put(f"{b}{theirs}.bias", f"{ours}/bias", (w,))
    for i in range(kw["layers"]):
        t, o = f"{b}encoder.layers.{i}.", f"layers_{i}/"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            put(f"{t}self_attn.{proj}.weight", f"{o}self_attn/{proj}/kernel", (w, w), linear_to_flax)
            put(f"{t}self_attn.{proj}.bias", f"{o}self_attn/{proj}/bias", (w,))
        for ln in ("layer_norm1", "layer_norm2"):
            put(f"{t}{ln}.weight", f"{o}{ln}/scale", (w,))
            put(f"{t}{ln}.bias", f"{o}{ln}/bias", (w,))
        put(f"{t}mlp.fc1.weight", f"{o}fc1/kernel", (m, w), linear_to_flax)
        put(f"{t}mlp.fc1.bias", f"{o}fc1/bias", (m,))
        put(f"{t}mlp.fc2.weight", f"{o}fc2/kernel", (w, m), linear_to_flax)
        put(f"{t}mlp.fc2.bias", f"{o}fc2/bias", (w,))
    put("visual_projection.weight", "visual_projection/kernel", (kw["projection_dim"], w), linear_to_flax)
    if b + "embeddings.position_ids" in sd:
        sd.take(b + "embeddings.position_ids")
    return unflatten(flat)


def from_state_dict(tensors: Mapping[str, np.ndarray], cfg: Mapping[str, Any]) -> CLIPWeights:
    """A CLIPModel state dict + its config dict -> CLIPWeights (every tensor accounted for)."""
    if cfg.get("model_type") not in (None, "clip") or "vision_config" not in cfg:
        raise CheckpointError(f"config is a {cfg.get('model_type')!r} config, not a CLIPModel's (needs vision_config)")
    vkw, tkw = vision_config(cfg), text_config(cfg)
    text_keys = {k: v for k, v in tensors.items() if k.startswith(("text_model.", "text_projection."))}
    vision = StrictStateDict({k: v for k, v in tensors.items() if k not in text_keys}, what="CLIP vision weights")
    vparams = vision_from_torch(vision, vkw)
    vision.finish(ignore=("logit_scale",))
    tparams = clip_text.from_diffusers(StrictStateDict(text_keys, what="CLIP text weights"), tkw)
    return CLIPWeights(vkw, vparams, tkw, tparams)


def load_clip_folder(path: str | os.PathLike) -> CLIPWeights:
    """A transformers CLIP folder (config.json + model.safetensors | pytorch_model.bin) -> CLIPWeights."""
    folder = pathlib.Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a transformers CLIP folder (no config.json)")
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder} has no weights ({' or '.join(WEIGHT_FILES)})")
    out = from_state_dict(load_state_dict(weights), json.loads((folder / "config.json").read_text()))
    out.folder = folder
    return out
