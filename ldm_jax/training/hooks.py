"""The loop's own services, one small object each: checkpoints, the NaN stop, scalars, progress bar, SIGTERM.

`Checkpoints` restores (the newest intact checkpoint) and saves (orbax, async) and is the hook that saves every `checkpoint.every` steps;
`MetricsWatch` reads each step's metrics one step late (so the host never waits for the device), stops on a
non-finite loss and feeds `ScalarLog` (TensorBoard) and the per-step losses; `ProgressBar` is tqdm;
`Preemption` turns SIGTERM into a save-and-exit between steps.
"""
from __future__ import annotations

import json
import logging
import math
import pathlib
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from ldm_jax import perf
from ldm_jax.checkpoint import CheckpointMismatchError, Checkpointer, abstract_with_shardings
from ldm_jax.training import workdir as run_record
from ldm_jax.training.objective import ConfigError, Hook, HookContext, Objective
from ldm_jax.training.state import TrainState

log = logging.getLogger("ldm_jax.train")


class Checkpoints(Hook):
    """Restores the newest complete checkpoint and saves every `checkpoint.every` steps (forced at the last)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path, objective: Objective, dataset: Any):
        ck = config.checkpoint
        super().__init__(every=max(int(ck.every), 1), name="checkpoints")
        self.ckpt = Checkpointer(workdir / "checkpoints", every=ck.every, keep=ck.keep,
                                 keep_period=ck.keep_period or None, async_save=ck.async_save)
        self.objective, self.dataset, self.workdir, self.config = objective, dataset, workdir, config
        self.meta = {"objective": objective.name, "config": json.loads(config.to_json_best_effort())}
        self.last_good: int | None = None  # set by `restore` and each completed save

    @property
    def directory(self) -> pathlib.Path:
        return self.ckpt.directory

    def restore(self, abstract: TrainState, shardings: TrainState) -> TrainState | None:
        """The newest intact checkpoint's state on `shardings` (and the dataset's position), or None for a fresh
        run; a damaged newer checkpoint is set aside (`Checkpointer.restore_latest`)."""
        if not self.objective.checkpoint_frozen:
            abstract, shardings = abstract.replace(frozen={}), shardings.replace(frozen={})
        try:
            found = self.ckpt.restore_latest(abstract_with_shardings(abstract, shardings))
        except CheckpointMismatchError as e:
            raise ConfigError(run_record.other_run_message(self.workdir, self.config, str(e))) from None
        if found is None:
            return None
        self.last_good, state, data_state, _ = found
        if data_state and hasattr(self.dataset, "set_state"):
            self.dataset.set_state(data_state)
        log.info("resumed from %s at step %d", self.directory, self.last_good)
        return state

    def save(self, step: int, state: TrainState, force: bool) -> None:
        if self.last_good == step:
            return
        data_state = self.dataset.get_state() if hasattr(self.dataset, "get_state") else None
        meta = {**self.meta, **self.objective.export(state), "step": step}
        if not self.objective.checkpoint_frozen:
            state = state.replace(frozen={})
        if self.ckpt.save(step, state, data_state, meta, force=force):
            self.last_good = step

    def __call__(self, ctx: HookContext) -> None:
        self.save(ctx.step, ctx.state, force=ctx.step == ctx.last)

    def where(self) -> str:
        """Where the last good checkpoint is, for error messages (waits for a save in flight)."""
        self.ckpt.wait()
        if self.last_good is None:
            return "no checkpoint was saved yet"
        return f"the last good checkpoint is step {self.last_good} in {self.directory}"

    def check(self) -> None:
        """Raises `CheckpointSaveError` once a background save has failed (cheap; the loop calls it every step)."""
        self.ckpt.check()

    def close(self) -> None:
        """Waits for a save in flight and releases the manager (idempotent)."""
        if self.ckpt is not None:
            self.ckpt.close()
            self.ckpt = None


class MetricsWatch:
    """Reads each step's metrics on the host one step late; stops on a non-finite loss (`stop_on_nan`)."""

    def __init__(self, stop_on_nan: bool, checkpoints: Checkpoints, listeners: list[Callable[[dict], None]] = ()):
        self.stop_on_nan, self.checkpoints, self.listeners = stop_on_nan, checkpoints, list(listeners)
        self.losses: list[float] = []
        self.latest: dict[str, float] | None = None
        self._pending: tuple[int, Any] | None = None

    def push(self, step: int, metrics: dict[str, jax.Array], sync: bool) -> None:
        """Reads the previous step's metrics (this step's too when `sync`) while the device runs on."""
        self.flush()
        self._pending = (step, metrics)
        if sync:
            self.flush()

    def flush(self) -> None:
        if self._pending is None:
            return
        step, metrics = self._pending
        self._pending = None
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if self.stop_on_nan and not math.isfinite(host["loss"]):
            raise FloatingPointError(
                f"loss is {host['loss']} at step {step}; stopping ({self.checkpoints.where()}). Lower optim.lr, raise "
                f"optim.clip_norm protection or check the data; re-running the same command resumes from that checkpoint."
            )
        self.losses.append(host["loss"])
        self.latest = host
        for fn in self.listeners:
            fn(host)


class ScalarLog(Hook):
    """TensorBoard `train/<metric>` (means over the window), `lr/<group>`, throughput and — when `flops` (a callable
    giving the compiled step's FLOPs per device, see ldm_jax/perf.py) is set — TFLOP/s per device and MFU,
    every `log_every`."""

    def __init__(self, writer: Any, every: int, stop: int, global_batch_size: int,
                 flops: Callable[[], float | None] | None = None):
        super().__init__(every=every, name="scalars")
        self.writer, self.stop, self.batch = writer, stop, int(global_batch_size)
        self.window: list[dict] = []
        self.t0 = time.perf_counter()
        self._flops_fn, self._flops = flops, None
        self.perf: dict[str, float] = {}

    def add(self, host: dict) -> None:
        self.window.append(host)

    def due(self, step: int, last: int) -> bool:
        return step % self.every == 0 or step == self.stop

    def __call__(self, ctx: HookContext) -> None:
        window, seconds = self.window, time.perf_counter() - self.t0
        self.window, self.t0 = [], time.perf_counter()
        if not window:
            return
        step_time = seconds / len(window)
        if self._flops_fn is not None:
            self._flops, self._flops_fn = self._flops_fn(), None
        if self._flops:
            self.perf = perf.utilisation(self._flops, step_time)
        if self.writer is None:
            return
        for k in window[0]:
            self.writer.add_scalar(f"train/{k}", float(np.mean([m[k] for m in window])), ctx.step)
        for g, sched in ctx.objective.schedules().items():
            self.writer.add_scalar(f"lr/{g}", float(sched(ctx.step - 1)), ctx.step)
        self.writer.add_scalar("perf/step_time_s", step_time, ctx.step)
        self.writer.add_scalar("perf/images_per_s", len(window) * self.batch / max(seconds, 1e-9), ctx.step)
        for k, v in self.perf.items():
            self.writer.add_scalar(f"perf/{k}", v, ctx.step)
        self.writer.flush()


class ProgressBar(Hook):
    """tqdm over the run's steps (process 0); loss and images/s shown every `log_every` steps."""

    sync = False

    def __init__(self, start: int, total: int, log_every: int, stop: int, global_batch_size: int,
                 scalars: ScalarLog | None = None):
        super().__init__(every=1, name="progress")
        self.scalars = scalars  # shows its MFU when it has one
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
        self.log_every, self.stop, self.batch = log_every, stop, int(global_batch_size)
        self.n, self.t0 = 0, time.perf_counter()

    def __call__(self, ctx: HookContext) -> None:
        self.n += 1
        if (ctx.step % self.log_every == 0 or ctx.step == self.stop) and ctx.metrics is not None:
            seconds = max(time.perf_counter() - self.t0, 1e-9)
            extra = {"mfu": f"{100 * self.scalars.perf['mfu']:.1f}%"} if self.scalars and self.scalars.perf else {}
            self.bar.set_postfix(loss=f"{ctx.metrics['loss']:.4f}", img_s=f"{self.n * self.batch / seconds:.1f}",
                                 **extra)
            self.n, self.t0 = 0, time.perf_counter()
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class Preemption:
    """Turns SIGTERM into a flag the loop polls, so the run saves and exits between steps."""

    def __init__(self):
        self.flag = False
        self._old = None

    def __enter__(self) -> "Preemption":
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. under some test runners): no handler
            self._old = None
        return self

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def requested(self) -> bool:
        """Whether any process got SIGTERM (all processes agree, so they save the same step together)."""
        if jax.process_count() == 1:
            return self.flag
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.flag))))


def tensorboard(workdir: pathlib.Path) -> Any:
    """A tensorboardX writer for WORKDIR/tb on process 0, None elsewhere."""
    if jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(workdir / "tb"))
