"""Shared machinery for weight import/export: safetensors I/O, strict key accounting, layout transposes.

PyTorch stores Linear weights as (out, in) and Conv weights as (out, in, kh, kw); our Flax modules use
(in, out) and (kh, kw, in, out). Every converter goes through `StrictStateDict`, which records which
keys were used, so that a load fails naming every missing, unexpected or wrongly shaped tensor instead
of loading part of a model silently.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Iterable, Mapping

import numpy as np
from flax import traverse_util


class CheckpointError(ValueError):
    """A checkpoint does not match the model it is loaded into (names the offending keys)."""


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a .safetensors file into numpy arrays (bf16/fp16 are upcast to float32)."""
    from safetensors.numpy import load_file

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    return {k: _to_float32(v) for k, v in tensors.items()}


def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a pickled PyTorch .ckpt/.bin/.pt (needs torch); unwraps a Lightning 'state_dict'."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path} is a pickled PyTorch checkpoint; reading it needs torch (pip install torch), "
            "or convert it to .safetensors first"
        ) from e
    obj = torch.load(str(path), map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    out = {}
    for k, v in obj.items():
        if hasattr(v, "detach"):
            out[k] = v.detach().float().numpy() if v.is_floating_point() else v.detach().numpy()
    return out


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a .safetensors file, or a pickled torch checkpoint when torch is installed."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    return load_torch_checkpoint(path)


def save_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Writes numpy-convertible tensors to a .safetensors file (written to a temp name, then renamed)."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: _contiguous(np.asarray(v)) for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(arrays, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _contiguous(a: np.ndarray) -> np.ndarray:
    """C-contiguous without promoting 0-d arrays to 1-d (np.ascontiguousarray does; kohya's `.alpha` is 0-d)."""
    return np.ascontiguousarray(a) if a.ndim else a


def _to_float32(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "f" and a.dtype != np.float64:
        return a.astype(np.float32)
    if a.dtype.kind == "V":  # bfloat16 comes back as a void type from some numpy builds
        return np.asarray(a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return a


def linear_to_flax(w: np.ndarray) -> np.ndarray:
    """torch Linear (out, in) -> flax Dense (in, out); a 1x1 conv weight (out, in, 1, 1) is accepted too."""
    if w.ndim == 4:
        w = w[:, :, 0, 0]
    return np.ascontiguousarray(w.T)


def conv_to_flax(w: np.ndarray) -> np.ndarray:
    """torch Conv2d (out, in, kh, kw) -> flax Conv (kh, kw, in, out)."""
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def linear_to_torch(w: np.ndarray) -> np.ndarray:
    """flax Dense (in, out) -> torch Linear (out, in)."""
    return np.ascontiguousarray(np.asarray(w).T)


def conv_to_torch(w: np.ndarray) -> np.ndarray:
    """flax Conv (kh, kw, in, out) -> torch Conv2d (out, in, kh, kw)."""
    return np.ascontiguousarray(np.transpose(np.asarray(w), (3, 2, 0, 1)))


class StrictStateDict:
    """A torch-style state dict that records every key taken, for all-or-nothing loads.

    `take(key, shape=...)` returns the tensor and checks its shape; `finish(prefix)` raises a
    `CheckpointError` listing missing keys, unexpected keys (under `prefix`) and shape mismatches.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], what: str = "checkpoint"):
        self.tensors = dict(tensors)
        self.what = what
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.mismatched: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str, shape: Iterable[int] | None = None) -> np.ndarray | None:
        """The tensor under `key` (marked used), or None after recording it missing/mismatched."""
        if key not in self.tensors:
            self.missing.append(key)
            return None
        self.used.add(key)
        value = self.tensors[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            self.mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(shape)}")
            return None
        return value

    def finish(self, prefix: str = "", ignore: Iterable[str] = ()) -> None:
        """Raises if anything was missing, mismatched, or left unused under `prefix`."""
        ignore = tuple(ignore)
        unexpected = sorted(
            k for k in self.tensors if k.startswith(prefix) and k not in self.used and not k.startswith(ignore or ("\0",))
        )
        problems = []
        if self.missing:
            problems.append(f"missing {len(self.missing)}: {_clip(self.missing)}")
        if self.mismatched:
            problems.append(f"wrong shape {len(self.mismatched)}: {_clip(self.mismatched)}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)}: {_clip(unexpected)}")
        if problems:
            raise CheckpointError(f"{self.what} does not match the model; " + "; ".join(problems))


def _clip(keys: list[str], n: int = 12) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def flatten(params: Mapping[str, Any]) -> dict[str, Any]:
    """Flattens a (possibly boxed) parameter tree to {'a/b/c': array}."""
    from flax.core import meta

    params = meta.unbox(params)
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(params)).items()}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten`."""
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
