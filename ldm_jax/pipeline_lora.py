"""LoRAs loaded into a pipeline: several at once, each with its own scale, merged or applied on the fly.

On the fly (the default): `attach(params)` adds the loaded adapters and their scales (float32 scalars) to
the params tree the pipeline's jitted program receives, and `apply(params)` — the program's first step —
adds Σ scale_i · Δ_i to the targeted kernels (`ldm_jax.models.lora.apply`). The scales are traced
arguments, so changing one reuses the compiled program; loading or removing a LoRA changes the tree and
compiles once more. `merge(params)` bakes the current LoRAs into the weights (faster sampling, nothing to
add per call); `unmerge()` gives back the exact base tree it kept.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from ldm_jax.interop import lora as lora_io
from ldm_jax.models import lora

MODELS = {"unet": "unet", "text": "text_encoder"}  # our model key -> the Pipeline attribute holding the module
KEY = "loras"


def module_kwargs(module: nn.Module) -> dict[str, Any]:
    """The constructor kwargs of a flax module (its dataclass fields, without parent/name)."""
    return {f.name: getattr(module, f.name) for f in dataclasses.fields(module) if f.name not in ("parent", "name")}


class PipelineLoras:
    """The LoRAs of one pipeline: {name: (adapters per model, scale)}, plus the base kept while merged."""

    def __init__(self) -> None:
        self.adapters: dict[str, dict[str, Any]] = {}
        self.scales: dict[str, float] = {}
        self._base: Any = None

    @property
    def merged(self) -> bool:
        return self._base is not None

    def load(self, pipeline: Any, path: str | os.PathLike, *, name: str | None = None, scale: float = 1.0) -> str:
        """Reads a diffusers/peft or kohya LoRA file for `pipeline`'s models; returns its name."""
        if self.merged:
            raise ValueError("unmerge_loras() before loading another LoRA")
        trees, _ = lora_io.load(path, pipeline.lora_kwargs())
        return self.add(pipeline, trees, name=name or pathlib.Path(path).stem, scale=scale)

    def add(self, pipeline: Any, trees: Mapping[str, Any], *, name: str, scale: float = 1.0) -> str:
        """Adds adapters already in memory ({"unet"[, "text"]: adapters with their "alpha" leaves})."""
        if self.merged:
            raise ValueError("unmerge_loras() before adding another LoRA")
        unknown = sorted(set(trees) - set(MODELS))
        if unknown:
            raise KeyError(f"LoRA {name!r} adapts {unknown}; a pipeline takes LoRAs of {sorted(MODELS)}")
        self.adapters[name] = jax.device_put(dict(trees), jax.sharding.NamedSharding(pipeline.mesh, jax.sharding.PartitionSpec()))
        self.scales[name] = float(scale)
        return name

    def set_scale(self, name: str, scale: float) -> None:
        """Changes one LoRA's weight (no recompile)."""
        if name not in self.adapters:
            raise KeyError(f"no LoRA named {name!r}; loaded: {sorted(self.adapters)}")
        if self.merged:
            raise ValueError("the LoRAs are merged: unmerge_loras() before changing a scale")
        self.scales[name] = float(scale)

    def remove(self, name: str) -> None:
        if self.merged:
            raise ValueError("unmerge_loras() before removing a LoRA")
        self.adapters.pop(name)
        self.scales.pop(name)

    def attach(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """params + the LoRAs to apply in the program (unchanged when none are loaded or they are merged)."""
        if not self.adapters or self.merged:
            return dict(params)
        return {**params, KEY: [(self.adapters[n], jnp.float32(self.scales[n])) for n in sorted(self.adapters)]}

    def merge(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The base with the LoRAs baked in at their current scales (kept: the base, for `unmerge`)."""
        if self.merged:
            raise ValueError("the LoRAs are merged already")
        merged = jax.jit(apply)(self.attach(params))
        self._base = dict(params)
        return jax.tree_util.tree_map(lambda m, b: m.astype(b.dtype), merged, dict(params))

    def unmerge(self) -> dict[str, Any]:
        """The exact base params `merge` received."""
        if not self.merged:
            raise ValueError("no LoRAs are merged")
        base, self._base = self._base, None
        return base


def apply(params: Mapping[str, Any]) -> dict[str, Any]:
    """Inside the program: params with the attached LoRAs added to their models' kernels (the key removed)."""
    params = dict(params)
    loras = params.pop(KEY, None)
    if not loras:
        return params
    for m in MODELS:
        these = [(trees[m], scale) for trees, scale in loras if m in trees]
        if these:
            params[m] = lora.apply(params[m], these)
    return params


class LoraMethods:
    """The Pipeline's LoRA methods (its `loras` attribute is a `PipelineLoras`)."""

    loras: PipelineLoras
    params: Any

    def load_lora(self, path: str | os.PathLike, *, name: str | None = None, scale: float = 1.0) -> str:
        """Loads a diffusers/peft or kohya LoRA file, applied at `scale` from the next call on; returns its name."""
        return self.loras.load(self, path, name=name, scale=scale)

    def add_lora(self, adapters: Mapping[str, Any], *, name: str, scale: float = 1.0) -> str:
        """Adds in-memory adapters ({"unet"[, "text"]: trees with "alpha" leaves}, e.g. a LoRA run's) at `scale`."""
        return self.loras.add(self, adapters, name=name, scale=scale)

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Changes a loaded LoRA's scale; the compiled programs are reused."""
        self.loras.set_scale(name, scale)

    def remove_lora(self, name: str) -> None:
        self.loras.remove(name)

    def merge_loras(self) -> None:
        """Bakes the loaded LoRAs into the weights at their current scales (`unmerge_loras` restores them exactly)."""
        self.params = self.loras.merge(self.params)

    def unmerge_loras(self) -> None:
        self.params = self.loras.unmerge()

    def lora_kwargs(self) -> dict[str, Any]:
        """{"unet", ["text"]: constructor kwargs}: what `ldm_jax.interop.lora.save/load` need for this pipeline."""
        return {m: module_kwargs(getattr(self, a)) for m, a in MODELS.items()
                if getattr(self, a, None) is not None}
