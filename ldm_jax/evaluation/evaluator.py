"""The periodic evaluator a training run is handed (`config.eval`): sample with the EMA weights, score, log.

Library side only (no training import): `Evaluator(cfg, data_config, workdir)(step, pipe, params, writer)`
samples `num_samples` images with the pipeline and the given weights, computes `cfg.metrics` against the
cached reference statistics of the training data's `split`, and logs them to TensorBoard (`eval/<metric>`)
and to WORKDIR/metrics.jsonl. The training hook (ldm_jax/training/eval_hook.py) calls it.

Resumable: metrics.jsonl is rewritten to a temporary file and renamed, so a run killed during an evaluation
leaves the previous file whole and no record for that step; `Evaluator.done(step)` tells the hook whether a
step's evaluation exists, so the evaluation of a step whose checkpoint was saved is redone after a restart.
Reference statistics are written the same way (ldm_jax.evaluation.reference.cached_stats).
"""
from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from ldm_jax.evaluation import first_stage, run, scores
from ldm_jax.evaluation.clip_score import CLIPScorer
from ldm_jax.evaluation.features import RESIZES, InceptionFeatures

log = logging.getLogger("ldm_jax.evaluation")


def default_eval_config() -> ml_collections.ConfigDict:
    """`config.eval` defaults: off (every=0)."""
    c = ml_collections.ConfigDict()
    c.every = 0  # steps between evaluations; 0 = never
    c.num_samples = 1000
    c.metrics = "fid,kid"  # comma-separated: fid, kid, fid_first_stage, kid_first_stage, clip_score
    c.sampler = "dpmpp_2m"
    c.schedule = "karras"
    c.steps = 25
    c.guidance_scale = 3.0
    c.seed = 0
    c.prompts_from = "data:test"  # data:SPLIT (captions of the training data's split) or a text file
    c.split = "test"  # reference images: this split of config.data
    c.num_ref = 0  # reference images used (0 = the whole split)
    c.batch_size = 50  # images per sampling call and per feature batch (rounded up to the device count)
    c.inception = ""  # FID Inception weights (pytorch-fid's .pth or its .safetensors), for fid/kid
    c.resize = "pytorch_fid"  # or "clean" (clean-fid's PIL bicubic)
    c.clip = ""  # a transformers CLIP folder, for clip_score
    c.kid_subsets = 100
    c.kid_subset_size = 1000
    return c


def metric_names(cfg: Any) -> tuple[str, ...]:
    names = cfg.metrics.split(",") if isinstance(cfg.metrics, str) else list(cfg.metrics)
    return tuple(m.strip() for m in names if m.strip())


def check_eval_config(cfg: Any, text_conditional: bool) -> None:
    """Raises naming the `eval.*` key at fault (before anything is compiled)."""
    if int(cfg.every) <= 0:
        return
    try:
        metrics = scores.check_metrics(metric_names(cfg))
    except ValueError as e:
        raise ValueError(f"eval.metrics: {e}") from None
    if int(cfg.num_samples) < 2:
        raise ValueError(f"eval.num_samples must be >= 2 (FID needs a covariance), got {cfg.num_samples}")
    if cfg.resize not in RESIZES:
        raise ValueError(f"eval.resize must be one of {RESIZES}, got {cfg.resize!r}")
    if any(scores.FEATURE_SPACE.get(m) == "inception" for m in metrics) and not cfg.inception:
        raise ValueError("eval.metrics has fid/kid, which need eval.inception = the FID Inception weights "
                         "(pt_inception-2015-12-05-6726825d.pth); use fid_first_stage/kid_first_stage offline")
    if cfg.inception and not pathlib.Path(cfg.inception).expanduser().is_file():
        raise FileNotFoundError(f"eval.inception: no weights file at {cfg.inception}")
    if "clip_score" in metrics and not cfg.clip:
        raise ValueError("eval.metrics has clip_score, which needs eval.clip = a transformers CLIP folder")
    if ("clip_score" in metrics or text_conditional) and not cfg.prompts_from:
        raise ValueError("eval.prompts_from is empty; a text model samples from prompts (data:SPLIT or a file)")


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    """The records of WORKDIR/metrics.jsonl (empty if none)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_metrics(workdir: str | pathlib.Path, record: dict) -> pathlib.Path:
    """Adds (or replaces, same step) a record in WORKDIR/metrics.jsonl via a temporary file and a rename."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    records = [r for r in read_metrics(workdir) if r.get("step") != record["step"]] + [record]
    records.sort(key=lambda r: r["step"])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
    return path


class Evaluator:
    """Samples, scores and logs one evaluation per call (see the module docstring)."""

    def __init__(self, cfg: Any, data_config: Any, workdir: str | pathlib.Path):
        self.cfg, self.data_config, self.workdir = cfg, data_config, pathlib.Path(workdir)
        self.metrics = scores.check_metrics(metric_names(cfg))
        self._inception: InceptionFeatures | None = None
        self._clip: CLIPScorer | None = None
        self._first_stage: first_stage.FirstStageFeatures | None = None
        self._refs: dict[str, Any] = {}

    def done(self, step: int) -> bool:
        return any(r.get("step") == step for r in read_metrics(self.workdir))

    def _extractors(self, pipe: Any, params: Any) -> dict[str, Any]:
        bs, out = int(self.cfg.batch_size), {}
        spaces = scores.feature_spaces(self.metrics)
        if "inception" in spaces:
            if self._inception is None:
                self._inception = InceptionFeatures.from_file(self.cfg.inception, resize=self.cfg.resize,
                                                              batch_size=bs, mesh=pipe.mesh)
            out["inception"] = self._inception
        if "first_stage" in spaces:
            if self._first_stage is None:  # frozen in LDM training: one extractor (one compile) serves the run
                self._first_stage = first_stage.FirstStageFeatures(pipe.vae, params["vae"], batch_size=bs,
                                                                   mesh=pipe.mesh)
            else:  # the same weights in this call's buffers: the train step donates the state, frozen parts too
                self._first_stage.set_params(params["vae"])
            out["first_stage"] = self._first_stage
        return out

    def _ref(self, space: str, extractor: Any) -> Any:
        if space not in self._refs:
            num = int(self.cfg.num_ref) or None
            name = f"ref_{space}_{self.cfg.split}_{num or 'all'}.npz"
            describe = {"resize": self.cfg.resize, "weights": str(self.cfg.inception)} if space == "inception" else {}
            self._refs[space] = run.reference_stats(space, extractor, self.workdir / "eval" / name,
                                                    data_config=self.data_config, split=self.cfg.split, num=num,
                                                    describe=describe)
        return self._refs[space]

    def __call__(self, step: int, pipe: Any, params: Any, writer: Any = None,
                 extra: dict[str, Any] | None = None) -> dict[str, float]:
        """Evaluates `params` at `step`; `extra` is stored in the metrics.jsonl record as it is."""
        cfg, start = self.cfg, time.perf_counter()
        extractors = self._extractors(pipe, params)
        refs = {s: self._ref(s, e) for s, e in extractors.items()}
        if "clip_score" in self.metrics and self._clip is None:
            self._clip = CLIPScorer.from_folder(cfg.clip, batch_size=int(cfg.batch_size), mesh=pipe.mesh)
        n = int(cfg.num_samples)
        prompts = run.read_prompts(cfg.prompts_from, n, self.data_config) if pipe.text_encoder is not None else None
        chunks = run.sample_chunks(pipe, prompts, n, chunk=int(cfg.batch_size), seed=int(cfg.seed), params=params,
                                   sampler=cfg.sampler, schedule=cfg.schedule, steps=int(cfg.steps),
                                   guidance_scale=float(cfg.guidance_scale) if prompts is not None else 1.0)
        values = run.evaluate_chunks(chunks, self.metrics, extractors, refs, clip=self._clip,
                                     kid_subsets=int(cfg.kid_subsets), kid_subset_size=int(cfg.kid_subset_size))
        values["eval_seconds"] = round(time.perf_counter() - start, 2)
        if jax.process_index() == 0:
            if writer is not None:
                for k, v in values.items():
                    if k in self.metrics:
                        writer.add_scalar(f"eval/{k}", float(v), step)
                writer.flush()
            append_metrics(self.workdir, {"step": int(step), **{k: float(np.asarray(v)) for k, v in values.items()},
                                          **(extra or {})})
        log.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        return values
