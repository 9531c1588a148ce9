"""The evaluator hook of LDM training (`config.eval`): FID/KID/CLIP score of EMA samples every `eval.every` steps.

The work is `ldm_jax.evaluation.evaluator.Evaluator` (sampling with the EMA weights through the objective's
pipeline, batch-sharded over the run's mesh, metrics against the cached statistics of the training data's
`eval.split`, TensorBoard `eval/<metric>` and WORKDIR/metrics.jsonl); this module only adapts it to the loop.

Resume: the loop saves a step's checkpoint before the hooks of that step run, so a run killed during the
evaluation of step S restarts from S with no record for S in metrics.jsonl. The hook notices on the first
step after the restart and evaluates then (the record says `"redo_of": S`; its weights are one step newer).
"""
from __future__ import annotations

import logging
import pathlib
from typing import Any

import numpy as np

from ldm_jax.evaluation.evaluator import Evaluator, check_eval_config
from ldm_jax.interop.workdir import LDM_OBJECTIVES
from ldm_jax.training.objective import Hook, HookContext
from ldm_jax.training.sample_grid import sampling_pipeline

log = logging.getLogger("ldm_jax.train")


class EvalHook(Hook):
    """Runs the `Evaluator` on every process (sampling and features are sharded); process 0 writes."""

    def __init__(self, config: Any, objective: Any, workdir: str | pathlib.Path):
        super().__init__(every=int(config.eval.every), name="eval")
        self.objective = objective
        self.evaluator = Evaluator(config.eval, config.data, workdir)
        self.pipeline = None
        self._first = True
        self._redo_of: int | None = None

    def due(self, step: int, last: int) -> bool:
        if self._first:  # the first step this process runs: was the evaluation of the resume step lost?
            self._first = False
            prev = step - 1
            if prev > 0 and prev % self.every == 0 and not self.evaluator.done(prev):
                self._redo_of = prev
                return True
        return super().due(step, last)

    def __call__(self, ctx: HookContext) -> None:
        if self.pipeline is None:
            self.pipeline = sampling_pipeline(self.objective, ctx.mesh)
            if self.pipeline is None:
                raise ValueError("eval.every > 0 needs a tokenizer for the text encoder (cond.tokenizer)")
        # the latents the pipeline decodes are divided by the run's scale factor
        self.pipeline.scheduler.scale_factor = float(np.asarray(ctx.state.extra["scale_factor"]))
        extra = {} if self._redo_of is None else {"redo_of": self._redo_of}
        if extra:
            log.info("evaluating again: the evaluation of step %d was interrupted", self._redo_of)
        self._redo_of = None
        self.evaluator(ctx.step, self.pipeline, self.objective.sampling_params(ctx.state), ctx.writer, extra=extra)


def eval_hooks(config: Any, objective: Any, workdir: str | pathlib.Path) -> list[Hook]:
    """[EvalHook] for an LDM config (also LoRA / DreamBooth: they sample through `objective.sampling_params`) whose
    `eval` block has every > 0 (checked before anything compiles).

    (An autoencoder config's `eval` block is its reconstruction evaluation, run by that objective itself.)
    """
    block = config.get("eval")
    if config.get("objective", "ldm") not in LDM_OBJECTIVES or block is None or int(block.every) <= 0:
        return []
    if config.get("cond") is not None and config.cond.type == "class":
        raise ValueError("eval.every > 0: the evaluator samples text or unconditional models, not class-conditional")
    check_eval_config(block, text_conditional=config.cond.type == "text")
    return [EvalHook(config, objective, workdir)]
