"""Device mesh, logical-axis rules and sharded-state helpers.

One table maps the logical names that parameters and activations carry (see
`ldm_jax.models.layers`) to the mesh axes `data`, `fsdp`, `tensor`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("norm", None),
    ("kernel_h", None),
    ("kernel_w", None),
    ("table", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("height", None),
    ("width", None),
    ("channels", None),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one -1 entry takes the devices left over. Axes are Auto (pjit style)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != 3:
        raise ValueError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    known = int(np.prod([s for s in shape if s != -1]))
    if any(s == 0 or s < -1 for s in shape) or len(devices) % known:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} does not divide the {len(devices)} devices")
    shape = [len(devices) // known if s == -1 else s for s in shape]
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_sharding(abstract_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
    """NamedShardings for a tree of (possibly boxed) abstract values that carry logical names.

    A dimension that the mesh axes it maps to do not divide (an RGB conv's 3 input channels, say)
    is replicated instead of failing.
    """
    specs = nn.get_partition_spec(abstract_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    values = nn.meta.unbox(abstract_tree)
    return jax.tree_util.tree_map(lambda v, s: _divisible(v.shape, s, mesh), values, shardings)


def _divisible(shape: tuple[int, ...], sharding: NamedSharding, mesh: Mesh) -> NamedSharding:
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for i, axes in enumerate(spec):
        if axes is None:
            continue
        size = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
        if shape[i] % size:
            spec[i] = None
    return NamedSharding(mesh, P(*spec))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch axis split over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, P())
