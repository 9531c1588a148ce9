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


def mesh_from_config(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh from a config's `mesh` entry: a (data, fsdp, tensor) tuple or a dict with those keys; -1 fills."""
    if hasattr(mesh_cfg, "items"):
        unknown = set(mesh_cfg.keys()) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh has unknown axes {sorted(unknown)}; the axes are {MESH_AXES}")
        shape = tuple(int(mesh_cfg.get(a, 1)) for a in MESH_AXES)
    else:
        shape = tuple(int(s) for s in mesh_cfg)
    try:
        return make_mesh(shape, devices)
    except ValueError as e:
        n = len(jax.devices() if devices is None else devices)
        raise ValueError(f"{e}. Set --config.mesh so that data*fsdp*tensor = {n} (use -1 for one axis to fill).") from None


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Starts the multi-process JAX runtime when the environment asks for it; returns whether it did.

    Explicit values win; else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (set by
    `launch/`), else cluster auto-detection (TPU pod, Slurm, ...) when LDM_JAX_DISTRIBUTED=1.
    A single process with nothing set stays single-process.
    """
    import os

    if jax.distributed.is_initialized():  # e.g. already started by launch/run_worker.py
        return True
    addr = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    n = num_processes if num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID")
    if addr and n is not None and pid is not None:
        jax.distributed.initialize(coordinator_address=addr, num_processes=int(n), process_id=int(pid))
        return True
    if os.environ.get("LDM_JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()  # auto-detects TPU pods and Slurm/MPI clusters
        return True
    return False


def put_like(tree: Any, like: Any) -> Any:
    """Places a tree of host (numpy) arrays with the shardings of `like` (works with several processes)."""

    def put(x, ref):
        x = np.asarray(x, dtype=ref.dtype)
        if x.shape != ref.shape:
            raise ValueError(f"shape {x.shape} does not match the expected {ref.shape}")
        return jax.make_array_from_callback(x.shape, ref.sharding, lambda idx: x[idx])

    return jax.tree_util.tree_map(put, tree, like)


def host_to_global(batch: Any, mesh: Mesh) -> Any:
    """A tree of identical-on-every-process numpy arrays -> global arrays with the batch sharded on (data, fsdp)."""

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim), lambda idx: x[idx])

    return jax.tree_util.tree_map(put, batch)
