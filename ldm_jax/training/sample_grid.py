"""The LDM objective's hook: sample grids with the EMA weights (fixed prompts and seed)."""
from __future__ import annotations

import logging
import pathlib
from typing import Any

import numpy as np

from ldm_jax.images import image_grid
from ldm_jax.pipeline import Pipeline
from ldm_jax.training.objective import Hook, HookContext

log = logging.getLogger("ldm_jax.train")


def write_grid(images: np.ndarray, path: pathlib.Path, writer: Any, tag: str, step: int) -> None:
    """Saves a grid PNG and logs it to TensorBoard."""
    from PIL import Image

    grid = image_grid(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    if writer is not None:
        writer.add_image(tag, grid, step, dataformats="HWC")
        writer.flush()


def sampling_pipeline(objective: Any, mesh: Any) -> Pipeline | None:
    """A Pipeline for the objective's models from its `sampling_spec` (weights are passed per call); None for a
    text model without a tokenizer."""
    spec = objective.sampling_spec()
    if spec["text"] is not None and objective.tokenizer is None:
        return None
    tokenizer = objective.tokenizer if spec["text"] is not None else None
    pipe = Pipeline.from_configs(spec["unet"], spec["vae"], spec["text"], tokenizer, spec["scheduler"], mesh=mesh,
                                 default_size=spec["image_size"])
    pipe.force_zeros_for_empty_prompt = bool(spec.get("options", {}).get("force_zeros_for_empty_prompt", False))
    return pipe


class SampleGrid(Hook):
    """Writes WORKDIR/samples/step_<N>.png and TensorBoard `samples` from the EMA weights."""

    def __init__(self, objective: Any, every: int):
        super().__init__(every=every, name="samples")
        self.objective = objective
        self.pipeline = None
        self.disabled = False

    def __call__(self, ctx: HookContext) -> None:
        obj, cfg = self.objective, self.objective.config.sample
        if self.disabled:
            return
        if obj.config.cond.type == "class":
            log.info("sample grids for class-conditional models are not drawn by the trainer")
            self.disabled = True
            return
        if self.pipeline is None:
            self.pipeline = sampling_pipeline(obj, ctx.mesh)
            if self.pipeline is None:
                log.warning("no tokenizer configured (cond.tokenizer): sample grids are off")
                self.disabled = True
                return
        # The latents the pipeline decodes are divided by the scale factor the run uses.
        self.pipeline.scheduler.scale_factor = float(np.asarray(ctx.state.extra["scale_factor"]))
        prompts = list(cfg.prompts) if obj.text is not None else int(cfg.num)
        images = self.pipeline.generate(
            prompts, sampler=cfg.sampler, schedule=cfg.schedule, steps=int(cfg.steps),
            guidance_scale=float(cfg.guidance_scale) if obj.text is not None else 1.0, seed=int(cfg.seed),
            params=obj.sampling_params(ctx.state),
        )
        if ctx.writer is not None:  # process 0 only
            write_grid(np.asarray(images), ctx.workdir / "samples" / f"step_{ctx.step:07d}.png", ctx.writer, "samples",
                       ctx.step)


def ldm_hooks(objective: Any) -> list[Hook]:
    """The LDM objective's hooks: a sample grid every `sample.every` steps (0 = never)."""
    every = int(objective.config.sample.every)
    if every <= 0 or (objective.text is not None and not list(objective.config.sample.prompts)):
        return []
    return [SampleGrid(objective, every)]
