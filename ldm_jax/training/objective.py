"""The objective interface: what the one training loop needs from a training objective.

ldm_jax has one trainer (`ldm_jax.training.loop`) and two objectives: the latent-diffusion objective
(`training/ldm.py`) and the first-stage autoencoder objective (`training/autoencoder.py`). An objective
owns its models, losses and optimizers; the loop owns the mesh, sharded state creation, jit with
explicit shardings and donation, the RNG, EMA, checkpoints (orbax), preemption, NaN stops, progress
bar, TensorBoard and hooks.

State (`ldm_jax.training.state.TrainState`, a flax struct, all fields pytrees of arrays):
  step       int32 scalar: optimizer updates done so far
  params     {group: params}     trainable parameter groups, ONE optax optimizer per group
                                 (LDM: {"model": {"unet", ["text"], ["logvar"]}};
                                  autoencoder: {"ae": ..., "disc": ...})
  opt_state  {group: optax state}
  ema        {group: params}     EMA copies of the groups in `objective.ema_groups` (LitEma warm-up decay)
  frozen     {name: params}      weights that are used but never trained (first stage, frozen CLIP, LPIPS)
  extra      {name: array}       small non-trained arrays the objective keeps (e.g. "scale_factor")
  rng        uint32 key data     the run's base key; the loop derives the per-step key
                                 `fold_in(rng, step)` and passes it to `step`
Everything in the state is checkpointed and restored onto any mesh.

An objective is any object with these members (see `Objective` below):
  name: str
  ema_groups: tuple[str, ...]
      groups that get an EMA copy (LDM: ("model",); autoencoder: () or ("ae",)).
  init(key) -> {"params": {group: tree}, "frozen": {...}, "extra": {...}}
      Random initialisation. Leaves may be flax `nn.Partitioned` boxes (as `module.init` returns them,
      thanks to the logical names in `ldm_jax.models.layers`): the loop calls it under `jax.eval_shape`,
      derives shardings from the logical names (`ldm_jax.sharding.logical_sharding`) and then runs it
      under `jax.jit(..., out_shardings=...)`, so the state is born sharded. Must be traceable (no I/O).
  optimizers() -> {group: optax.GradientTransformation}
      One per key of init()["params"]. Build them with `ldm_jax.training.optim.make_optimizer(cfg)`
      (AdamW/Adam + global-norm clipping + schedule); the loop calls `tx.init` on the (boxed) params.
  schedules() -> {group: optax.Schedule}
      The learning-rate schedules, for logging only (`lr/<group>` in TensorBoard).
  load_pretrained(state, mesh) -> state          (host side, fresh runs only, optional)
      Replaces randomly initialised `frozen` (or trainable) weights with ones read from disk (first-stage
      checkpoint, SD VAE/CLIP, LPIPS). Use `ldm_jax.sharding.put_like(tree, like)` to place numpy
      trees with the shardings of the random ones.
  prepare(state, batch) -> state                  (jittable, fresh runs only, optional)
      Called once on the first batch before step 0 (LDM: scale_by_std -> extra["scale_factor"]).
  train_step(state, batch, key) -> (state, metrics)
      PURE and jittable. Computes losses/gradients for its groups and applies them with
      `ldm_jax.training.state.apply_gradients(state, group, grads, tx)`; an objective with several groups
      (generator + discriminator) updates each group with its own optimizer inside this one function.
      Must NOT touch `step`, `ema` or `rng`: the loop increments `step` and updates EMA right after it,
      in the same jitted program. `metrics` is a flat dict of float32 scalars; "loss" is required (the
      NaN stop and the progress bar read it). Gradient accumulation: `ldm_jax.training.optim.accumulate`
      runs a loss over micro-batches with `lax.scan` and averages gradients.
  validate(mesh) -> None                          (optional)
      Raise `ConfigError` with a message saying what to change (missing checkpoint, bad shapes) —
      called before anything is compiled.
  hooks() -> list[ldm_jax.training.loop.Hook]      (optional)
      Periodic host-side work (sample grids, reconstructions, eval); each hook has `every` and
      `__call__(ctx)` where ctx gives step, state (use `ctx.params_for_eval()` for EMA weights), mesh,
      workdir and the TensorBoard writer.
  export(state) -> dict                           (optional)
      Small JSON-able facts the sampler needs (e.g. scale_factor) saved with each checkpoint's metadata.

The factory `make_objective(config)` in `ldm_jax.training.loop` picks the objective by
`config.objective` ("ldm" | "autoencoder"); an objective module exposes `build(config) -> Objective`.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import optax


class ConfigError(ValueError):
    """A configuration problem found before compiling; the message says what to change."""


@runtime_checkable
class Objective(Protocol):
    """Structural type of a training objective (see the module docstring)."""

    name: str
    ema_groups: tuple[str, ...]

    def init(self, key: jax.Array) -> dict[str, Any]: ...

    def optimizers(self) -> dict[str, optax.GradientTransformation]: ...

    def schedules(self) -> dict[str, optax.Schedule]: ...

    def train_step(self, state: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple[Any, dict[str, jax.Array]]: ...
