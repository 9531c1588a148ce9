"""LPIPS (VGG16) weights: convert the `lpips` package's / torchvision's files to our Flax params and back.

Accepted inputs, any mix, merged in order (a later file must not repeat a key):
  * torchvision `vgg16` state dict (`features.N.weight|bias`; `classifier.*` is ignored), as .pth or .safetensors;
  * the `lpips` package's linear heads, `lpips/weights/v0.1/vgg.pth` (`linK.model.1.weight`);
  * a whole LPIPS state dict as saved by the `lpips` package or taming-transformers' `vgg.pth`
    (`net.sliceS.N.weight|bias`, `linK.model.1.weight`, `scaling_layer.*`).
Our own file (`save_lpips_safetensors`) is the merged torch-layout dict in one .safetensors:
`features.N.weight|bias` (OIHW) and `linK.model.1.weight` (1, C, 1, 1). Reading .pth files needs torch.
"""
from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ldm_jax.interop.common import (
    CheckpointError,
    StrictStateDict,
    conv_to_flax,
    conv_to_torch,
    load_state_dict,
    save_safetensors,
)
from ldm_jax.models.lpips import LPIPS_CHANNELS, SCALE, SHIFT, VGG16_CFG, vgg16_conv_indices

_SLICE = re.compile(r"^(?:perceptual_loss\.|loss\.perceptual_loss\.)?net\.slice\d\.(\d+)\.(weight|bias)$")
_FEAT = re.compile(r"^(?:features)\.(\d+)\.(weight|bias)$")
_LIN = re.compile(r"^(?:perceptual_loss\.|loss\.perceptual_loss\.)?lin(\d)\.model\.[01]\.weight$")


def _conv_shapes() -> dict[int, tuple[int, int]]:
    """features index -> (in, out) channels of torchvision vgg16's convolutions."""
    shapes, cin = {}, 3
    widths = [c for c in VGG16_CFG if c != "M"]
    for idx, cout in zip(vgg16_conv_indices(), widths):
        shapes[idx] = (cin, int(cout))
        cin = int(cout)
    return shapes


def canonical_keys(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames the accepted layouts to `features.N.*` / `linK.model.1.weight`; drops classifier/scaling buffers."""
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if m := _SLICE.match(key) or _FEAT.match(key):
            new = f"features.{m.group(1)}.{m.group(2)}"
        elif m := _LIN.match(key):
            new = f"lin{m.group(1)}.model.1.weight"
        elif key.startswith("classifier."):
            continue
        elif key.endswith("scaling_layer.shift") or key.endswith("scaling_layer.scale"):
            want = SHIFT if key.endswith("shift") else SCALE
            if not np.allclose(np.asarray(value).reshape(-1), want, atol=1e-6):
                raise CheckpointError(f"{key} = {np.asarray(value).reshape(-1)} differs from LPIPS v0.1's {want}")
            continue
        else:
            new = key  # left for StrictStateDict to report as unexpected
        if new in out:
            raise CheckpointError(f"LPIPS weights give {new} twice (once as {key})")
        out[new] = np.asarray(value)
    return out


def from_torch(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """A torch-layout LPIPS/VGG16 state dict (see module doc) -> params for `ldm_jax.models.lpips.LPIPS`."""
    sd = StrictStateDict(canonical_keys(tensors), what="LPIPS weights")
    net: dict[str, Any] = {}
    for idx, (cin, cout) in _conv_shapes().items():
        w = sd.take(f"features.{idx}.weight", (cout, cin, 3, 3))
        b = sd.take(f"features.{idx}.bias", (cout,))
        if w is not None and b is not None:
            net[f"features_{idx}"] = {"kernel": conv_to_flax(w).astype(np.float32), "bias": b.astype(np.float32)}
    params: dict[str, Any] = {"net": net}
    for k, c in enumerate(LPIPS_CHANNELS):
        w = sd.take(f"lin{k}.model.1.weight", (1, c, 1, 1))
        if w is not None:
            params[f"lin{k}"] = {"kernel": conv_to_flax(w).astype(np.float32)}
    # Layers after relu5_3 (features.30 is the last max-pool, no weights) never appear; anything else is unexpected.
    if sd.missing and all(k.startswith("lin") for k in sd.missing):
        raise CheckpointError(
            f"LPIPS weights lack the linear heads {sd.missing}; pass the lpips package's "
            "lpips/weights/v0.1/vgg.pth as well as the torchvision VGG16 weights"
        )
    if sd.missing and all(k.startswith("features") for k in sd.missing):
        raise CheckpointError(
            f"LPIPS weights lack the VGG16 trunk ({len(sd.missing)} tensors, e.g. {sd.missing[0]}); pass torchvision's "
            "vgg16 weights file (vgg16-397923af.pth) as well as the linear heads"
        )
    sd.finish()
    return params


def to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our LPIPS params -> the torch-layout dict that `save_lpips_safetensors` writes."""
    out: dict[str, np.ndarray] = {}
    for idx in _conv_shapes():
        layer = params["net"][f"features_{idx}"]
        out[f"features.{idx}.weight"] = conv_to_torch(layer["kernel"])
        out[f"features.{idx}.bias"] = np.asarray(layer["bias"])
    for k in range(len(LPIPS_CHANNELS)):
        out[f"lin{k}.model.1.weight"] = conv_to_torch(params[f"lin{k}"]["kernel"])
    return out


def load_lpips_params(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Reads one or more weight files (see module doc), merges them and converts them to LPIPS params."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [p for p in str(paths).split(",") if p]
    if not paths:
        raise ValueError("no LPIPS weight files given")
    merged: dict[str, np.ndarray] = {}
    for path in paths:
        tensors = canonical_keys(load_state_dict(path))
        clash = sorted(set(tensors) & set(merged))
        if clash:
            raise CheckpointError(f"{path} repeats LPIPS tensors given by an earlier file: {clash[:4]}")
        merged.update(tensors)
    return from_torch(merged)


def save_lpips_safetensors(params: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes LPIPS params as one .safetensors in torch layout (readable by `load_lpips_params`)."""
    save_safetensors(to_torch(params), path, metadata={"format": "lpips-vgg-v0.1"})


def main(argv: Iterable[str] | None = None) -> None:
    """CLI: python -m ldm_jax.interop.lpips OUT.safetensors vgg16-397923af.pth lpips/weights/v0.1/vgg.pth"""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        raise SystemExit("usage: python -m ldm_jax.interop.lpips OUT.safetensors WEIGHTS [WEIGHTS ...]")
    save_lpips_safetensors(load_lpips_params(args[1:]), args[0])
    print(f"wrote {args[0]}")


if __name__ == "__main__":
    main()
