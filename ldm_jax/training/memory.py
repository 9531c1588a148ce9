"""Shape-only memory plan of a training config: parameters, optimizer state, EMA and frozen weights per device.

`python -m ldm_jax.train --config=... --workdir=DIR --dry_run [--devices=N]` prints it and exits, reading no
weights and no data and writing nothing: the objective's initial state is traced with `jax.eval_shape`
(nothing is allocated), every leaf gets the NamedSharding the run would give it (its logical axis names
through `sharding.LOGICAL_RULES`, `sharding.logical_sharding`) on an `AbstractMesh` of the config's `mesh`
(a -1 entry takes the `--devices` left over), and counts the bytes of one shard (`NamedSharding.shard_shape`).
Every device holds one shard of every leaf (a dimension the mesh does not divide is replicated), so the
per-device column is what each accelerator must hold for the state. Not counted: activations and XLA's
temporaries, which need the compiled step on the target devices (`jax.jit(step).lower(...).compile()
.memory_analysis()`); the gradients row is the one parameter-sized copy the update holds while it runs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import AbstractMesh

from ldm_jax import sharding as shd
from ldm_jax.training.loop import check_config
from ldm_jax.training.objective import ConfigError, Objective
from ldm_jax.training.trainer import Trainer

@dataclasses.dataclass
class Part:
    """One part of the state: element count, bytes in all and bytes on each device."""

    name: str
    count: int = 0
    total_bytes: int = 0
    device_bytes: int = 0


def abstract_mesh(mesh_cfg: Any, devices: int) -> AbstractMesh:
    """The (data, fsdp, tensor) `AbstractMesh` of a config's `mesh` on `devices` devices (one -1 fills)."""
    shape = [int(mesh_cfg.get(a, 1)) for a in shd.MESH_AXES] if hasattr(mesh_cfg, "items") else [int(s) for s in mesh_cfg]
    if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"mesh={tuple(shape)} must be 3 positive sizes (data, fsdp, tensor), at most one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if devices % known or (-1 not in shape and known != devices):
        raise ConfigError(f"mesh {tuple(shape)} does not fit {devices} devices: set --config.mesh so that "
                          f"data*fsdp*tensor = {devices} (or pass --devices)")
    shape = [devices // known if s == -1 else s for s in shape]
    return AbstractMesh(tuple(shape), shd.MESH_AXES)


def _part_name(path: Sequence[Any]) -> str:
    """params/model/unet, ema/model/unet, opt_state/model, frozen/text/text_encoder_2, ... of a leaf's key path."""
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    top = keys[0]
    depth = {"params": 3, "ema": 3, "frozen": 3, "opt_state": 2}.get(top, 1)
    if top == "frozen" and len(keys) > 1 and keys[1] != "text":
        depth = 2
    return "/".join(keys[:depth])


def abstract_state(objective: Objective, seed: int = 0) -> Any:
    """The objective's initial train state as boxed `jax.ShapeDtypeStruct`s (logical names kept; nothing allocated)."""
    return jax.eval_shape(Trainer.of(objective).init_fn(seed))


def state_memory(objective: Objective, mesh: AbstractMesh, seed: int = 0, boxed: Any = None) -> list[Part]:
    """The parts of `objective`'s train state on `mesh` (see the module docstring), then gradients and the total.
    `boxed`: `abstract_state(objective, seed)` when already traced (one trace serves several meshes)."""
    boxed = abstract_state(objective, seed) if boxed is None else boxed
    abstract, shardings = nn.meta.unbox(boxed), shd.logical_sharding(boxed, mesh)
    state = {f.name: getattr(abstract, f.name) for f in dataclasses.fields(abstract)}
    shards = {f.name: getattr(shardings, f.name) for f in dataclasses.fields(shardings)}
    parts: dict[str, Part] = {}
    leaves = jax.tree_util.tree_leaves_with_path(state)
    for (path, leaf), sharding in zip(leaves, jax.tree_util.tree_leaves(shards)):
        name = _part_name(path)
        p = parts.setdefault(name, Part(name))
        itemsize = np.dtype(leaf.dtype).itemsize
        p.count += int(np.prod(leaf.shape))
        p.total_bytes += int(np.prod(leaf.shape)) * itemsize
        p.device_bytes += int(np.prod(sharding.shard_shape(tuple(leaf.shape)))) * itemsize
    small = Part("step, rng, extra")  # scalars and small arrays: one row
    out = []
    for name, p in parts.items():
        if name.split("/")[0] in ("step", "rng", "extra"):
            small.count, small.total_bytes, small.device_bytes = (small.count + p.count, small.total_bytes + p.total_bytes,
                                                                  small.device_bytes + p.device_bytes)
        else:
            out.append(p)
    order = {"params": 0, "opt_state": 1, "ema": 2, "frozen": 3}
    out.sort(key=lambda p: (order.get(p.name.split("/")[0], 4), p.name))
    out.append(small)
    trained = [p for p in out if p.name.startswith("params/")]
    grads = Part("gradients (during the step)", sum(p.count for p in trained), sum(p.total_bytes for p in trained),
                 sum(p.device_bytes for p in trained))
    total = Part("total", sum(p.count for p in out) + grads.count, sum(p.total_bytes for p in out) + grads.total_bytes,
                 sum(p.device_bytes for p in out) + grads.device_bytes)
    return [*out, grads, total]


def format_report(parts: Sequence[Part], mesh: AbstractMesh) -> str:
    """The table `--dry_run` prints (GiB, or MiB when the whole state is under 1 GiB per device)."""
    axes = " ".join(f"{a}={n}" for a, n in mesh.shape.items())
    unit, size = ("GiB", 2**30) if parts[-1].device_bytes >= 2**30 else ("MiB", 2**20)
    lines = [f"memory plan on mesh {axes} ({int(np.prod(list(mesh.shape.values())))} devices), shape-only "
             "(jax.eval_shape; no weights read):",
             f"  {'part':<36}{'elements':>16}{'all ' + unit:>11}{'per device ' + unit:>16}"]
    for p in parts:
        if p.name == "total":
            lines.append("  " + "-" * 79)
        lines.append(f"  {p.name:<36}{p.count:>16,}{p.total_bytes / size:>11.3f}{p.device_bytes / size:>16.3f}")
    lines.append("  not counted: activations and XLA temporaries (they need the compiled step on the target devices)")
    return "\n".join(lines)


def report(config: ml_collections.ConfigDict, objective: Objective, devices: int | None = None) -> str:
    """The memory plan of `config` (its objective already built) on its mesh over `devices` (default: visible)."""
    mesh = abstract_mesh(config.mesh, int(devices or jax.device_count()))
    check_config(config, mesh)  # the batch must fit the mesh as the run would require
    return format_report(state_memory(objective, mesh, int(config.seed)), mesh)
