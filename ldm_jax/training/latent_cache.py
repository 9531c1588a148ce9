"""The LDM objective's dataset from cached first-stage latents (`data.cache=DIR`, see `ldm_jax.data.latent_cache`).

Encodes the train split once with the configured (frozen) first stage — loaded here from
`first_stage.checkpoint`, exactly as `ldm_io.load_pretrained` loads it into the state — and returns a
`CachedIterator` over the posterior mean/std. The LDM step then skips the encoder
(`LDMObjective.latents` reads "latent_mean"/"latent_std" from the batch).
"""
from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from ldm_jax.data import latent_cache as lc
from ldm_jax.data.pipeline import _caption, crop_and_flip, data_source, decode_image
from ldm_jax.training import ldm_io
from ldm_jax.training.objective import ConfigError

log = logging.getLogger("ldm_jax.train")


def check_cacheable(config: Any) -> None:
    """Only one view per image is stored: refuse augmentations that would make every epoch differ."""
    d = config.data
    if d.flip:
        raise ConfigError("data.cache stores one view per image: set data.flip=False (or data.cache='')")
    if d.crop == "random" and d.source != "shapes":  # shapes images are drawn at the resolution: no crop happens
        raise ConfigError("data.cache stores one view per image: set data.crop=center (or data.cache='')")
    if str(config.first_stage.checkpoint) in ("", "random"):
        raise ConfigError("data.cache needs a trained first stage (first_stage.checkpoint); a random one is not cached")


def first_stage_identity(config: Any) -> dict[str, Any]:
    """What names the first stage: its checkpoint files (path, sizes, mtimes) and kwargs."""
    return {"checkpoint": lc.file_identity(config.first_stage.checkpoint),
            "kwargs": config.first_stage.kwargs.to_dict()}


def _reader(config: Any):
    source = data_source(config.data, "train")
    d = config.data

    def read(indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = [source[int(i)] for i in indices]
        out = {"image": np.stack([crop_and_flip(decode_image(r[d.image_key], d.resolution), d.resolution, None,
                                                random_crop=False, flip=False) for r in rows])}
        if d.caption_key:
            out["caption"] = np.asarray([_caption(r, d.caption_key, None) for r in rows])  # the first one
        if d.label_key:
            out["label"] = np.asarray([int(r[d.label_key]) for r in rows], np.int32)
        return out

    return source, read


def _encoder(objective: Any, params: Any, batch: int):
    def moments(p, x):  # KL: the posterior's mean and std; VQ: the deterministic latents and std 0
        return objective.first_stage.apply({"params": p}, x, method="latent_moments")

    fn = jax.jit(moments)

    def encode(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = [jax.device_get(fn(params, images[i:i + batch])) for i in range(0, len(images), batch)]
        return np.concatenate([m for m, _ in parts]), np.concatenate([s for _, s in parts])

    return encode


def cache_for(objective: Any) -> lc.LatentCache:
    """The cache folder this config's first stage and data map to (not built)."""
    c = objective.config
    key = lc.cache_key(first_stage_identity(c), c.data.to_dict())
    return lc.LatentCache(c.data.cache, key, meta={"first_stage": first_stage_identity(c), "data": c.data.to_dict()})


def cached_dataset(objective: Any, mesh: Any) -> lc.CachedIterator:
    """Builds this process's share of the cache if needed (resumable) and iterates it."""
    c = objective.config
    check_cacheable(c)
    cache = cache_for(objective)
    pi, pc = jax.process_index(), jax.process_count()
    if not cache.done(pi):
        abstract = jax.eval_shape(lambda: nn.unbox(objective.init(jax.random.key(0))))["frozen"]["first_stage"]
        params = ldm_io.load_first_stage(c, objective.first_stage, abstract)
        source, read = _reader(c)
        log.info("caching first-stage latents of %d examples in %s", len(source), cache.directory)
        cache.build(len(source), read, _encoder(objective, params, 256), chunk=int(c.data.get("cache_chunk", 1024)),
                    process_index=pi, process_count=pc, progress=bool(c.progress) and pi == 0)
    return lc.CachedIterator(cache.load(pi), mesh, int(c.global_batch_size), seed=int(c.seed),
                             shuffle=bool(c.data.shuffle), tokenizer=objective.tokenizer,
                             meta={"key": cache.key})
