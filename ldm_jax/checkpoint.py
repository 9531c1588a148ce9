"""Orbax checkpoints of the whole train state: async saves, keep policy, restore onto any mesh.

A checkpoint directory `WORKDIR/checkpoints/<step>/` holds three items:
  state   the TrainState (step, params, EMA, optimizer, frozen weights, extra arrays, RNG), sharded arrays
  data    the input iterator's JSON state (exact resume)
  meta    small JSON facts for readers (objective name, scale_factor, the config)
Orbax writes into a temporary directory and renames it when complete, so a kill -9 never leaves a
half-written checkpoint that `latest_step()` would return.
"""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves every `every` steps (async), keeps the last `keep` plus every `keep_period`-th; restores onto any mesh."""

    def __init__(
        self, directory: str | pathlib.Path, *, every: int = 1000, keep: int = 3, keep_period: int | None = None,
        async_save: bool = True,
    ):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(int(every), 1),
            max_to_keep=int(keep) if keep else None,
            keep_period=int(keep_period) if keep_period else None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether the interval policy saves at `step`."""
        return self.manager.should_save(step)

    def save(self, step: int, state: Any, data_state: Any = None, meta: dict | None = None, *, force: bool = False) -> bool:
        """Starts saving (returns at once when async); `force` saves regardless of the interval."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state if data_state is not None else {}),
            meta=ocp.args.JsonSave(meta or {}),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, Any, dict]:
        """(state, data_state, meta) of `step` (None = latest), placed with the shardings of `abstract_state`.

        `abstract_state` is a tree of `jax.ShapeDtypeStruct` with `.sharding` (e.g. from
        `ldm_jax.training.state.state_shardings`), so a checkpoint written on 8 devices loads onto 1 and back.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
            ),
        )
        return out.state, out.data, out.meta

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON metadata of a checkpoint without touching its arrays."""
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        """Blocks until pending async saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (the restore target)."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
