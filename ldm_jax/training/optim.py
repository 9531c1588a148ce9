"""Optimizers and learning-rate schedules built from optax, and gradient accumulation with `lax.scan`.

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

import jax
import jax.numpy as jnp
import ml_collections
import optax

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
        )
    )


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
        after = cfg.f_min + (cfg.f_max - cfg.f_min) * (length - warm) / length
        decay = optax.linear_schedule(lr * after, lr * cfg.f_min, max(length - warm, 1))
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


def accumulate(
    loss_fn: Callable[[Any, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]],
    params: Any,
    batch: dict[str, jax.Array],
    key: jax.Array,
    num_micro: int,
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """Mean loss, mean metrics and mean gradients of `loss_fn(params, batch, key)` over `num_micro` micro-batches.

    Micro-batch i takes the samples i, i + n, i + 2n, ... so that every micro-batch stays spread over the
    data-parallel devices (a contiguous split would put each micro-batch on a subset of them).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
        (loss, aux), grads = grad_fn(params, batch, key)
        return loss, aux, grads

    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % num_micro:
            raise ValueError(f"batch {x.shape[0]} is not divisible by grad_accum={num_micro}")
        return jnp.swapaxes(x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]), 0, 1)

    micro = jax.tree_util.tree_map(split, batch)

    def body(carry, xs):
        i, mb = xs
        (loss, aux), grads = grad_fn(params, mb, jax.random.fold_in(key, i))
        return jax.tree_util.tree_map(jnp.add, carry, (loss, aux, grads)), None

    zeros = jax.eval_shape(grad_fn, params, jax.tree_util.tree_map(lambda x: x[0], micro), key)
    (loss0, aux0), grads0 = zeros
    init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), (loss0, aux0, grads0))
    total, _ = jax.lax.scan(body, init, (jnp.arange(num_micro), micro))
    return jax.tree_util.tree_map(lambda x: x / num_micro, total)
