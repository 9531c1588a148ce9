"""Weights in and out: diffusers folders, CompVis/SD single files, transformers CLIP text models.

Whole pipelines: `load_diffusers`, `load_single_file`, `save_diffusers`, `save_single_file` -> `Pretrained`.
Per model (same function names in each): `ldm_jax.interop.unet`, `.vae`, `.clip`.
"""
from ldm_jax.interop.common import CheckpointError, StrictStateDict, load_safetensors, load_state_dict, save_safetensors
from ldm_jax.interop.pretrained import (
    Pretrained,
    load_diffusers,
    load_single_file,
    load_text_encoder,
    save_diffusers,
    save_single_file,
)

__all__ = [
    "CheckpointError",
    "Pretrained",
    "StrictStateDict",
    "load_diffusers",
    "load_safetensors",
    "load_single_file",
    "load_state_dict",
    "load_text_encoder",
    "save_diffusers",
    "save_safetensors",
    "save_single_file",
]
