"""Reference images and their cached feature statistics (the "real" side of FID/KID).

Images of a dataset split come through `ldm_jax.data` exactly as the model saw them in training
(resize the smaller side to `data.resolution`, center crop, no flip), so samples and references are
compared at the same resolution. A folder of images works too (`folder_images`).

Statistics are cached as pytorch-fid `.npz` files (plus the features, for KID) under a name that
says what made them; a cache file is written to a temporary name and renamed, so a run killed while
computing leaves no half-written statistics and the next run recomputes them.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Iterator

import numpy as np

from ldm_jax.data import pipeline as data_pipeline
from ldm_jax.data.builders import find_images
from ldm_jax.evaluation import fid

def dataset_images(data_config: Any, split: str = "test", num: int | None = None,
                   batch_size: int = 50) -> tuple[Iterator[np.ndarray], int]:
    """(iterator of uint8 (B, R, R, 3) batches, number of images) from a data config's split (center crop)."""
    source = data_pipeline.data_source(data_config, split)
    n = len(source) if num is None else min(int(num), len(source))
    if n == 0:
        raise ValueError(f"split {split!r} of data.source={data_config.source!r} has no images")
    res, key = int(data_config.resolution), data_config.image_key

    def gen():
        for start in range(0, n, batch_size):
            yield np.stack([
                data_pipeline.crop_and_flip(data_pipeline.decode_image(source[i][key], res), res, None,
                                            random_crop=False, flip=False)
                for i in range(start, min(start + batch_size, n))])

    return gen(), n


def folder_images(path: str | pathlib.Path, resolution: int | None = None, num: int | None = None,
                  batch_size: int = 50) -> tuple[Iterator[np.ndarray], int]:
    """(iterator of uint8 batches, count) from an image folder (recursive, sorted).

    Images of different sizes need `resolution` (smaller side resized, center crop, as the training data).
    """
    root = pathlib.Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root}")
    files = find_images(root)
    files = files[:num] if num else files
    if not files:
        raise ValueError(f"{root} has no image files")

    def read(p: pathlib.Path) -> np.ndarray:
        img = data_pipeline.decode_image(p.read_bytes())
        if resolution:
            img = data_pipeline.crop_and_flip(img, resolution, None, random_crop=False, flip=False)
        return img

    def gen():
        for start in range(0, len(files), batch_size):
            imgs = [read(p) for p in files[start:start + batch_size]]
            if len({im.shape for im in imgs}) > 1:
                raise ValueError(f"images in {root} differ in size ({sorted({im.shape for im in imgs})[:3]}...); "
                                 "pass --resolution to resize and center-crop them")
            yield np.stack(imgs)

    return gen(), len(files)


def png_prompts(path: str | pathlib.Path, num: int | None = None) -> list[str] | None:
    """The prompts our samplers store in each PNG's "ldm_jax" text chunk (folder order), or None if one lacks it."""
    from PIL import Image

    out = []
    for p in find_images(pathlib.Path(path).expanduser())[:num]:
        with Image.open(p) as im:
            meta = getattr(im, "text", {}).get("ldm_jax")
        prompt = json.loads(meta).get("prompt") if meta else None
        if prompt is None:
            return None
        out.append(prompt)
    return out


def cached_stats(path: str | pathlib.Path, compute: Callable[[], np.ndarray], describe: dict[str, Any]) -> fid.Stats:
    """The statistics at `path` if it was made for `describe`, else `compute()` features -> stats -> saved."""
    path = pathlib.Path(path)
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == describe:
        return fid.load_stats(path)
    stats = fid.feature_stats(compute(), keep_features=True)
    fid.save_stats(stats, path)
    tmp = meta_path.with_name(meta_path.name + ".tmp")
    tmp.write_text(json.dumps(describe, indent=1, sort_keys=True) + "\n")
    tmp.replace(meta_path)
    return stats
