"""The training contract: `Objective`, `Hook`, `HookContext`, `ConfigError` and the loop's config keys.

This module is light (jax, optax, ml_collections): objectives and hooks import it, never the loop.

Who does what
  ldm_jax/train.py                 the entry point: builds the objective named by `config.objective`
                                   (`ldm_jax.training.registry`), its hooks, and calls `loop.train`
  ldm_jax/training/loop.py         the loop: restore or init, step, run the due hooks, stop; imports no objective
  ldm_jax/training/trainer.py      `Trainer.of(objective)`: sharded state creation and the jitted step (+ EMA),
                                   compiled once per objective, mesh and EMA setting
  ldm_jax/training/hooks.py        the loop's own services: checkpoints, NaN stop, scalars, progress bar, SIGTERM
  ldm_jax/training/ldm.py, autoencoder.py    the two objectives

Adding an objective
  1. Subclass `Objective` in a new module (e.g. `training/my_objective.py`); implement `init`, `optimizers`,
     `train_step` (and `schedules` for lr logging); override the other methods only when you need them.
  2. Give the module `build(config, workdir=None) -> MyObjective` and a `default_..._config()` that starts from
     `default_loop_config()` with `objective="my_name"`.
  3. Register it: `registry.OBJECTIVES["my_name"] = my_objective.build` (in `ldm_jax/training/registry.py`).
  Nothing in the loop changes.

Adding a hook
  Subclass `Hook` (or pass `fn`): `Hook(every=500, fn=lambda ctx: ..., name="my_eval")`. It runs on the host
  after every `every`-th step and at the run's last step (`at_end`). Return it from your objective's `hooks()`
  or pass it to `loop.train(..., hooks=[...])`. A hook sees a `HookContext` (step, state, mesh, workdir,
  TensorBoard writer on process 0, objective, the step's host metrics) and must run on EVERY process (it may
  compute with sharded arrays; write files only where `ctx.writer is not None` / process 0). `close()` is
  called once when the loop exits, also on errors.

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
                                 `fold_in(rng, step)` and passes it to `train_step`
Everything in the state is checkpointed and restored onto any mesh.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import jax
import ml_collections
import optax

from ldm_jax.training.state import TrainState, eval_params


class ConfigError(ValueError):
    """A configuration problem found before compiling; the message says what to change."""


def default_loop_config() -> ml_collections.ConfigDict:
    """Keys every training config has (objective-specific blocks are added by the objective's configs)."""
    return ml_collections.ConfigDict(
        dict(
            objective="ldm",
            seed=0,
            mesh=(-1, 1, 1),  # (data, fsdp, tensor); one -1 takes the remaining devices
            # `python -m ldm_jax.train` on a CPU: split the host into this many JAX devices (0: JAX's one), so the
            # data-parallel mesh keeps every core busy (sharding.set_cpu_devices); the top-level config's counts
            cpu_devices=0,
            global_batch_size=8,
            num_steps=1000,
            log_every=50,
            stop_on_nan=True,
            progress=True,
            ema=dict(decay=0.9999, warmup=True),
            checkpoint=dict(every=1000, keep=3, keep_period=0, async_save=True),
        )
    )


class Objective:
    """A training objective: its models, losses and optimizers. The defaults do nothing.

    Required: `init`, `optimizers`, `train_step`. The rest are optional refinements.
    """

    name: str = "objective"
    ema_groups: tuple[str, ...] = ()  # parameter groups that get an EMA copy
    # False: `state.frozen` is left out of checkpoints and `load_pretrained` fills it again on every start
    # (LoRA: checkpoints hold the adapters, their EMA and optimizer; the base is read from `init_from`)
    checkpoint_frozen: bool = True

    def init(self, key: jax.Array) -> dict[str, Any]:
        """{"params": {group: tree}, "frozen": {...}, "extra": {...}} from random weights.

        Traceable (no I/O): the trainer runs it under `jax.eval_shape` to derive shardings from the logical
        names of flax `nn.Partitioned` leaves, then under `jax.jit(out_shardings=...)`.
        """
        raise NotImplementedError(f"objective {self.name}: init")

    def optimizers(self) -> dict[str, optax.GradientTransformation]:
        """One optax transformation per key of `init()["params"]` (`training.optim.make_optimizer`)."""
        raise NotImplementedError(f"objective {self.name}: optimizers")

    def schedules(self) -> dict[str, optax.Schedule]:
        """Learning-rate schedules per group, for logging only (`lr/<group>` in TensorBoard)."""
        return {}

    def train_step(self, state: TrainState, batch: dict[str, jax.Array], key: jax.Array) -> tuple[TrainState, dict]:
        """PURE, jittable update of the objective's groups (`training.state.apply_gradients`).

        Must not touch `step`, `ema` or `rng` (the trainer does, in the same program). `metrics` is a flat
        dict of scalars and must hold "loss" (the NaN stop and the progress bar read it).
        """
        raise NotImplementedError(f"objective {self.name}: train_step")

    def validate(self, mesh: jax.sharding.Mesh) -> None:
        """Raise `ConfigError` saying what to change (missing files, bad shapes), before anything compiles."""

    def load_pretrained(self, state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
        """Fresh runs only, host side: put weights read from disk into the random state
        (`ldm_jax.sharding.put_like` places numpy trees like the random ones)."""
        return state

    def prepare(self, state: TrainState, batch: dict[str, jax.Array]) -> TrainState:
        """Fresh runs only, jitted once on the first batch before step 0 (LDM: scale_by_std)."""
        return state

    def export(self, state: TrainState) -> dict[str, Any]:
        """Small JSON-able facts saved in every checkpoint's meta (e.g. the LDM scale factor)."""
        return {}

    def hooks(self) -> list["Hook"]:
        """The objective's periodic host-side work (sample grids, reconstructions); the entry point runs them."""
        return []

    def make_dataset(self, mesh: jax.sharding.Mesh) -> Any:
        """The training iterator of global batches (`next()`; optional get_state/set_state/close)."""
        raise ConfigError(f"objective {self.name} has no dataset of its own: pass dataset= to loop.train")


@dataclasses.dataclass
class HookContext:
    """What a hook sees: the step just finished and the state after it."""

    step: int
    state: TrainState
    mesh: jax.sharding.Mesh
    workdir: pathlib.Path
    writer: Any  # tensorboardX SummaryWriter on process 0, None elsewhere
    objective: Objective
    last: int = 0  # config.num_steps
    metrics: dict[str, float] | None = None  # host metrics of the newest step read (this step when `sync`)

    def eval_params(self, group: str, use_ema: bool = True) -> Any:
        """The weights to sample / evaluate with: the EMA copy of `group` when there is one."""
        return eval_params(self.state, group, use_ema)


class Hook:
    """Host-side work after every `every`-th step (0: never periodically) and at the last step (`at_end`).

    Subclass and override `__call__` (and `close`), or pass `fn`. `sync=False` lets the loop run the hook
    without first reading the step's metrics (it then sees the previous step's in `ctx.metrics`).
    """

    sync: bool = True

    def __init__(self, every: int = 0, fn: Callable[[HookContext], None] | None = None, name: str | None = None,
                 at_end: bool = True):
        self.every, self.fn, self.at_end = int(every), fn, at_end
        self.name = name or type(self).__name__

    def due(self, step: int, last: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or (self.at_end and step == last))

    def __call__(self, ctx: HookContext) -> None:
        if self.fn is None:
            raise NotImplementedError(f"hook {self.name}: pass fn= or override __call__")
        self.fn(ctx)

    def close(self) -> None:
        """Called once when the loop ends (normally, preempted or by an error)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, every={self.every})"
