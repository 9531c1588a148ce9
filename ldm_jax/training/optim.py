"""Optimizers and learning-rate schedules built from optax, and gradient accumulation with `lax.scan`.

Gradient accumulation has two paths with the same results (`accumulate`):
  scan        the micro-batches of the global batch in a `lax.scan` under the automatic partitioner; on a
              data-parallel mesh XLA reduces the gradients inside the loop body, once per micro-batch.
  shard_map   (`accumulate_shard_map`, the default for grad_accum > 1 when a mesh with data > 1 is in
              context) each data-parallel replica scans the micro-batches of its own batch block and the
              gradients are summed over `data` once, after the loop. fsdp/tensor stay automatic inside (their
              per-micro-batch all-gather/reduce-scatter is what FSDP/TP trade for memory). Random draws use
              `sharding.block_key`, so they equal the scan path's global-batch draws on any mesh.

Schedules reproduce LDM's `ldm/lr_scheduler.py` (multipliers of the base lr, stepped once per update):
  "constant"      f = 1
  "sd_linear"     `LambdaLinearScheduler` (one cycle): linear warm-up f_start -> f_max over warmup_steps,
                  then f_min + (f_max - f_min) * (cycle_length - n) / cycle_length  (SD v1: f_max = f_min = 1,
                  i.e. linear warm-up then constant)
  "ldm_cosine"    `LambdaWarmUpCosineScheduler`: linear warm-up f_start -> f_max, then cosine to f_min at
                  decay_steps (counted from step 0, as LDM's max_decay_steps)
"""
from __future__ import annotations

from typing import Any, Callable

import logging
import math

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import PartitionSpec as P

from ldm_jax import sharding as shd

log = logging.getLogger("ldm_jax.train")

SCHEDULES = ("constant", "sd_linear", "ldm_cosine")


def default_optim_config() -> ml_collections.ConfigDict:
    """The optimizer block of a training config (AdamW + clipping + schedule)."""
    return ml_collections.ConfigDict(
        dict(
            name="adamw",  # adamw | adam
            lr=1e-4,
            scale_lr=False,  # LDM's scale_lr: lr = base_lr * grad_accum * global_batch_size
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            clip_norm=1.0,  # global-norm clipping; 0 turns it off
            schedule="constant",
            warmup_steps=0,
            f_start=1e-6,
            f_max=1.0,
            f_min=1.0,
            cycle_length=10_000_000_000_000,
            decay_steps=100_000,
            grad_accum=1,  # micro-batches per update (the global batch is split, gradients averaged)
            accum_shard_map=True,  # grad_accum > 1 on a data-parallel mesh: reduce gradients once per step
        )
    )


def optim_config_errors(cfg: ml_collections.ConfigDict, prefix: str = "optim") -> list[str]:
    """What is wrong with an optimizer block, one `key=value: valid range` line each (empty when fine).

    optax takes any number (a negative learning rate ascends the loss, 0 trains nothing), so the loop
    checks these before compiling.
    """
    def num(key):
        try:
            v = float(cfg[key])
        except (TypeError, ValueError):
            return None
        return v if math.isfinite(v) else None

    rules = [  # (key, test, the valid range as the message says it)
        ("lr", lambda v: v > 0, "a finite number > 0, e.g. 1e-4"),
        ("b1", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("b2", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("eps", lambda v: v > 0, "> 0"),
        ("weight_decay", lambda v: v >= 0, ">= 0"),
        ("clip_norm", lambda v: v >= 0, ">= 0 (0 turns clipping off)"),
        ("warmup_steps", lambda v: v >= 0 and v == int(v), "a whole number >= 0"),
        ("grad_accum", lambda v: v >= 1 and v == int(v), "a whole number >= 1"),
        ("f_start", lambda v: v >= 0, ">= 0"), ("f_max", lambda v: v > 0, "> 0"), ("f_min", lambda v: v >= 0, ">= 0"),
    ]
    if cfg.get("schedule") == "ldm_cosine":
        rules.append(("decay_steps", lambda v: v >= 1 and v == int(v), "a whole number >= 1 with schedule=ldm_cosine"))
    if cfg.get("schedule") == "sd_linear":
        rules.append(("cycle_length", lambda v: v >= 1, ">= 1 with schedule=sd_linear"))
    errors = []
    for key, ok, valid in rules:
        if key in cfg and (num(key) is None or not ok(num(key))):
            errors.append(f"{prefix}.{key}={cfg[key]!r} must be {valid}")
    if cfg.get("schedule") not in SCHEDULES:
        errors.append(f"{prefix}.schedule={cfg.get('schedule')!r} must be one of {', '.join(SCHEDULES)}")
    if cfg.get("name") not in ("adamw", "adam"):
        errors.append(f"{prefix}.name={cfg.get('name')!r} must be 'adamw' or 'adam'")
    return errors


def base_lr(cfg: ml_collections.ConfigDict, global_batch_size: int) -> float:
    """The base learning rate, scaled by `grad_accum * global_batch_size` when `scale_lr` is on (LDM main.py)."""
    return cfg.lr * cfg.grad_accum * global_batch_size if cfg.scale_lr else cfg.lr


def make_schedule(cfg: ml_collections.ConfigDict, global_batch_size: int) -> optax.Schedule:
    """The learning rate as a function of the update count (see the module docstring)."""
    lr = base_lr(cfg, global_batch_size)
    if cfg.schedule == "constant":
        return optax.constant_schedule(lr)
    if cfg.schedule == "sd_linear":
        warm, length = int(cfg.warmup_steps), int(cfg.cycle_length)
        f_min, f_max, cycle = float(cfg.f_min), float(cfg.f_max), float(length)

        def decay(count):  # LambdaLinearScheduler after warm-up, in float: SD's cycle_length (1e13) overflows int32
            n = jnp.asarray(count, jnp.float32) + warm
            return lr * (f_min + (f_max - f_min) * jnp.clip((cycle - n) / cycle, 0.0, 1.0))

        if warm == 0:
            return decay
        warmup = optax.linear_schedule(lr * cfg.f_start, lr * cfg.f_max, warm)
        return optax.join_schedules([warmup, decay], [warm])
    if cfg.schedule == "ldm_cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=lr * cfg.f_start,
            peak_value=lr * cfg.f_max,
            warmup_steps=int(cfg.warmup_steps),
            decay_steps=int(cfg.decay_steps),
            end_value=lr * cfg.f_min,
        )
    raise ValueError(f"optim.schedule={cfg.schedule!r} is unknown; choose one of {SCHEDULES}")


def make_optimizer(
    cfg: ml_collections.ConfigDict, global_batch_size: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(AdamW or Adam with global-norm clipping and the configured schedule, the schedule)."""
    schedule = make_schedule(cfg, global_batch_size)
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "adam":
        opt = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    else:
        raise ValueError(f"optim.name={cfg.name!r} is unknown; choose 'adamw' or 'adam'")
    if cfg.clip_norm and cfg.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt, schedule


LossFn = Callable[[Any, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
ACCUM_AXES = ("data",)  # the shard_map'd accumulation is manual over these mesh axes, automatic over the rest


def accumulate(
    loss_fn: LossFn,
    params: Any,
    batch: dict[str, jax.Array],
    key: jax.Array,
    num_micro: int,
    *,
    mesh: Any = None,
    shard_map: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """Mean loss, mean metrics and mean gradients of `loss_fn(params, batch, key)` over `num_micro` micro-batches.

    Micro-batch i takes the samples i, i + n, i + 2n, ... so that every micro-batch stays spread over the
    data-parallel devices (a contiguous split would put each micro-batch on a subset of them), and draws
    with `fold_in(key, i)`. With `shard_map` (and `num_micro` > 1) the work goes to `accumulate_shard_map`
    when `shard_map_plan` accepts `mesh` (default: the context mesh of `jax.set_mesh`); else `lax.scan`.
    """
    if shard_map and num_micro > 1:
        mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
        reason = shard_map_plan(mesh, batch, num_micro)
        if reason is None:
            return accumulate_shard_map(loss_fn, params, batch, key, num_micro, mesh)
        log.info("gradient accumulation: lax.scan under the partitioner (%s)", reason)
    return accumulate_scan(loss_fn, params, batch, key, num_micro)


def shard_map_plan(mesh: Any, batch: dict[str, jax.Array], num_micro: int) -> str | None:
    """None when `accumulate_shard_map` applies to `mesh`/`batch`, else why the scan path is used."""
    if mesh is None or getattr(mesh, "empty", False) or not mesh.shape:
        return "no mesh in context (jax.set_mesh)"
    if any(a not in mesh.shape for a in ACCUM_AXES):
        return f"the mesh has no {ACCUM_AXES} axes"
    n_dev = math.prod(mesh.shape[a] for a in ACCUM_AXES)
    if n_dev == 1:
        return "data axis of size 1: one reduction per micro-batch is already the only one"
    dp = n_dev * mesh.shape.get("fsdp", 1)
    for x in jax.tree_util.tree_leaves(batch):
        if x.shape[0] % (dp * num_micro):
            return f"batch {x.shape[0]} not divisible by data*fsdp*grad_accum={dp * num_micro}"
    return None


def _strided_split(x: jax.Array, num_micro: int) -> jax.Array:
    """(B, ...) -> (num_micro, B / num_micro, ...) with micro-batch i = samples i, i + n, i + 2n, ..."""
    if x.shape[0] % num_micro:
        raise ValueError(f"batch {x.shape[0]} is not divisible by grad_accum={num_micro}")
    return jnp.swapaxes(x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]), 0, 1)


def _zeros_like_out(grad_fn, params, micro, key):
    (loss0, aux0), grads0 = jax.eval_shape(grad_fn, params, jax.tree_util.tree_map(lambda x: x[0], micro), key)
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), (loss0, aux0, grads0))


def accumulate_scan(
    loss_fn: LossFn, params: Any, batch: dict[str, jax.Array], key: jax.Array, num_micro: int
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """`accumulate` with `lax.scan` over the global micro-batches (the partitioner places the reductions)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
        (loss, aux), grads = grad_fn(params, batch, key)
        return loss, aux, grads

    micro = jax.tree_util.tree_map(lambda x: _strided_split(x, num_micro), batch)

    def body(carry, xs):
        i, mb = xs
        (loss, aux), grads = grad_fn(params, mb, jax.random.fold_in(key, i))
        return jax.tree_util.tree_map(jnp.add, carry, (loss, aux, grads)), None

    init = _zeros_like_out(grad_fn, params, micro, key)
    total, _ = jax.lax.scan(body, init, (jnp.arange(num_micro), micro))
    return jax.tree_util.tree_map(lambda x: x / num_micro, total)


def accumulate_shard_map(
    loss_fn: LossFn, params: Any, batch: dict[str, jax.Array], key: jax.Array, num_micro: int, mesh: Any
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """`accumulate` with the cross-replica gradient sum once per step instead of once per micro-batch.

    A `jax.shard_map` manual over `data` (fsdp/tensor stay automatic): each replica splits its batch block
    the strided way (its micro-batch i is exactly its block of the global micro-batch i), sums loss, metrics
    and gradients over a `lax.scan`, and one `psum` over `data` after the scan averages them. Draws use
    `sharding.block_key(fold_in(key, i), replica, rows)`, i.e. the global micro-batch's values, so the
    result equals `accumulate_scan` up to float summation order. `loss_fn` must be a mean over the samples
    of its micro-batch (blocks are equal-sized, so the mean of block means is the global mean) and draw
    only per-sample randoms (others raise).
    """
    axes = ACCUM_AXES
    n_dev = math.prod(mesh.shape[a] for a in axes)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def local(params, batch, key):
        replica = jax.lax.axis_index(axes)
        # varying params: their gradients stay per-replica (no implicit psum inside the loop)
        params = jax.lax.pcast(params, axes, to="varying")
        micro = jax.tree_util.tree_map(lambda x: _strided_split(x, num_micro), batch)
        rows = jax.tree_util.tree_leaves(micro)[0].shape[1]

        def body(carry, xs):
            i, mb = xs
            k = shd.block_key(jax.random.fold_in(key, i), replica, rows)
            (loss, aux), grads = grad_fn(params, mb, k)
            return jax.tree_util.tree_map(jnp.add, carry, (loss, aux, grads)), None

        init = _zeros_like_out(grad_fn, params, micro, shd.block_key(key, replica, rows))
        init = jax.lax.pcast(init, axes, to="varying")
        total, _ = jax.lax.scan(body, init, (jnp.arange(num_micro), micro))
        total = jax.lax.psum(total, axes)  # the one cross-replica reduction of the step
        return jax.tree_util.tree_map(lambda x: x / (num_micro * n_dev), total)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes), P()), out_specs=P(), axis_names=set(axes),
                         check_vma=True)(params, batch, key)
