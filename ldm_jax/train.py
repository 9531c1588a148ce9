"""`python -m ldm_jax.train --config=configs/NAME.py[:ARG] --workdir=DIR [--config.key=value ...]`.

Trains the objective of the config (latent diffusion or the first-stage autoencoder) in DIR; running
the same command again resumes from the newest complete checkpoint. A config that carries
`first_stage_train` (a nested autoencoder training config) is a two-stage job: the autoencoder is
trained first into DIR/first_stage (resumable, skipped once finished), then the LDM stage loads it
as its frozen first stage (with `scale_by_std` when the config asks for it).

`--dry_run` prints the state's memory per device on the config's mesh (shape-only, `training/memory.py`;
`--devices=N` plans for N devices instead of the visible ones) and exits without reading weights or data.
"""
from __future__ import annotations

import json
import logging
import pathlib
import re
import sys
import time

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from ldm_jax import cli, evaluation, sharding
from ldm_jax.checkpoint import CheckpointSaveError, Checkpointer, DamagedCheckpointError
from ldm_jax.data.builders import DataError
from ldm_jax.training import eval_hook, loop, memory, registry
from ldm_jax.training.objective import ConfigError
from ldm_jax.training.timing import StageTimes, timed_hooks


def first_stage_done(workdir: pathlib.Path, num_steps: int) -> bool:
    """Whether an autoencoder workdir holds a complete checkpoint at its final step."""
    if not (workdir / "checkpoints").is_dir():
        return False
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        return (ckpt.latest_step() or 0) >= num_steps
    finally:
        ckpt.close()


def train_stage(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, times: StageTimes | None = None,
                name: str = "training") -> loop.TrainResult:
    """One training run: the objective named by the config, with its own hooks, in `workdir`.

    With `times`, its wall time is split into `name/...` stages: the data pipeline's open (and cache build),
    the waits for batches, the first step (trace + compile), the steps, each hook."""
    objective = registry.make_objective(config, workdir)
    hooks = [*objective.hooks(), *eval_hook.eval_hooks(config, objective, workdir)]  # config.eval: FID/KID/CLIP
    if times is None:
        return loop.train(config, workdir, objective, hooks=hooks)
    workdir, mesh = loop.setup(config, workdir, objective)  # bad input fails before the data is opened
    with times(f"{name}/data: open (+ cache build)"):
        dataset = objective.make_dataset(mesh)
    try:
        return loop.train(config, workdir, objective, hooks=timed_hooks(hooks, times, name, f"{name}/data"),
                          dataset=times.wrap(dataset, f"{name}/data"), mesh=mesh)
    finally:
        getattr(dataset, "close", lambda: None)()


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> loop.TrainResult:
    """Runs (or resumes) the whole job of `config` in `workdir`; returns the final stage's TrainResult.

    Ends with a table of where the wall time went, printed and kept as WORKDIR/timing.json."""
    workdir, times, t0 = pathlib.Path(workdir), StageTimes(), time.perf_counter()
    fs_cfg = config.get("first_stage_train")
    name = "stage 2" if fs_cfg is not None else "training"
    if fs_cfg is not None:
        fs_dir = workdir / "first_stage"
        if first_stage_done(fs_dir, int(fs_cfg.num_steps)):
            logging.info("first stage already trained in %s; skipping to the LDM stage", fs_dir)
        else:
            logging.info("stage 1/2: training the first stage in %s", fs_dir)
            with times("stage 1"):
                train_stage(fs_cfg, fs_dir, times, "stage 1")
        with config.unlocked():
            config.first_stage.checkpoint = str(fs_dir)
        logging.info("stage 2/2: training the latent diffusion model in %s", workdir)
    with times(name):
        result = train_stage(config, workdir, times, name)
    if config.get("final_eval") is not None:  # e.g. configs/shapes.py: score held-out prompts -> WORKDIR/eval.json
        with times("final eval"):
            evaluation.run_final_eval(config, workdir)
    for top in [k for k in times.seconds if "/" not in k and times.total(k) > 0]:  # what the parts do not cover
        times.add(f"{top}/rest: setup, state init, restore, saves", max(times.seconds[top] - times.total(top), 0.0))
    if jax.process_index() == 0:
        wall = time.perf_counter() - t0
        print(times.summary(total=wall, title="time per stage"), flush=True)
        (workdir / "timing.json").write_text(
            json.dumps({"wall_seconds": round(wall, 3), "stages": times.to_dict()}, indent=2) + "\n")
    return result


def main(argv: list[str]) -> None:
    del argv
    if flags.FLAGS.verbosity <= 0:
        # Orbax and tfds log every checkpoint file operation at INFO through absl; ours stay (--verbosity=1: all).
        logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        cfg = flags.FLAGS.config
        cfg.get("objective")  # ml_collections reports a config file it could not load only when first used
    except OSError as e:
        sys.exit(f"config error: {cli.one_line(e)}")
    try:
        sharding.set_cpu_devices(cfg.get("cpu_devices", 0))  # before anything starts JAX's backends
    except ValueError as e:
        sys.exit(f"config error: {cli.one_line(e)}")
    sharding.initialize_distributed()
    cli.enable_compile_cache()
    try:
        if flags.FLAGS.dry_run:
            print(memory.report(cfg, registry.make_objective(cfg), flags.FLAGS.devices or None), flush=True)
            return
        run(cfg, flags.FLAGS.workdir)
    except (ConfigError, DataError) as e:
        logging.error("%s", e)
        sys.exit(f"config error: {cli.one_line(e)}")
    except (CheckpointSaveError, DamagedCheckpointError) as e:  # the run stopped; the message says how to go on
        logging.error("%s", e)
        sys.exit(f"checkpoint error: {cli.one_line(e)}")


def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:ARG]", lock_config=True)
    flags.DEFINE_string("workdir", None, "directory for checkpoints, TensorBoard logs and samples")
    flags.DEFINE_bool("dry_run", False, "print the parameter / optimizer-state memory per device and exit")
    flags.DEFINE_integer("devices", 0, "with --dry_run: the device count to plan the mesh for (0: the visible ones)")
    flags.mark_flags_as_required(["config", "workdir"])


def _flag_error(text: str) -> str:
    """One line from absl's flag error; ml_collections embeds the config file's traceback: keep its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback (most recent call last)" not in text:
        return " ".join(lines)
    flag = re.match(r"flag (--\S+?): ", lines[0])
    last = re.sub(r"^\w+(Error|Exception): ", "", lines[-1])
    return f"{flag.group(1)}: {last}" if flag else last


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, but a config file's own error (`:bogus` -> "unknown ldm_tiny arguments ...") or an
    unknown --config.<key> ends the output as one `config error:` line instead of absl's usage hint."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"config error: {_flag_error(str(e))}")
    except (KeyError, AttributeError) as e:  # ml_collections rejects an unknown --config.<key> while parsing flags
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        sys.exit(f"config error: unknown config key {str(e).strip(chr(34))} among {overrides}: check its spelling "
                 "against the config file (configs are locked: a typo cannot silently add a new key)")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    _define_flags()
    app.run(main, flags_parser=_parse_flags)
