"""A training workdir's record of its configuration, and whether a new configuration may resume it.

`WORKDIR/config.json` says what run the workdir holds. It is written only once the configuration is known to
fit the workdir (a fresh run, or a resume whose state matches the checkpoint), never by a rejected one. When a
resume changes settings that keep the state's shapes (a lower `optim.lr`, more `num_steps`), the previous
record is kept as `config.<step>.json` (what trained up to that step) before config.json is replaced.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import jax
import ml_collections

log = logging.getLogger("ldm_jax.train")

# Keys that say how to run, not what is trained: changing them on resume is routine and not reported.
RUN_KEYS = ("num_steps", "log_every", "progress", "mesh", "cpu_devices")
RUN_SECTIONS = ("checkpoint.", "sample.", "eval.", "final_eval.")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of nested dicts (JSON lists and tuples compare equal: both become lists)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def as_dict(config: ml_collections.ConfigDict) -> dict:
    """The config as its JSON record reads back."""
    return json.loads(config.to_json_best_effort())


def stored_config(workdir: pathlib.Path) -> dict | None:
    """WORKDIR/config.json, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((workdir / "config.json").read_text())
    except (OSError, ValueError):
        return None


def differences(stored: dict, new: dict, *, include_run_keys: bool = False) -> list[str]:
    """`key: stored -> new` for every key whose value differs (run-control keys left out unless asked)."""
    a, b = flatten(stored), flatten(new)
    out = []
    for key in sorted(a.keys() | b.keys()):
        if not include_run_keys and (key in RUN_KEYS or key.startswith(RUN_SECTIONS)):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


def other_run_message(workdir: pathlib.Path, config: ml_collections.ConfigDict, detail: str) -> str:
    """The error for a resume whose state does not fit the workdir's checkpoint (`detail`: what orbax saw)."""
    stored = stored_config(workdir)
    if stored is None:
        keys = "it has no readable config.json to compare with"
    else:
        diff = differences(stored, as_dict(config))
        keys = ("keys that differ from its config.json: " + "; ".join(diff[:8]) + (" ..." if len(diff) > 8 else "")
                if diff else "its config.json shows no differing key")
    return (f"{workdir} holds a run of another configuration ({keys}; {detail}). Nothing was changed. Start a new "
            f"run with another --workdir, or resume this one with the configuration in {workdir / 'config.json'}")


def record_config(workdir: pathlib.Path, config: ml_collections.ConfigDict, start_step: int) -> None:
    """Writes config.json once the run is known to fit; a resume with changed settings keeps the old record."""
    if jax.process_index() != 0:
        return
    path = workdir / "config.json"
    stored = stored_config(workdir)
    if stored is not None and start_step > 0:
        diff = differences(stored, as_dict(config), include_run_keys=True)
        if not diff:
            return
        changed = differences(stored, as_dict(config))
        if changed:
            log.warning("resuming %s at step %d with changed settings: %s", workdir, start_step, "; ".join(changed))
        older = workdir / f"config.{start_step}.json"
        if not older.exists():  # a second resume from the same step keeps the record of what trained up to it
            os.replace(path, older)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(config.to_json_best_effort(indent=2))
    os.replace(tmp, path)
