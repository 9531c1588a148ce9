"""Feature extractors for FID/KID: the FID InceptionV3 with the reference resizes, batch-sharded over devices.

Resizes (`resize=`):
  * "pytorch_fid" (default): uint8 -> [0, 1] -> bilinear to 299x299 without antialiasing (torch's
    `F.interpolate(mode="bilinear", align_corners=False)`, which `jax.image.resize(antialias=False)` equals,
    edge clamping included) -> 2x - 1. This is pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)`.
  * "clean": clean-fid's "clean" mode: each channel resized as a float32 PIL image with bicubic filtering
    (PIL antialiases when shrinking), clipped to [0, 255], then (x - 128) / 128 as clean-fid's InceptionV3W.
    Runs on the host (PIL), so it is slower than the jitted bilinear path.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ldm_jax import sharding
from ldm_jax.interop.inception import load_inception_params
from ldm_jax.models.inception import FIDInceptionV3

RESIZES = ("pytorch_fid", "clean")
INCEPTION_SIZE = 299


def resize_pytorch_fid(images01: jax.Array, size: int = INCEPTION_SIZE) -> jax.Array:
    """(B, H, W, C) float -> (B, size, size, C): torch's bilinear, align_corners=False, no antialias."""
    b, _, _, c = images01.shape
    return jax.image.resize(images01, (b, size, size, c), "bilinear", antialias=False)


def resize_clean(images: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """(B, H, W, C) uint8 -> (B, size, size, C) float32 in [0, 255]: clean-fid's PIL-bicubic per-channel resize."""
    from PIL import Image

    images = np.asarray(images)
    out = np.empty((images.shape[0], size, size, images.shape[-1]), np.float32)
    for i, img in enumerate(images):
        for c in range(images.shape[-1]):
            ch = Image.fromarray(img[..., c].astype(np.float32), mode="F").resize((size, size), Image.BICUBIC)
            out[i, ..., c] = np.asarray(ch).clip(0, 255)
    return out


def check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 in [0, 255] (as read from PNG files), got {images.dtype}")
    return images


def fetch(x: jax.Array) -> np.ndarray:
    """A global array -> the full host array on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def batches(images: np.ndarray | Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Yields (<= batch_size, H, W, 3) chunks from an array or an iterable of batches/images."""
    if isinstance(images, np.ndarray):
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
        return
    buf: list[np.ndarray] = []
    for item in images:
        item = np.asarray(item)
        buf.extend(item if item.ndim == 4 else [item])
        while len(buf) >= batch_size:
            yield np.stack(buf[:batch_size])
            buf = buf[batch_size:]
    if buf:
        yield np.stack(buf)


@dataclasses.dataclass
class BatchedApply:
    """Runs `fn(params, x)` over a stream of host batches: padded to a multiple of the devices, batch-sharded.

    The last batch is padded by repeating its rows, so one compiled shape serves the whole run; the padded
    rows are dropped from the output.
    """

    fn: Callable[[Any, jax.Array], jax.Array]
    params: Any
    batch_size: int = 50
    mesh: Mesh | None = None

    def __post_init__(self):
        self.mesh = self.mesh if self.mesh is not None else sharding.make_mesh((-1, 1, 1))
        n_dev = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.batch_size = -(-int(self.batch_size) // n_dev) * n_dev
        rep = sharding.replicated(self.mesh)
        self.params = jax.tree_util.tree_map(lambda a: jax.device_put(a, rep), self.params)
        self._jit = jax.jit(self.fn, out_shardings=sharding.batch_sharding(self.mesh, 2))

    def one(self, x: np.ndarray) -> np.ndarray:
        """One host batch (<= batch_size rows) -> host outputs (same rows)."""
        n = len(x)
        if n > self.batch_size:
            raise ValueError(f"batch of {n} is larger than batch_size {self.batch_size}")
        idx = np.arange(self.batch_size) % n
        x = np.ascontiguousarray(x[idx])
        glob = jax.make_array_from_callback(x.shape, sharding.batch_sharding(self.mesh, x.ndim), lambda i: x[i])
        return fetch(self._jit(self.params, glob))[:n]

    def __call__(self, images: np.ndarray | Iterable[np.ndarray], *, total: int | None = None,
                 progress: bool = False, desc: str = "features") -> np.ndarray:
        chunks = batches(images, self.batch_size)
        if progress:
            from tqdm import tqdm

            if total is None and hasattr(images, "__len__"):
                total = len(images)
            bar = tqdm(total=total, desc=desc, unit="img")
        out = []
        for chunk in chunks:
            out.append(self.one(chunk))
            if progress:
                bar.update(len(chunk))
        if progress:
            bar.close()
        if not out:
            raise ValueError("no images to compute features of")
        return np.concatenate(out, axis=0)


def _inception_fn(model: FIDInceptionV3, resize: str) -> Callable[[Any, jax.Array], jax.Array]:
    def fn(variables, x):
        if resize == "pytorch_fid":
            x = resize_pytorch_fid(x.astype(jnp.float32) / 255.0) * 2.0 - 1.0
        else:  # already resized on the host by resize_clean
            x = (x - 128.0) / 128.0
        return model.apply(variables, x)

    return fn


class InceptionFeatures:
    """uint8 images (an (N, H, W, 3) array or an iterable of batches) -> (N, 2048) float32 pool3 features."""

    def __init__(self, variables: Any, *, resize: str = "pytorch_fid", batch_size: int = 50, mesh: Mesh | None = None,
                 precision: Any = jax.lax.Precision.HIGHEST):
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
        self.resize = resize
        self.model = FIDInceptionV3(precision=precision)
        self._apply = BatchedApply(_inception_fn(self.model, resize), variables, batch_size, mesh)

    @classmethod
    def from_file(cls, path: str, **kwargs: Any) -> "InceptionFeatures":
        """From pytorch-fid's .pth or our converted .safetensors (`python -m ldm_jax.interop.inception`)."""
        return cls(load_inception_params(path), **kwargs)

    def _prepare(self, batch: np.ndarray) -> np.ndarray:
        batch = check_images(batch)
        return resize_clean(batch) if self.resize == "clean" else batch

    def __call__(self, images: np.ndarray | Iterable[np.ndarray], *, total: int | None = None,
                 progress: bool = False) -> np.ndarray:
        if isinstance(images, np.ndarray):
            check_images(images)
            total = len(images)
        prepared = (self._prepare(b) for b in batches(images, self._apply.batch_size))
        return self._apply(prepared, total=total, progress=progress, desc="Inception features")

