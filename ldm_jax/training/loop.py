"""The one training loop: `train(config, workdir, objective, hooks, dataset)`.

It runs what it is given and imports no objective: the entry point (`ldm_jax.train`) builds the objective
(`ldm_jax.training.registry`) and its hooks. The compiled pieces come from `training.trainer.Trainer`, the
loop's services (checkpoints, NaN stop, scalars, progress bar, SIGTERM) from `training.hooks`; the contract
objectives and hooks implement is `training.objective`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib
from typing import Any, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from ldm_jax import perf
from ldm_jax import sharding as shd
from ldm_jax.training import hooks as services
from ldm_jax.training import workdir as run_record
from ldm_jax.training.objective import ConfigError, Hook, HookContext, Objective
from ldm_jax.training.optim import optim_config_errors
from ldm_jax.training.state import TrainState
from ldm_jax.training.trainer import Trainer

log = logging.getLogger("ldm_jax.train")


def _loop_value_errors(config: ml_collections.ConfigDict) -> list[str]:
    """The loop's own keys (`objective.default_loop_config`) outside their valid range."""
    def whole(key: str, value: Any, least: int) -> list[str]:
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= least
        return [] if ok else [f"{key}={value!r} must be a whole number >= {least}"]

    ck = config.checkpoint
    errors = (whole("num_steps", config.num_steps, 1) + whole("global_batch_size", config.global_batch_size, 1)
              + whole("log_every", config.log_every, 1) + whole("checkpoint.every", ck.every, 1)
              + whole("checkpoint.keep", ck.keep, 0) + whole("checkpoint.keep_period", ck.keep_period or 0, 0))
    if "optim" in config:
        errors += optim_config_errors(config.optim)
    return errors


def check_config(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Fails before compiling on values out of range (naming the key and the range) or a batch that does not fit
    the mesh."""
    errors = _loop_value_errors(config)
    if errors:
        raise ConfigError("; ".join(errors))
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    accum = int(config.optim.grad_accum) if "optim" in config else 1
    b = int(config.global_batch_size)
    if b % dp:
        raise ConfigError(
            f"global_batch_size={b} is not divisible by the data-parallel size data*fsdp={dp} of mesh "
            f"{dict(mesh.shape)}; set --config.global_batch_size to a multiple of {dp} or change --config.mesh"
        )
    if b % (accum * dp):
        raise ConfigError(
            f"global_batch_size={b} must be divisible by optim.grad_accum*data*fsdp={accum * dp} so that each "
            f"micro-batch is spread over the devices; change --config.optim.grad_accum or the batch size"
        )


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the final state, the per-step losses it ran and why it stopped."""

    state: TrainState
    losses: list[float]
    stopped: str  # "done" | "preempted"
    start_step: int


def train(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    objective: Objective,
    hooks: Sequence[Hook] = (),
    dataset: Iterator[dict[str, jax.Array]] | None = None,
    *,
    mesh: Mesh | None = None,
    max_steps: int | None = None,
) -> TrainResult:
    """Trains (or resumes) `objective` in `workdir` until `config.num_steps`; `max_steps` stops earlier (tests).

    `dataset` defaults to `objective.make_dataset(mesh)` (closed at the end); `hooks` run after the steps
    they are due at, after the loop's own (scalars, progress bar, checkpoint).
    """
    workdir, mesh = setup(config, workdir, objective, mesh)
    trainer, total = Trainer.of(objective), int(config.num_steps)
    stop = total if max_steps is None else min(total, max_steps)
    with contextlib.ExitStack() as stack:
        if dataset is None:
            dataset = objective.make_dataset(mesh)
            stack.callback(getattr(dataset, "close", lambda: None))  # its prefetch thread must not outlive JAX
        ckpt = services.Checkpoints(config, workdir, objective, dataset)
        stack.callback(ckpt.close)
        state, batch, state_sh = _start(trainer, ckpt, dataset, mesh, int(config.seed))
        start = int(jax.device_get(state.step))
        run_record.record_config(workdir, config, start)
        step_fn, keygen = trainer.jit_step(config.ema, mesh, state_sh, batch), trainer.keygen(mesh)
        writer = services.tensorboard(workdir)
        stack.callback(writer.close if writer is not None else lambda: None)
        first_call = perf.abstract_args(state, batch, keygen(state.rng, start))
        scalars = services.ScalarLog(writer, int(config.log_every), stop, config.global_batch_size,
                                     flops=lambda: perf.step_flops(step_fn, first_call))
        watch = services.MetricsWatch(bool(config.stop_on_nan), ckpt, listeners=[scalars.add])
        hooks = [scalars, *_progress(config, start, total, stop, scalars), ckpt, *hooks]
        for h in hooks:
            stack.callback(h.close)
        preempt = stack.enter_context(services.Preemption())
        stopped = "done"
        for step in range(start + 1, stop + 1):
            state, metrics = step_fn(state, batch, keygen(state.rng, step - 1))
            due = [h for h in hooks if h.due(step, total)]
            watch.push(step, metrics, sync=any(h.sync for h in due))
            ctx = HookContext(step, state, mesh, workdir, writer, objective, last=total, metrics=watch.latest)
            for h in due:
                h(ctx)
            ckpt.check()  # a background save that failed (disk full) stops the run now, not at the next save
            if preempt.requested():
                watch.flush()
                ckpt.save(step, state, force=True)
                stopped = "preempted"
                log.warning("SIGTERM: saved step %d to %s, exiting", step, ckpt.directory)
                break
            if step < stop:
                batch = next(dataset)
        watch.flush()
    return TrainResult(state=state, losses=watch.losses, stopped=stopped, start_step=start)


def setup(config, workdir, objective: Objective, mesh: Mesh | None = None) -> tuple[pathlib.Path, Mesh]:
    """Checks the workdir, the config against the mesh and the objective's files (config.json is written only
    once the run is known to fit the workdir: `workdir.record_config` after the restore). `train` calls it; an
    entry point that opens the dataset itself calls it first, so bad input fails before any data work."""
    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file, not a directory; give a new or existing directory")
    if mesh is None:
        try:
            mesh = shd.mesh_from_config(config.mesh)
        except ValueError as e:
            raise ConfigError(f"mesh={tuple(config.mesh)} does not fit the {jax.device_count()} devices: {e}") from None
    check_config(config, mesh)
    objective.validate(mesh)
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir, mesh


def _start(trainer: Trainer, ckpt: services.Checkpoints, dataset: Any, mesh: Mesh, seed: int) -> tuple[Any, Any, Any]:
    """(state, first batch, state shardings): the newest checkpoint, or a fresh state with the objective's
    pretrained weights and `prepare` applied to the first batch."""
    abstract, state_sh = trainer.state_shardings(mesh, seed)
    state = ckpt.restore(abstract, state_sh)
    if state is not None:
        if not trainer.objective.checkpoint_frozen:  # not in the checkpoint: read again (e.g. a LoRA's base)
            state = state.replace(frozen=trainer.objective.load_pretrained(trainer.create_state(mesh, seed), mesh).frozen)
        return state, next(dataset), state_sh
    state = trainer.objective.load_pretrained(trainer.create_state(mesh, seed), mesh)
    batch = next(dataset)
    return trainer.prepare(state, batch, state_sh), batch, state_sh


def _progress(config: ml_collections.ConfigDict, start: int, total: int, stop: int,
              scalars: services.ScalarLog) -> list[Hook]:
    if not config.progress or jax.process_index() != 0:
        return []
    return [services.ProgressBar(start, total, int(config.log_every), stop, config.global_batch_size, scalars)]
