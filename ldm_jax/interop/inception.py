"""FID InceptionV3 weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` <-> our Flax params.

    python -m ldm_jax.interop.inception OUT.safetensors pt_inception-2015-12-05-6726825d.pth

The .pth is the state dict of pytorch-fid's `fid_inception_v3()` (torchvision InceptionV3 layout,
`Mixed_5b.branch1x1.conv.weight`, `...bn.running_mean`, ...). `fc.*` (the 1008-way classifier) and
the `num_batches_tracked` counters are not needed for pool3 features and are dropped; every other
tensor must be there with its shape. Our .safetensors keeps the torch layout and names, so it is also
readable by pytorch-fid after `torch.load`-free conversion back (`to_torch`). Reading .pth needs torch.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import jax
import numpy as np

from ldm_jax.interop.common import (
    StrictStateDict,
    conv_to_flax,
    conv_to_torch,
    flatten,
    load_state_dict,
    save_safetensors,
    unflatten,
)
from ldm_jax.models.inception import FIDInceptionV3

FORMAT = "pt_inception-2015-12-05"
_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_IGNORED = ("fc.", "AuxLogits.")


def _torch_key(path: str) -> str:
    """Our flat path -> the torch key (`Mixed_5b/branch1x1/conv/kernel` -> `Mixed_5b.branch1x1.conv.weight`)."""
    *mod, leaf = path.split("/")
    return ".".join(mod + ["weight" if leaf == "kernel" else _BN[leaf]])


def param_shapes() -> dict[str, tuple[int, ...]]:
    """Our flat parameter paths -> shapes (no weights are made)."""
    shapes = jax.eval_shape(lambda: FIDInceptionV3().init(jax.random.key(0), np.zeros((1, 75, 75, 3), np.float32)))
    return {k: tuple(v.shape) for k, v in flatten(shapes["params"]).items()}


def torch_shapes() -> dict[str, tuple[int, ...]]:
    """The torch state-dict keys (without fc / num_batches_tracked) -> torch shapes."""
    out = {}
    for path, shape in param_shapes().items():
        out[_torch_key(path)] = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
    return out


def random_state_dict(seed: int) -> dict[str, np.ndarray]:
    """Deterministic random torch-layout weights (for tests and benchmarks without the real file).

    NumPy's PCG64 draws in sorted key order, so PyTorch and JAX sides build the same network from a seed:
    He-normal convolutions and BatchNorm statistics near identity keep the activations O(1) through all layers.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in sorted(torch_shapes().items()):
        if key.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            out[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        elif key.endswith(("bn.weight", "running_var")):
            out[key] = rng.uniform(0.8, 1.2, shape).astype(np.float32)
        else:
            out[key] = rng.uniform(-0.1, 0.1, shape).astype(np.float32)
    return out


def from_torch(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """pytorch-fid's FID Inception state dict -> {'params': ...} for `FIDInceptionV3`."""
    sd = StrictStateDict(tensors, what="FID Inception weights")
    flat = {}
    for path, shape in param_shapes().items():
        torch_shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
        v = sd.take(_torch_key(path), torch_shape)
        if v is not None:
            flat[path] = (conv_to_flax(v) if len(shape) == 4 else np.asarray(v)).astype(np.float32)
    sd.finish(ignore=_IGNORED + tuple(k for k in tensors if k.endswith("num_batches_tracked")))
    return {"params": unflatten(flat)}


def to_torch(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{'params': ...} -> the torch-layout dict (fc and counters omitted)."""
    params = variables.get("params", variables)
    return {_torch_key(p): (conv_to_torch(v) if np.ndim(v) == 4 else np.asarray(v, np.float32))
            for p, v in flatten(params).items()}


def load_inception_params(path: str | os.PathLike) -> dict[str, Any]:
    """Reads pytorch-fid's .pth (needs torch) or our converted .safetensors -> FIDInceptionV3 variables."""
    return from_torch(load_state_dict(path))


def save_inception_safetensors(variables: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes FIDInceptionV3 variables as a torch-layout .safetensors (readable by `load_inception_params`)."""
    save_safetensors(to_torch(variables), path, metadata={"format": FORMAT})


def main(argv: Iterable[str] | None = None) -> None:
    """CLI: python -m ldm_jax.interop.inception OUT.safetensors pt_inception-2015-12-05-6726825d.pth"""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        raise SystemExit("usage: python -m ldm_jax.interop.inception OUT.safetensors pt_inception-2015-12-05-6726825d.pth")
    try:
        variables = load_inception_params(args[1])
    except (OSError, ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None
    save_inception_safetensors(variables, args[0])
    print(f"wrote {args[0]}")


if __name__ == "__main__":
    main()
