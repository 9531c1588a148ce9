"""Device mesh, logical-axis rules and sharded-state helpers.

One table maps the logical names that parameters and activations carry (see
`ldm_jax.models.layers`) to the mesh axes `data`, `fsdp`, `tensor`.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax import distributed

log = logging.getLogger("ldm_jax.train")

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


def set_cpu_devices(count: int) -> None:
    """Splits the host CPU into `count` JAX devices (`jax_num_cpu_devices`), so that a data-parallel mesh keeps
    every core busy. 0 leaves JAX's default (one CPU device).

    XLA:CPU runs each device's program on its own thread: the main job's small convolutions keep about one core
    busy per device, so on a 2-core machine 2 devices ran its autoencoder step 1.27-1.35x and its LDM step 1.2x
    faster (README, "The main job"). Only the CPU backend is affected (a GPU or TPU run keeps its accelerators).
    It must come before JAX starts its backends (it starts none itself, so `jax.distributed` can still follow);
    an `XLA_FLAGS=--xla_force_host_platform_device_count=N` already set wins.
    """
    count = int(count or 0)
    if count < 0:
        raise ValueError(f"cpu_devices={count} must be >= 0 (0: JAX's default, one CPU device)")
    if count == 0:
        return
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        log.info("cpu_devices=%d not applied: XLA_FLAGS already sets the CPU device count", count)
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backends are up already (e.g. called from a program that ran JAX before)
        log.warning("cpu_devices=%d not applied: JAX already started with %d CPU device(s)", count,
                    len(jax.devices("cpu")))


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
    A single process with nothing set stays single-process. Once formed, a failing or dead process stops
    the others within seconds, naming it (`ldm_jax.distributed`).
    """
    import os

    if jax.distributed.is_initialized():  # e.g. already started by launch/run_worker.py
        distributed.watch()
        return True
    addr = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    n = num_processes if num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID")
    timeout = distributed.heartbeat_timeout()
    if addr and n is not None and pid is not None:
        jax.distributed.initialize(coordinator_address=addr, num_processes=int(n), process_id=int(pid),
                                   heartbeat_timeout_seconds=timeout)
    elif os.environ.get("LDM_JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize(heartbeat_timeout_seconds=timeout)  # auto-detects TPU pods, Slurm/MPI clusters
    else:
        return False
    distributed.watch()
    return True


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


# ------------------------------------------------------------------------------- draws inside a shard_map
# A `shard_map` body sees its block of the batch, so a draw of the local shape would give values that depend
# on the device count. `block_key` wraps a threefry key into one whose draws of shape (rows, ...) are exactly
# rows [index * rows, (index + 1) * rows) of the same draw made for the whole batch outside the shard_map
# (JAX's partitionable threefry, the default, hashes each element's flat position in the global array; this
# impl hashes the global position of each local element). Only per-sample draws (leading axis = the local
# batch) have a global meaning; any other shape raises instead of silently drawing something mesh-dependent.
_BLOCK_IMPLS: dict[int, Any] = {}


def _u32(x) -> jax.Array:
    return jax.numpy.asarray(x, jax.numpy.uint32)


def _mul_u32_const(a: jax.Array, c: int) -> tuple[jax.Array, jax.Array]:
    """(hi, lo) of the 64-bit product of uint32 `a` and the constant 0 <= c < 2**32, in uint32 arithmetic."""
    a_lo, a_hi = a & _u32(0xFFFF), a >> _u32(16)
    c_lo, c_hi = _u32(c & 0xFFFF), _u32(c >> 16)
    ll, hh = a_lo * c_lo, a_hi * c_hi
    m1, m2 = a_hi * c_lo, a_lo * c_hi
    mid = m1 + m2
    carry_mid = (mid < m1).astype(jax.numpy.uint32)
    lo = ll + (mid << _u32(16))
    carry_lo = (lo < ll).astype(jax.numpy.uint32)
    hi = hh + (mid >> _u32(16)) + (carry_mid << _u32(16)) + carry_lo
    return hi, lo


def _block_impl(rows: int):
    if rows in _BLOCK_IMPLS:
        return _BLOCK_IMPLS[rows]
    import math

    from jax import lax
    from jax.extend import random as jex_random

    fry = jex_random.threefry_prng_impl
    jnp = jax.numpy

    def seed(s):
        raise TypeError("block keys are made with sharding.block_key, not seeded")

    def split(kd, shape):
        children = fry.split(kd[:2], shape)
        return jnp.concatenate([children, jnp.broadcast_to(kd[2:], (*shape, 2))], axis=-1)

    def fold_in(kd, data):
        return jnp.concatenate([fry.fold_in(kd[:2], data), kd[2:]])

    def random_bits(kd, bit_width, shape):
        shape = tuple(int(d) for d in shape)
        if not shape or shape[0] != rows:
            raise ValueError(
                f"a random draw of shape {shape} inside the shard_map'd gradient accumulation is not per-sample "
                f"(leading axis = the {rows} local samples), so it has no mesh-independent value; draw it outside "
                "the step or set optim.accum_shard_map=False"
            )
        inner = math.prod(shape[1:])
        if rows * inner >= 2**32:
            raise ValueError(f"a local random draw of {rows * inner} elements is too large for block_key")
        strides = [inner] + [math.prod(shape[d + 1:]) for d in range(1, len(shape))]
        local = sum(lax.broadcasted_iota(jnp.uint32, shape, d) * _u32(s) for d, s in enumerate(strides))
        base_hi, base_lo = _mul_u32_const(kd[2], rows * inner)  # global flat position of the block's first element
        lo = base_lo + local
        hi = base_hi + (lo < base_lo).astype(jnp.uint32)
        hi = jnp.broadcast_to(hi, shape)
        bits1, bits2 = jex_random.threefry2x32_p.bind(kd[0], kd[1], hi, lo)
        if bit_width == 64:
            return (bits1.astype(jnp.uint64) << jnp.uint64(32)) | bits2.astype(jnp.uint64)
        dtype = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bit_width]
        return (bits1 ^ bits2).astype(dtype)

    impl = jex_random.define_prng_impl(key_shape=(4,), seed=seed, split=split, random_bits=random_bits,
                                       fold_in=fold_in, name=f"threefry2x32_block{rows}", tag=f"fb{rows}")
    _BLOCK_IMPLS[rows] = impl
    return impl


def block_key(key: jax.Array, index: jax.Array, rows: int) -> jax.Array:
    """A key whose per-sample draws of shape (rows, ...) equal rows [index*rows, (index+1)*rows) of `key`'s.

    `key` is a threefry key (typed or raw uint32[2]); `index` is this block's position in the batch (in a
    `shard_map`, `lax.axis_index` of the batch axes). Splits and fold_ins act on the threefry part only,
    so `split`/`fold_in` then draw gives what the same calls give on the global batch.
    """
    jnp = jax.numpy
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    if data.shape != (2,):
        raise ValueError(f"block_key needs a single threefry2x32 key, got key data of shape {data.shape}")
    extra = jnp.stack([_u32(index), _u32(0)])
    return jax.random.wrap_key_data(jnp.concatenate([data.astype(jnp.uint32), extra]), impl=_block_impl(rows))
