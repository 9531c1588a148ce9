"""SDXL's text towers in and out of diffusers folders and Stability single files; model-family detection.

An SDXL model has two text towers (base: CLIP ViT-L/14 `text_encoder` + OpenCLIP ViT-bigG/14
`text_encoder_2`; refiner: bigG only). `Pretrained.text_kwargs` is then `{"encoders": {name: kwargs}}`
(`ldm_jax.models.text.TextEncoders`), `params["text"]` is `{name: params}` and `tokenizer_dir` is
`{name: folder}`. Both towers are used at their penultimate layer without the final LayerNorm, which is
SDXL's convention rather than a fact of the transformers checkpoint, so it is set here on load and
undone on save (the files are plain `CLIPTextModel` / `CLIPTextModelWithProjection`).

Single files (Stability's `sd_xl_base_1.0.safetensors` layout): `conditioner.embedders.N.` holds the
towers in order; CLIP-L in the transformers layout under `transformer.`, bigG in the OpenCLIP layout
under `model.` (fused `in_proj`, `text_projection`, `ln_final`); the refiner's file has bigG as embedder 0.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ldm_jax.interop import clip
from ldm_jax.interop.common import StrictStateDict

CONDITIONER = "conditioner.embedders."
TOWERS = ("text_encoder", "text_encoder_2")
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
SDXL_TEXT = dict(output_layer=-2, final_norm=False)  # hidden_states[-2], no final LayerNorm
SCALE_FACTOR = 0.13025
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", scale_factor=SCALE_FACTOR, class_name="EulerDiscreteScheduler")
FAMILIES = ("sd1", "sd2", "sdxl-base", "sdxl-refiner", "ldm")


def is_sdxl_text(text_kwargs: Mapping[str, Any] | None) -> bool:
    """Whether text kwargs describe a multi-tower (SDXL) conditioner."""
    return text_kwargs is not None and "encoders" in text_kwargs


def tower_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers folder tower's config.json -> its kwargs as SDXL uses it."""
    return {**clip.config_from_diffusers(cfg), **SDXL_TEXT}


def plain(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The tower's kwargs as a transformers checkpoint stores it (the last layer, final LayerNorm)."""
    return {**kwargs, "output_layer": -1, "final_norm": True}


# ------------------------------------------------------------------------------------------- single files
def single_file_towers(tensors: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """{tower name: (prefix, layout)} of the text towers in an SGM single file, in embedder order."""
    found: dict[str, tuple[str, str]] = {}
    idx = sorted({int(k[len(CONDITIONER):].split(".")[0]) for k in tensors if k.startswith(CONDITIONER)})
    for i in idx:
        prefix = f"{CONDITIONER}{i}."
        layout = clip.compvis_layout(tensors, prefix)
        if layout is None:
            continue  # parameter-free embedders (the micro-conditioning's ConcatTimestepEmbedderND) hold no tensors
        found["text_encoder" if layout == "hf" else "text_encoder_2"] = (prefix, layout)
    return found


def text_config_from_single_file(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """`{"encoders": ...}` inferred from the shapes of an SGM single file's conditioner."""
    towers = single_file_towers(tensors)
    if not towers:
        raise KeyError(f"no text tower under {CONDITIONER}N. (looked for transformer.text_model. and model.)")
    enc = {name: {**clip.config_from_compvis(tensors, prefix), **SDXL_TEXT} for name, (prefix, _) in towers.items()}
    return {"encoders": {n: enc[n] for n in TOWERS if n in enc}}


def load_single_file_text(sd: StrictStateDict, text_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Params of every tower of `text_kwargs` from an SGM single file (each tower all-or-nothing)."""
    towers = single_file_towers(sd.tensors)
    out = {}
    for name, kw in text_kwargs["encoders"].items():
        if name not in towers:
            raise KeyError(f"the single file has no {name} tower under {CONDITIONER}N.")
        prefix, layout = towers[name]
        out[name] = clip.from_compvis(sd, kw, prefix, layout=layout)
    # nothing else may sit in the conditioner but OpenCLIP's unused logit_scale / attn_mask buffers
    sd.finish(CONDITIONER, ignore=tuple(f"{prefix}model.{b}" for prefix, _ in towers.values()
                                        for b in ("logit_scale", "attn_mask")))
    return out


def save_single_file_text(params: Mapping[str, Any], text_kwargs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """SGM single-file tensors of the towers: CLIP-L in the transformers layout, bigG in the OpenCLIP one."""
    out: dict[str, np.ndarray] = {}
    for i, (name, kw) in enumerate(text_kwargs["encoders"].items()):
        layout = "hf" if name == "text_encoder" else "open_clip"
        out.update(clip.to_compvis(params[name], kw, f"{CONDITIONER}{i}.", layout=layout))
    return out


# ------------------------------------------------------------------------------------------- families
def family(unet_kwargs: Mapping[str, Any], text_kwargs: Mapping[str, Any] | None) -> str:
    """"sd1", "sd2", "sdxl-base", "sdxl-refiner" or "ldm" (anything else), from what the tensors showed.

    SDXL: vector conditioning plus two towers (base) or bigG alone (refiner); SD1/SD2: one causal CLIP
    tower whose width is the UNet's context, told apart by its activation (the text layouts differ too).
    """
    if unet_kwargs.get("adm_in_channels") is not None and is_sdxl_text(text_kwargs):
        return "sdxl-base" if "text_encoder" in text_kwargs["encoders"] else "sdxl-refiner"
    if text_kwargs is not None and not is_sdxl_text(text_kwargs) and text_kwargs.get("causal", True) \
            and unet_kwargs.get("context_dim") == text_kwargs.get("width"):
        # a CLIP tower feeding the UNet's cross-attention: OpenAI CLIP (quick_gelu, SD1) or OpenCLIP (gelu, SD2)
        return "sd2" if text_kwargs.get("act") == "gelu" else "sd1"
    return "ldm"
