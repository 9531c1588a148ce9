"""The one training loop: sharded state, jitted step with donation, checkpoints, preemption, logging, hooks.

Both objectives (LDM, autoencoder) run through `train(config, workdir)`; see
`ldm_jax.training.objective` for what an objective provides.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import signal
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from ldm_jax import sharding as shd
from ldm_jax.checkpoint import Checkpointer, abstract_with_shardings
from ldm_jax.training.objective import ConfigError
from ldm_jax.training.state import TrainState, create_state, ema_decay, state_shardings, update_ema

log = logging.getLogger("ldm_jax.train")


# ---------------------------------------------------------------------------------------------- config
def default_loop_config() -> ml_collections.ConfigDict:
    """Keys every training config has (objective-specific blocks are added by the objective's configs)."""
    return ml_collections.ConfigDict(
        dict(
            objective="ldm",
            seed=0,
            mesh=(-1, 1, 1),  # (data, fsdp, tensor); one -1 takes the remaining devices
            global_batch_size=8,
            num_steps=1000,
            log_every=50,
            stop_on_nan=True,
            progress=True,
            ema=dict(decay=0.9999, warmup=True),
            checkpoint=dict(every=1000, keep=3, keep_period=0, async_save=True),
        )
    )


def make_objective(config: ml_collections.ConfigDict, workdir: str | pathlib.Path | None = None) -> Any:
    """The objective named by `config.objective` ("ldm" | "autoencoder")."""
    if config.objective == "ldm":
        from ldm_jax.training import ldm

        return ldm.build(config, workdir=workdir)
    if config.objective == "autoencoder":
        from ldm_jax.training import autoencoder

        return autoencoder.build(config)
    raise ConfigError(f"config.objective={config.objective!r} is unknown; use 'ldm' or 'autoencoder'")


def check_config(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Fails before compiling when the batch does not fit the mesh."""
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


# ----------------------------------------------------------------------------------------------- hooks
@dataclasses.dataclass
class HookContext:
    """What a hook sees: the step just finished and the state after it."""

    step: int
    state: TrainState
    mesh: Mesh
    workdir: pathlib.Path
    writer: Any  # tensorboardX SummaryWriter or None (processes other than 0)
    objective: Any


@dataclasses.dataclass
class Hook:
    """Periodic host-side work; runs after every `every`-th step (and at the last step when `at_end`)."""

    every: int
    fn: Callable[[HookContext], None]
    name: str = "hook"
    at_end: bool = True

    def due(self, step: int, last: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or (self.at_end and step == last))


# ------------------------------------------------------------------------------------------------ step
def make_train_step(objective: Any, ema_cfg: ml_collections.ConfigDict) -> Callable:
    """`step(state, batch, key) -> (state, metrics)`: the objective's update, then step += 1 and EMA.

    Memoized per objective so that several runs in one process (tests, two-stage flows) share compilations.
    """
    cache = objective.__dict__.setdefault("_ldm_jax_step_cache", {})
    ema_key = (float(ema_cfg.decay), bool(ema_cfg.warmup))
    if ema_key in cache:
        return cache[ema_key]

    def step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array) -> tuple[TrainState, dict]:
        new, metrics = objective.train_step(state, batch, key)
        n = state.step + 1
        decay = ema_decay(n, ema_cfg.decay, ema_cfg.warmup)
        ema = {g: update_ema(state.ema[g], new.params[g], decay) for g in state.ema}
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        return new.replace(step=n, ema=ema), metrics

    cache[ema_key] = step
    return step


def jit_train_step(objective: Any, config: ml_collections.ConfigDict, mesh: Mesh, state_sh: Any, batch_spec: Any) -> Callable:
    """The train step jitted with explicit in/out shardings and the state donated."""
    batch_sh = jax.tree_util.tree_map(lambda x: shd.batch_sharding(mesh, len(x.shape)), batch_spec)
    rep = shd.replicated(mesh)
    step = make_train_step(objective, config.ema)
    # The objective sees the mesh while it is traced (jax.sharding.get_abstract_mesh()): optim.accumulate needs it
    # to run its shard_map. One wrapper per (step, mesh), so that runs in one process still share compilations.
    cache = objective.__dict__.setdefault("_ldm_jax_mesh_step_cache", {})
    if (step, mesh) not in cache:
        abstract = mesh.abstract_mesh

        def step_in_mesh(state, batch, key):
            with jax.sharding.use_abstract_mesh(abstract):
                return step(state, batch, key)

        cache[(step, mesh)] = step_in_mesh
    return jax.jit(
        cache[(step, mesh)],
        in_shardings=(state_sh, batch_sh, rep),
        out_shardings=(state_sh, rep),
        donate_argnums=(0,),
    )


def step_key(rng: jax.Array, step: int) -> jax.Array:
    """The key of update `step`: fold_in(run key, step), so a resumed run draws what the original drew."""
    return jax.random.fold_in(jax.random.wrap_key_data(rng), step)


# ------------------------------------------------------------------------------------------------ loop
class _Preemption:
    """Turns SIGTERM into a flag the loop polls, so the run saves and exits between steps."""

    def __init__(self):
        self.flag = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. under some test runners): no handler
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.flag))))


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the final state, the per-step losses it ran and why it stopped."""

    state: TrainState
    losses: list[float]
    stopped: str  # "done" | "preempted"
    start_step: int


def _writer(workdir: pathlib.Path):
    if jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(workdir / "tb"))


def train(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    objective: Any = None,
    dataset: Iterator[dict[str, jax.Array]] | None = None,
    mesh: Mesh | None = None,
    max_steps: int | None = None,
) -> TrainResult:
    """Trains (or resumes) `config` in `workdir` until `config.num_steps`; `max_steps` stops earlier (tests)."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = mesh if mesh is not None else shd.mesh_from_config(config.mesh)
    check_config(config, mesh)
    objective = objective if objective is not None else make_objective(config, workdir)
    if hasattr(objective, "validate"):
        objective.validate(mesh)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    ck = config.checkpoint
    ckpt = Checkpointer(workdir / "checkpoints", every=ck.every, keep=ck.keep, keep_period=ck.keep_period or None,
                        async_save=ck.async_save)
    abstract, state_sh = state_shardings(objective, mesh, config.seed)
    own_dataset = dataset is None
    if own_dataset:
        dataset = objective.make_dataset(mesh)

    bar = writer = None
    try:
        latest = ckpt.latest_step()
        if latest is not None:
            state, data_state, _ = ckpt.restore(latest, abstract_with_shardings(abstract, state_sh))
            if data_state and hasattr(dataset, "set_state"):
                dataset.set_state(data_state)
            log.info("resumed from %s at step %d", ckpt.directory, latest)
            first_batch = None
        else:
            state = create_state(objective, mesh, config.seed)
            if hasattr(objective, "load_pretrained"):
                state = objective.load_pretrained(state, mesh)
            first_batch = next(dataset)
            if hasattr(objective, "prepare"):
                state = jax.jit(objective.prepare, out_shardings=state_sh)(state, first_batch)

        start = int(jax.device_get(state.step))
        total = int(config.num_steps)
        stop_at = total if max_steps is None else min(total, max_steps)
        batch = first_batch if first_batch is not None else next(dataset)
        step_fn = jit_train_step(objective, config, mesh, state_sh, batch)
        keygen = jax.jit(step_key, out_shardings=shd.replicated(mesh))
        hooks = list(objective.hooks()) if hasattr(objective, "hooks") else []
        writer = _writer(workdir)
        meta = {"objective": objective.name, "config": json.loads(config.to_json_best_effort())}

        losses: list[float] = []
        pending: tuple[int, dict] | None = None
        window: list[dict] = []
        last_good = latest
        t_window = time.perf_counter()
        bar = _progress(config, start, total)
        stopped = "done"

        def check(step: int, metrics: dict) -> None:
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if config.stop_on_nan and not math.isfinite(host["loss"]):
                ckpt.wait()
                where = f"the last good checkpoint is step {last_good} in {ckpt.directory}" if last_good is not None else "no checkpoint was saved yet"
                raise FloatingPointError(
                    f"loss is {host['loss']} at step {step}; stopping ({where}). Lower optim.lr, raise optim.clip_norm "
                    f"protection or check the data; re-running the same command resumes from that checkpoint."
                )
            losses.append(host["loss"])
            window.append(host)

        def save(step: int, force: bool) -> None:
            nonlocal last_good
            if last_good == step:
                return
            data_state = dataset.get_state() if hasattr(dataset, "get_state") else None
            extra = objective.export(state) if hasattr(objective, "export") else {}
            if ckpt.save(step, state, data_state, {**meta, **extra, "step": step}, force=force):
                last_good = step

        with _Preemption() as preempt:
            step = start
            while step < stop_at:
                key = keygen(state.rng, step)
                state, metrics = step_fn(state, batch, key)
                step += 1
                if pending is not None:  # read the previous step's metrics while this one runs
                    check(*pending)
                pending = (step, metrics)
                due_save = step % max(int(ck.every), 1) == 0 or step == total
                if due_save or any(h.due(step, total) for h in hooks) or step % config.log_every == 0 or step == stop_at:
                    check(*pending)
                    pending = None
                if step % config.log_every == 0 or step == stop_at:
                    t_now = time.perf_counter()
                    _log(writer, objective, window, step, config.global_batch_size, t_now - t_window)
                    if bar is not None and window:
                        bar.set_postfix(loss=f"{window[-1]['loss']:.4f}",
                                        img_s=f"{len(window) * config.global_batch_size / max(t_now - t_window, 1e-9):.1f}")
                    window, t_window = [], t_now
                if bar is not None:
                    bar.update(1)
                if due_save:
                    save(step, force=step == total)
                for h in hooks:
                    if h.due(step, total):
                        h.fn(HookContext(step, state, mesh, workdir, writer, objective))
                if preempt.requested():
                    if pending is not None:
                        check(*pending)
                        pending = None
                    save(step, force=True)
                    stopped = "preempted"
                    log.warning("SIGTERM: saved step %d to %s, exiting", step, ckpt.directory)
                    break
                if step < stop_at:
                    batch = next(dataset)
            if pending is not None:
                check(*pending)
    finally:
        ckpt.close()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        # The prefetch thread is a daemon: left running, it can touch JAX during interpreter shutdown and abort.
        if own_dataset and hasattr(dataset, "close"):
            dataset.close()
    return TrainResult(state=state, losses=losses, stopped=stopped, start_step=start)


def _progress(config: ml_collections.ConfigDict, start: int, total: int):
    if not config.progress or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _log(writer, objective, window: list[dict], step: int, batch: int, seconds: float) -> None:
    if writer is None or not window:
        return
    for k in window[0]:
        writer.add_scalar(f"train/{k}", float(np.mean([m[k] for m in window])), step)
    for g, sched in objective.schedules().items():
        writer.add_scalar(f"lr/{g}", float(sched(step - 1)), step)
    writer.add_scalar("perf/step_time_s", seconds / len(window), step)
    writer.add_scalar("perf/images_per_s", len(window) * batch / max(seconds, 1e-9), step)
    writer.flush()
