"""Shared set-up of the training tests: the tiny LDM test config, its objective and synthetic batches."""
from __future__ import annotations

import importlib.util
import pathlib

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str = ""):
    """configs/<name>.py:get_config(arg)."""
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def tiny_config(arg: str = "test", **overrides):
    c = load_config("ldm_tiny", arg)
    with c.unlocked():
        for k, v in overrides.items():
            node = c
            *path, last = k.split(".")
            for p in path:
                node = node[p]
            node[last] = v
    return c


_OBJECTIVES: dict = {}


def shared_objective(arg: str = "test"):
    """One LDM objective per config variant for the whole pytest process, so that test modules share
    compiled train steps (the loop memoizes its jitted functions on the objective)."""
    from ldm_jax.training import ldm

    if arg not in _OBJECTIVES:
        _OBJECTIVES[arg] = ldm.build(tiny_config(arg))
    return _OBJECTIVES[arg]


def batches(config, mesh, seed: int = 0):
    from ldm_jax.training.synthetic import SyntheticBatches

    text = int(config.cond.text.max_length) if config.cond.type == "text" else 0
    vocab = int(config.cond.text.vocab_size) if config.cond.type == "text" else 1
    classes = int(config.cond.num_classes) if config.cond.type == "class" else 0
    return SyntheticBatches(mesh, int(config.global_batch_size), int(config.image_size), text_length=text,
                            vocab_size=vocab, num_classes=classes, seed=seed)


def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
