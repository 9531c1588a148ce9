"""Orbax checkpoints of the whole train state: async saves, keep policy, checksums, restore onto any mesh.

A checkpoint directory `WORKDIR/checkpoints/<step>/` holds three items:
  state   the TrainState (step, params, EMA, optimizer, frozen weights, extra arrays, RNG), sharded arrays
  data    the input iterator's JSON state (exact resume)
  meta    small JSON facts for readers (objective name, scale_factor, the config)
and `checksums.json`: the size and CRC-32 of every file, written inside the checkpoint before orbax renames
its temporary directory into place. Orbax's rename makes a kill -9 never leave a half-written checkpoint that
`latest_step()` would return; the checksums catch what happens to the files afterwards (a truncated or
bit-flipped array file, a deleted metadata file), which orbax itself reads back as garbage or fails on deep
inside tensorstore. `restore_latest` verifies, moves a damaged checkpoint aside to `checkpoints-damaged/`
(for inspection) with a warning and falls back to the previous complete one. A save that fails (no space
left, quota, I/O error) raises `CheckpointSaveError` naming the directory; the previous checkpoint is untouched.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import zlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from ldm_jax import distributed

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"
# Orbax rewrites the step metadata (commit timestamp) after the checksums are taken: checked for presence only.
_UNCHECKED = ("_CHECKPOINT_METADATA", "commit_success.txt")
# What a checkpoint written without checksums (before they existed) must still have.
_REQUIRED = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt", "data/metadata", "meta/metadata")


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, I/O error); the run must stop."""


class DamagedCheckpointError(RuntimeError):
    """No checkpoint of a run can be restored: every one is damaged."""


class CheckpointMismatchError(ValueError):
    """The checkpoint holds arrays of other names or shapes than the state being restored (another configuration)."""


def _crc32(path: pathlib.Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_checksums(root: pathlib.Path) -> dict[str, list[int]]:
    """{relative path: [size, crc32]} of every file under `root` (but the checksum file itself)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != CHECKSUMS and rel not in _UNCHECKED:
            out[rel] = [path.stat().st_size, _crc32(path)]
    return out


def verify(step_dir: pathlib.Path) -> list[str]:
    """What is wrong with the files of one checkpoint directory (empty when intact)."""
    manifest = step_dir / CHECKSUMS
    if not manifest.is_file():  # written before checksums existed: only the files orbax needs can be checked
        return [f"{name} is missing" for name in _REQUIRED if not (step_dir / name).is_file()]
    try:
        want = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return [f"{CHECKSUMS} is unreadable ({e})"]
    problems = [] if (step_dir / "_CHECKPOINT_METADATA").is_file() else ["_CHECKPOINT_METADATA is missing"]
    for rel, (size, crc) in want.items():
        path = step_dir / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{rel} has {path.stat().st_size} bytes, {size} were written (truncated or overwritten)")
        elif _crc32(path) != crc:
            problems.append(f"{rel} does not match its checksum (bits changed on disk)")
    return problems


def _flat_shapes(tree: Any) -> dict[str, tuple]:
    def name(k) -> str:
        return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(name(k) for k in path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


class Checkpointer:
    """Saves every `every` steps (async), keeps the last `keep` plus every `keep_period`-th; restores onto any mesh."""

    def __init__(
        self, directory: str | pathlib.Path, *, every: int = 1000, keep: int = 3, keep_period: int | None = None,
        async_save: bool = True,
    ):
        self.directory = pathlib.Path(directory).absolute()
        self._async = async_save
        self._saving: int | None = None  # the step being written, for the commit callback and error messages
        self._failed: CheckpointSaveError | None = None
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(int(every), 1),
            max_to_keep=int(keep) if keep else None,
            keep_period=int(keep_period) if keep_period else None,
            enable_async_checkpointing=async_save,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal) if async_save else None,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (not verified: see `restore_latest`), or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether the interval policy saves at `step`."""
        return self.manager.should_save(step)

    # ---- saving -------------------------------------------------------------------------------------------
    def _seal(self, step_dir: pathlib.Path | None = None) -> None:
        """Writes checksums.json into the checkpoint; async saves call it before the directory is renamed."""
        if jax.process_index() != 0 or self._saving is None:
            return
        if step_dir is None:  # the commit callback takes no arguments: the one temporary directory of this step
            found = sorted(self.directory.glob(f"{self._saving}.orbax-checkpoint-tmp*"))
            if len(found) != 1:
                log.warning("cannot find the temporary directory of step %d in %s: not writing checksums",
                            self._saving, self.directory)
                return
            step_dir = found[0]
        tmp = step_dir / (CHECKSUMS + ".tmp")
        tmp.write_text(json.dumps({"files": file_checksums(step_dir)}))
        os.replace(tmp, step_dir / CHECKSUMS)

    def _save_error(self, e: BaseException) -> CheckpointSaveError:
        steps = [s for s in self.all_steps() if s != self._saving]
        previous = f"the previous checkpoint, step {steps[-1]}, is intact" if steps else "no earlier checkpoint exists"
        self._failed = CheckpointSaveError(
            f"could not save step {self._saving} to {self.directory}: {e} -- {previous}; free space (or fix the "
            "error) and re-run the same command to resume from there. Stopping instead of training on unsaved.")
        return self._failed

    def _finish(self) -> None:
        """Waits for the save in flight; a failure becomes a `CheckpointSaveError`."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(e) from e

    def save(self, step: int, state: Any, data_state: Any = None, meta: dict | None = None, *, force: bool = False) -> bool:
        """Starts saving (returns at once when async); `force` saves regardless of the interval."""
        self._finish()  # orbax would wait here anyway; this way its error names the step that failed
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state if data_state is not None else {}),
            meta=ocp.args.JsonSave(meta or {}),
        )
        self._saving = step
        try:
            saved = self.manager.save(step, args=args, force=force)
            if saved and not self._async:
                self._seal(self.directory / str(step))
        except Exception as e:
            raise self._save_error(e) from e
        return saved

    def check(self) -> None:
        """Raises `CheckpointSaveError` as soon as a background save has failed (cheap: call it every step)."""
        try:
            self.manager.check_for_errors()
        except Exception as e:
            raise self._save_error(e) from e

    # ---- restoring ----------------------------------------------------------------------------------------
    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, Any, dict]:
        """(state, data_state, meta) of `step` (None = latest), placed with the shardings of `abstract_state`.

        `abstract_state` is a tree of `jax.ShapeDtypeStruct` with `.sharding` (e.g. from
        `ldm_jax.training.state.state_shardings`), so a checkpoint written on 8 devices loads onto 1 and back.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        self.check_structure(step, abstract_state)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
            ),
        )
        return out.state, out.data, out.meta

    def check_structure(self, step: int, abstract_state: Any) -> None:
        """Raises `CheckpointMismatchError` when `step` holds other array names or shapes than `abstract_state`."""
        try:
            stored = _flat_shapes(ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state").tree)
        except Exception:  # unreadable metadata is damage, which the restore itself reports
            return
        want = _flat_shapes(abstract_state)
        diff = sorted(f"{k}: stored {stored.get(k, 'absent')}, expected {want.get(k, 'absent')}"
                      for k in stored.keys() | want.keys() if stored.get(k) != want.get(k))
        if diff:
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} holds a state of another shape ({len(diff)} arrays "
                f"differ, e.g. {'; '.join(diff[:3])}); it was not changed")

    def latest_intact_step(self) -> int | None:
        """The newest checkpoint whose files pass `verify` (for readers: nothing is moved), or None."""
        for step in reversed(self.all_steps()):
            problems = verify(self.directory / str(step))
            if not problems:
                return step
            log.warning("skipping damaged checkpoint step %d in %s (%s)", step, self.directory, "; ".join(problems[:3]))
        return None

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, Any, dict] | None:
        """(step, state, data_state, meta) of the newest intact checkpoint, or None when there is none.

        A damaged newer checkpoint is moved to `<directory>-damaged/<step>` with a warning naming it and
        what is wrong; when every checkpoint is damaged nothing is moved and `DamagedCheckpointError` says so.
        """
        damaged: list[tuple[int, list[str]]] = []
        for step in reversed(self.all_steps()):
            problems = _agree(verify(self.directory / str(step)))
            out = None
            if not problems:
                try:
                    out = self.restore(step, abstract_state)
                except CheckpointMismatchError:
                    raise
                except Exception as e:  # damage the checksums could not see (a checkpoint written without them)
                    problems = [f"orbax could not read it back ({type(e).__name__}: {str(e)[:300]})"]
                problems = _agree(problems)
            if problems:
                damaged.append((step, problems))
                continue
            self._set_aside(damaged, step)
            return (step, *out)
        if damaged:
            listing = "; ".join(f"step {s}: {', '.join(p[:2])}" for s, p in damaged)
            raise DamagedCheckpointError(
                f"every checkpoint in {self.directory} is damaged ({listing}); nothing was changed. Move the "
                "directory aside (or restore it from a copy) to start again.")
        return None

    def _set_aside(self, damaged: list[tuple[int, list[str]]], good: int) -> None:
        if not damaged:
            return
        aside = self.directory.parent / f"{self.directory.name}-damaged"
        for step, problems in damaged:
            target = aside / str(step)
            n = 1
            while target.exists():
                target, n = aside / f"{step}.{n}", n + 1
            log.warning("checkpoint step %d in %s is damaged (%s); moved it to %s for inspection and resuming "
                        "from step %d", step, self.directory, "; ".join(problems[:3]), target, good)
            _sync(f"ldm_jax_set_aside_{step}")  # every process has decided before the directory moves
            if jax.process_index() == 0:
                aside.mkdir(exist_ok=True)
                os.replace(self.directory / str(step), target)
            _sync(f"ldm_jax_set_aside_{step}_done")
        self.manager.reload()

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON metadata of a checkpoint without touching its arrays."""
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        """Blocks until pending async saves are committed (`CheckpointSaveError` if one failed)."""
        self._finish()

    def close(self) -> None:
        """Waits for pending saves and releases the manager (quietly after a reported save failure)."""
        try:
            self._finish()
            self.manager.close()
        except Exception:
            if self._failed is None:
                raise
            log.debug("closing after the failed save", exc_info=True)


_VOTES = {"n": 0}
_VOTE_TIMEOUT_MS = 30 * 60 * 1000  # processes reach a restore minutes apart on a loaded machine


def _agree(problems: list[str]) -> list[str]:
    """The same verdict on every process (any process' problems count for all), so none restores alone.

    Votes go through the coordination service's key-value store, not a device collective: no compile, and no
    gloo deadline when the processes arrive at the restore far apart."""
    if jax.process_count() == 1:
        return problems
    client = distributed.client()
    _VOTES["n"] += 1
    key = f"ldm_jax/checkpoint_vote/{_VOTES['n']}/"
    client.key_value_set(f"{key}{jax.process_index()}", "1" if problems else "0")
    bad = [i for i in range(jax.process_count()) if client.blocking_key_value_get(f"{key}{i}", _VOTE_TIMEOUT_MS) == "1"]
    if problems or not bad:
        return problems
    return [f"process(es) {bad} could not read it"]


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        distributed.client().wait_at_barrier(name, _VOTE_TIMEOUT_MS)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (the restore target)."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
