"""Text conditioning inputs: the tokenizer(s) of a loaded checkpoint (`resolve_tokenizer`), and SDXL's, shared by
sampling and training: several tokenizers on one prompt, and the micro-conditioning ids (Podell et al. 2023, arXiv 2307.01952, sec. 2.2-2.3) with diffusers' defaults.

Base models take 6 ids per image: original size (h, w), crop top-left (top, left), target size (h, w);
the refiner 5: original size, crop, aesthetic score. They reach the UNet through
`UNet.added_cond(pooled, ids)` as traced arrays, so new values never recompile.
"""
from __future__ import annotations

import inspect
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ldm_jax.data import tokenizers
from ldm_jax.interop import sdxl as sdxl_io

Tokenizer = Callable[[Sequence[str]], np.ndarray]
Size = tuple[int, int]


class MultiTokenizer:
    """One prompt through every tower's tokenizer: int32 ids (B, n towers, L), in the towers' order."""

    def __init__(self, tokenizers: Mapping[str, Tokenizer]):
        if not tokenizers:
            raise ValueError("MultiTokenizer needs at least one tokenizer")
        self.tokenizers = dict(tokenizers)
        lengths = {int(getattr(t, "max_length", 77)) for t in self.tokenizers.values()}
        if len(lengths) != 1:
            raise ValueError(f"the towers' tokenizers pad to different lengths {sorted(lengths)}")
        self.max_length = lengths.pop()

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return np.stack([np.asarray(t(texts), np.int32) for t in self.tokenizers.values()], axis=1)


def micro_ids(
    n_ids: int, height: int, width: int, *, original_size: Size | None = None, crops_coords_top_left: Size = (0, 0),
    target_size: Size | None = None, aesthetic_score: float = 6.0, negative_original_size: Size | None = None,
    negative_crops_coords_top_left: Size = (0, 0), negative_target_size: Size | None = None,
    negative_aesthetic_score: float = 2.5,
) -> tuple[np.ndarray, np.ndarray]:
    """(cond, uncond) float32 (n_ids,) micro-conditioning rows, as diffusers' SDXL pipelines build them.

    Defaults: original = target = the output (height, width), crop (0, 0). Base (6 ids): the negative row
    equals the positive one unless both negative sizes are given. Refiner (5 ids): the negative row takes
    the negative sizes (defaulting to the positive ones), the negative crop and `negative_aesthetic_score`.
    None (0 ids, a UNet whose `y` is the pooled text alone): two empty rows.
    """
    for name, v in (("original_size", original_size), ("crops_coords_top_left", crops_coords_top_left),
                    ("target_size", target_size), ("negative_original_size", negative_original_size),
                    ("negative_crops_coords_top_left", negative_crops_coords_top_left),
                    ("negative_target_size", negative_target_size)):
        if v is not None and (len(tuple(v)) != 2 or any(x < 0 for x in v)):
            raise ValueError(f"{name} must be a pair of non-negative numbers (h, w) / (top, left), got {v!r}")
    if n_ids == 0:  # a pooled-text-only UNet (adm_in_channels == the pooled width): no ids (added_inputs refuses any)
        return np.zeros((0,), np.float32), np.zeros((0,), np.float32)
    original = tuple(original_size or (height, width))
    target = tuple(target_size or (height, width))
    crop = tuple(crops_coords_top_left)
    if n_ids == 6:
        cond = (*original, *crop, *target)
        if negative_original_size is not None and negative_target_size is not None:
            uncond = (*negative_original_size, *negative_crops_coords_top_left, *negative_target_size)
        else:
            uncond = cond
    elif n_ids == 5:
        cond = (*original, *crop, aesthetic_score)
        uncond = (*(negative_original_size or original), *negative_crops_coords_top_left, negative_aesthetic_score)
    else:
        raise ValueError(f"SDXL micro-conditioning has 6 (base) or 5 (refiner) ids (or none: the pooled text alone), "
                         f"this UNet takes {n_ids}")
    return np.asarray(cond, np.float32), np.asarray(uncond, np.float32)


def n_micro_ids(adm_in_channels: int, pooled_dim: int, time_embed_dim: int) -> int:
    """How many micro-conditioning ids a UNet's added-conditioning width holds beside the pooled text."""
    n, rest = divmod(adm_in_channels - pooled_dim, time_embed_dim)
    if rest or n < 0:
        raise ValueError(f"adm_in_channels={adm_in_channels} is not the pooled width {pooled_dim} plus a "
                         f"multiple of addition_time_embed_dim={time_embed_dim}")
    return n  # 0: the pooled text alone (no micro-conditioning)


def handoff_steps(timesteps: np.ndarray, num_train_timesteps: int, *, denoising_end: float | None = None,
                  denoising_start: float | None = None) -> tuple[int, int]:
    """(first, last) step indices to run of a schedule whose steps sit at `timesteps` (descending), for
    diffusers' `denoising_end` (run while t >= T·(1 − end)) and `denoising_start` (run from t < T·(1 − start))."""
    first, last = 0, len(timesteps)
    for name, v in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if v is not None and not 0.0 < v < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {v}")
    if denoising_end is not None:
        cutoff = int(round(num_train_timesteps - denoising_end * num_train_timesteps))
        last = int(np.sum(timesteps >= cutoff))
    if denoising_start is not None:
        cutoff = int(round(num_train_timesteps - denoising_start * num_train_timesteps))
        first = len(timesteps) - int(np.sum(timesteps < cutoff))
    if last - first < 1:
        raise ValueError(f"denoising_start={denoising_start} / denoising_end={denoising_end} leave no step of "
                         f"{len(timesteps)}")
    return first, last


def added_inputs(unet: Any, text_encoder: Any, micro: Mapping[str, Any], height: int, width: int,
                 zero: bool) -> dict | None:
    """SDXL's traced extras of one generate() call: micro-conditioning rows {cond, uncond} (1, n) and keep (1,)
    of the negatives (0: force_zeros_for_empty_prompt); None for a UNet without added conditioning."""
    if unet.adm_in_channels is None or text_encoder is None:
        return None
    known = set(inspect.signature(micro_ids).parameters) - {"n_ids", "height", "width"}
    if set(micro) - known:
        raise TypeError(f"unknown generate() arguments {sorted(set(micro) - known)}; micro-conditioning takes "
                        f"{sorted(known)}")
    n_ids = n_micro_ids(unet.adm_in_channels, text_encoder.pooled_dim, unet.addition_time_embed_dim)
    if n_ids == 0 and micro:
        raise ValueError(f"this UNet's added conditioning is the pooled text alone (adm_in_channels = the pooled "
                         f"width): it takes no micro-conditioning, got {sorted(micro)}")
    cond, uncond = micro_ids(n_ids, height, width, **micro)
    return {"cond": cond[None], "uncond": uncond[None], "keep": np.full((1,), 0.0 if zero else 1.0, np.float32)}


def resolve_tokenizer(text_kwargs: Mapping[str, Any] | None, tokenizer_dir: Any, tokenizer: Any = None) -> Any:
    """The tokenizer of a loaded checkpoint: `tokenizer` (a folder or an object) if given, else its own folder(s);
    SDXL gets a `MultiTokenizer` (one per text tower); None for a model without text encoder."""
    tok = None
    towers = (text_kwargs or {}).get("encoders")
    if towers is not None:  # SDXL: one tokenizer per tower (a dict, or a diffusers SDXL folder for single files)
        dirs = tokenizer_dir
        if tokenizer is not None and isinstance(tokenizer, (str, os.PathLike)):
            root = pathlib.Path(tokenizer)
            dirs = {n: str(root / sdxl_io.TOKENIZERS[n]) for n in towers}
        elif tokenizer is not None:
            dirs = tokenizer
        if not dirs or set(dirs) != set(towers):
            raise ValueError(f"this SDXL checkpoint's towers {sorted(towers)} need their tokenizers: pass tokenizer="
                             "a diffusers SDXL folder (with tokenizer/ and tokenizer_2/) or {tower: tokenizer}")
        tok = MultiTokenizer({n: tokenizers.load_tokenizer(d) if isinstance(d, (str, os.PathLike)) else d
                              for n, d in ((n, dirs[n]) for n in towers)})
    elif text_kwargs is not None:
        if tokenizer is not None:
            tok = tokenizers.load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        elif tokenizer_dir is not None:
            tok = tokenizers.load_tokenizer(tokenizer_dir, max_length=int(text_kwargs.get("max_length", 77)))
        else:
            raise ValueError(
                "this checkpoint has a text encoder but no tokenizer files: pass tokenizer=PATH (a folder with "
                "CLIP's vocab.json and merges.txt, e.g. the tokenizer/ folder of a diffusers SD model)"
            )
    return tok
