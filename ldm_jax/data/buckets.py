"""Aspect-ratio buckets (the Stable Diffusion fine-tuning standard: NovelAI's bucketing, kohya, SDXL).

Images keep their shape instead of being cropped square: each is resized to cover the bucket whose aspect ratio is
nearest its own and cropped to it. Buckets have (about) the area of `resolution`², sides in multiples of `step`
(64 px: 8 latent pixels of a kl-f8 VAE) and aspect ratios within [1/max_aspect, max_aspect], so a run compiles at
most `len(buckets)` step shapes. Every global batch comes from one bucket; which bucket each batch comes from is
drawn per epoch from (seed, epoch), so the stream — and its resume point — is fixed by the seed. Each example
records SDXL's micro-conditioning (Podell et al. 2023, arXiv 2307.01952, §2.2): `original_size` (h, w) of the
image on disk, `crop_top_left` (top, left) of the crop in the resized image, `target_size` (h, w) of the bucket.
"""
from __future__ import annotations

import io
import math
from typing import Any, Callable

import numpy as np

Bucket = tuple[int, int]  # (height, width)


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[Bucket]:
    """Equal-area buckets: for each width (a multiple of `step`), the tallest multiple-of-`step` height whose area
    stays within resolution², kept when its aspect ratio is within [1/max_aspect, max_aspect]; sorted by aspect."""
    if resolution < 2 * step or resolution % step:
        raise ValueError(f"aspect buckets need data.resolution ({resolution}) to be a multiple of data.bucket_step "
                         f"({step}) and at least twice it")
    if max_aspect < 1:
        raise ValueError(f"data.bucket_max_aspect must be >= 1, got {max_aspect}")
    area = resolution * resolution
    out = set()
    for w in range(step, int(resolution * math.sqrt(max_aspect)) + step, step):
        h = (area // w) // step * step
        if h >= step and 1 / max_aspect <= w / h <= max_aspect:
            out.add((h, w))
            out.add((w, h))
    return sorted(out, key=lambda b: (b[1] / b[0], b[0]))


def nearest_bucket(buckets: list[Bucket], height: int, width: int) -> int:
    """Index of the bucket whose aspect ratio is nearest (in log ratio) to the image's."""
    target = math.log(width / height)
    return int(np.argmin([abs(math.log(w / h) - target) for h, w in buckets]))


def image_size(data: bytes | np.ndarray) -> tuple[int, int]:
    """(height, width) of an encoded image from its header only (or of a decoded array)."""
    if isinstance(data, np.ndarray):
        return int(data.shape[0]), int(data.shape[1])
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    return int(h), int(w)


def resize_and_crop(image: np.ndarray, bucket: Bucket, rng: np.random.Generator | None, *, random_crop: bool,
                    flip: bool) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize `image` (uint8 HWC) to cover `bucket` and crop it there: (crop, (top, left) in the resized image)."""
    from PIL import Image

    bh, bw = bucket
    h, w = image.shape[:2]
    scale = max(bh / h, bw / w)
    size = (max(bw, round(w * scale)), max(bh, round(h * scale)))
    if size != (w, h):
        resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
        image = np.asarray(Image.fromarray(image).resize(size, resample=resample))
    h, w = image.shape[:2]
    if random_crop and rng is not None:
        top, left = int(rng.integers(h - bh + 1)), int(rng.integers(w - bw + 1))
    else:
        top, left = (h - bh) // 2, (w - bw) // 2
    image = image[top:top + bh, left:left + bw]
    if flip and rng is not None and rng.random() < 0.5:
        image = image[:, ::-1]
    return np.ascontiguousarray(image), (top, left)


class BucketPlan:
    """Which examples make global batch k: batch k of epoch k // per_epoch, drawn from (seed, epoch)."""

    def __init__(self, assignment: np.ndarray, num_buckets: int, global_batch: int, seed: int, shuffle: bool):
        self.members = [np.flatnonzero(assignment == b) for b in range(num_buckets)]
        self.global_batch, self.seed, self.shuffle = global_batch, seed, shuffle
        self.batches_per_bucket = [len(m) // global_batch for m in self.members]
        self.per_epoch = sum(self.batches_per_bucket)
        self._cache: tuple[int, list[tuple[int, np.ndarray]]] | None = None

    def epoch(self, e: int) -> list[tuple[int, np.ndarray]]:
        """The (bucket, example indices) of every global batch of epoch `e`, in order."""
        if self._cache is not None and self._cache[0] == e:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, e])
        batches = []
        for b, members in enumerate(self.members):
            order = rng.permutation(members) if self.shuffle else members
            for j in range(self.batches_per_bucket[b]):
                batches.append((b, order[j * self.global_batch:(j + 1) * self.global_batch]))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (e, batches)
        return batches

    def batch(self, k: int) -> tuple[int, np.ndarray]:
        return self.epoch(k // self.per_epoch)[k % self.per_epoch]


class BucketBatchLoader:
    """grain map from a global batch number to this process's rows of it, preprocessed at the batch's bucket."""

    def __init__(self, source: Any, plan: BucketPlan, buckets: list[Bucket], preprocess_example: Callable,
                 process_index: int, process_count: int, seed: int):
        self.source, self.plan, self.buckets = source, plan, buckets
        self.preprocess_example = preprocess_example
        self.process_index, self.process_count, self.seed = process_index, process_count, seed

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        bucket, idx = self.plan.batch(int(k))
        local = len(idx) // self.process_count
        rows = idx[self.process_index * local:(self.process_index + 1) * local]
        examples = []
        for i in rows:
            rng = np.random.default_rng([self.seed, int(k), int(i)])
            examples.append(self.preprocess_example(self.source[int(i)], self.buckets[bucket], rng))
        return {key: np.stack([ex[key] for ex in examples]) for key in examples[0]}
