"""Cached first-stage latents: encode a dataset once with a frozen first stage, then train from the cache.

`data.cache=DIR` (LDM training): the train split is encoded once into DIR/<key>/ as the posterior's
mean and std per image (so drawing z = mean + std·ε in the step stays exactly LDM's posterior sample;
`first_stage.sample_posterior=False` uses the mean), with each example's caption and label. The key is
a hash of the first stage's identity (checkpoint path, its step or file size/mtime, kwargs) and of the
data config, so a new first stage or other data builds a new cache next to the old one.

Writing is resumable: each process encodes its share of the examples (every `process_count`-th, as
`data.pipeline.local_dataset` splits them) in chunks, each written atomically (tmp file + rename) as
`p<process>-<chunk>.npz`; a rerun skips the chunks already there, and `p<process>.done` marks a
finished share. Reading: every process loads only its own share and iterates it in a fresh
permutation per epoch (seeded by (seed, epoch)); batches are global arrays sharded over (data, fsdp),
with an exact position for checkpoints (`get_state`/`set_state`).

Only deterministic preprocessing can be cached (one stored view per image): random flips are refused.
The batch has "latent_mean", "latent_std" ((B, h, w, c) float32), "input_ids" (tokenized when loaded,
so the cache does not depend on the tokenizer) and "label" when the dataset has them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from ldm_jax.sharding import batch_sharding

log = logging.getLogger("ldm_jax.data")

FORMAT = 1
STATE_VERSION = 1
# data-config keys that change how examples are read, not which ones: not part of the key
_RUNTIME_KEYS = ("num_threads", "read_buffer", "prefetch", "shuffle", "num_epochs", "cache", "cache_chunk")


def cache_key(first_stage: dict[str, Any], data_config: dict[str, Any]) -> str:
    """Hex digest naming the cache of `first_stage` (identity dict) on `data_config` (a plain dict)."""
    data = {k: v for k, v in data_config.items() if k not in _RUNTIME_KEYS}
    blob = json.dumps({"format": FORMAT, "first_stage": first_stage, "data": data}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def file_identity(path: str | pathlib.Path) -> dict[str, Any]:
    """Path, size and mtime of a file or of every file under a folder (a new checkpoint changes it)."""
    path = pathlib.Path(path).expanduser().resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {"path": str(path), "files": [(str(p.relative_to(path)) if p != path else p.name, p.stat().st_size,
                                          int(p.stat().st_mtime)) for p in files]}


class LatentCache:
    """One cache folder: DIR/<key>/ with meta.json, p<i>-<chunk>.npz chunks and p<i>.done markers."""

    def __init__(self, root: str | pathlib.Path, key: str, meta: dict[str, Any] | None = None):
        self.directory = pathlib.Path(root).expanduser() / key
        self.key, self.meta = key, dict(meta or {})

    def done(self, process_index: int) -> bool:
        return (self.directory / f"p{process_index}.done").exists()

    def build(self, num_examples: int, read: Callable[[np.ndarray], dict[str, np.ndarray]],
              encode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], *, chunk: int = 512,
              process_index: int = 0, process_count: int = 1, progress: bool = True) -> None:
        """Encodes this process's share of examples [0, num_examples) unless it is already complete.

        read(indices) -> {"image": uint8 (n, H, W, 3), ["caption": str (n,)], ["label": int (n,)]};
        encode(images in [-1, 1]) -> (mean, std), each (n, h, w, c).
        """
        if self.done(process_index):
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        if process_index == 0:
            _atomic_write(self.directory / "meta.json",
                          json.dumps({**self.meta, "key": self.key, "format": FORMAT, "num_examples": num_examples,
                                      "process_count": process_count}, indent=2, default=str).encode())
        mine = np.arange(process_index, num_examples, process_count)
        chunks = [mine[i:i + chunk] for i in range(0, len(mine), chunk)]
        todo = [c for c, idx in enumerate(chunks) if not self._chunk(process_index, c).exists()]
        if len(todo) < len(chunks):
            log.info("latent cache %s: resuming, %d of %d chunks already written", self.directory, len(chunks) - len(todo),
                     len(chunks))
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="caching latents", unit="chunk", dynamic_ncols=True)
        for c in todo:
            ex = read(chunks[c])
            mean, std = encode(np.asarray(ex.pop("image"), np.float32) * (1 / 127.5) - 1.0)
            arrays = {"index": chunks[c], "latent_mean": np.asarray(mean, np.float32),
                      "latent_std": np.asarray(std, np.float32), **{k: np.asarray(v) for k, v in ex.items()}}
            _atomic_save(self._chunk(process_index, c), arrays)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        _atomic_write(self.directory / f"p{process_index}.done", str(len(mine)).encode())

    def load(self, process_index: int = 0) -> dict[str, np.ndarray]:
        """This process's share, concatenated in index order."""
        if not self.done(process_index):
            raise FileNotFoundError(f"latent cache {self.directory} has no complete share for process {process_index}")
        files = sorted(self.directory.glob(f"p{process_index}-*.npz"))
        parts = [dict(np.load(f, allow_pickle=False)) for f in files]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _chunk(self, process_index: int, c: int) -> pathlib.Path:
        return self.directory / f"p{process_index}-{c:06d}.npz"


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def _atomic_save(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


class CachedIterator:
    """Global batches from a loaded cache share; a new permutation each epoch; exact `get_state`/`set_state`."""

    def __init__(self, arrays: dict[str, np.ndarray], mesh: Mesh, global_batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, tokenizer: Callable | None = None, meta: dict | None = None):
        nproc = jax.process_count()
        self.local_batch = global_batch_size // nproc
        if global_batch_size % nproc or len(arrays["latent_mean"]) < self.local_batch:
            raise ValueError(f"global batch {global_batch_size} does not fit {nproc} process(es) with "
                             f"{len(arrays['latent_mean'])} cached examples each")
        self.arrays = {k: v for k, v in arrays.items() if k in ("latent_mean", "latent_std", "label")}
        if tokenizer is not None and "caption" in arrays:
            self.arrays["input_ids"] = np.asarray(tokenizer([str(c) for c in arrays["caption"]]), np.int32)
        self.mesh, self.seed, self.shuffle = mesh, seed, shuffle
        self.meta = {"cache": True, "seed": seed, "global_batch_size": global_batch_size, "num_processes": nproc,
                     **(meta or {})}
        self.per_epoch = len(self.arrays["latent_mean"]) // self.local_batch
        self.position = 0  # batches returned so far

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.arrays["latent_mean"])
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __iter__(self) -> "CachedIterator":
        return self

    def __next__(self) -> dict[str, jax.Array]:
        epoch, b = divmod(self.position, self.per_epoch)
        rows = self._order(epoch)[b * self.local_batch:(b + 1) * self.local_batch]
        self.position += 1
        return {k: jax.make_array_from_process_local_data(batch_sharding(self.mesh, v.ndim), v[rows])
                for k, v in self.arrays.items()}

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "position": self.position, **self.meta}

    def set_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or not state.get("cache"):
            raise ValueError("the checkpoint's data position is not one of a latent cache (data.cache changed?)")
        self.position = int(state["position"])

    def close(self) -> None:
        pass

