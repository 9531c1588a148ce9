"""`config.objective` -> its builder: the one place that knows every objective (the entry points use it).

A builder is `build(config, workdir=None) -> Objective`; add a new objective here (see `training.objective`).
"""
from __future__ import annotations

import pathlib
from typing import Callable

import ml_collections

from ldm_jax.training import autoencoder, dreambooth, ldm, lora
from ldm_jax.training.objective import ConfigError, Objective

Builder = Callable[..., Objective]

OBJECTIVES: dict[str, Builder] = {
    "ldm": ldm.build,
    "autoencoder": autoencoder.build,
    "lora": lora.build,  # LoRA fine-tuning of an LDM (training/lora.py)
    "dreambooth": dreambooth.build,  # DreamBooth, full UNet fine-tune or LoRA (training/dreambooth.py)
    "dreambooth_lora": dreambooth.build,
}


def make_objective(config: ml_collections.ConfigDict, workdir: str | pathlib.Path | None = None) -> Objective:
    """The objective named by `config.objective`, built for `workdir` (where e.g. a trained tokenizer lives)."""
    name = config.get("objective")
    if name not in OBJECTIVES:
        raise ConfigError(f"config.objective={name!r} is unknown; use one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](config, workdir=workdir)
