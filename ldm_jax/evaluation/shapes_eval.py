"""Scores a text-to-image model on the built-in shapes dataset: does it draw every attribute of its caption?

Samples held-out prompts (captions of (color, shape) pairs that never appear in training, see
`ldm_jax.data.shapes.ShapesSpec.heldout`) and fresh captions of trained pairs, and reads each sample back
with the dataset's classifier `ldm_jax.data.shapes.describe` (nearest-palette color and background,
best-IoU shape template, size and grid cell of the shape's box): accuracy of color, shape, size,
position and background per split, printed, in eval.json and in TensorBoard (eval/<split>/<attribute>).

    python -m ldm_jax.evaluation --workdir=DIR        # writes DIR/eval.json and DIR/eval_grid.png
"""
from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Mapping

import numpy as np

from ldm_jax.data import shapes
from ldm_jax.data.config import shapes_spec
from ldm_jax.images import image_grid, save_png
from ldm_jax.pipeline import load_workdir


def evaluate_shapes(
    pipe: Any,
    spec: shapes.ShapesSpec | None = None,
    *,
    per_pair: int = 16,
    in_distribution: int = 96,
    prompts_seed: int = 1234,
    sampler: str = "dpmpp_2m",
    schedule: str = "karras",
    steps: int = 20,
    guidance_scale: float = 3.0,
    seed: int = 0,
    params: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Samples held-out and fresh in-distribution captions and scores every attribute; returns (metrics, images).

    `per_pair` samples per held-out (color, shape) pair and `in_distribution` captions of trained pairs
    (`shapes.indistribution_prompts`, 0 = none). metrics: "heldout" / "in_distribution" blocks with the
    accuracy of color, shape, size, position, background, both (color and shape) and all; the held-out
    color/shape/both also at the top level (color_accuracy, ...); chance levels and the settings used.
    images: the held-out samples (then the in-distribution ones).
    """
    spec = spec or shapes.ShapesSpec()
    held = shapes.heldout_prompts(spec, per_pair=per_pair, seed=prompts_seed)
    indist = shapes.indistribution_prompts(spec, in_distribution, seed=prompts_seed + 1) if in_distribution else []
    start = time.perf_counter()
    images = pipe.generate(held + indist, sampler=sampler, schedule=schedule, steps=steps,
                           guidance_scale=guidance_scale, seed=seed, params=params, height=spec.resolution,
                           width=spec.resolution, batch_size=batch_size)
    seconds = time.perf_counter() - start
    heldout = {**shapes.score(list(images[:len(held)]), held, spec), "num_samples": len(held),
               "shape_by_kind": shapes.shape_breakdown(list(images[:len(held)]),
                                                       [shapes.parse_caption(p) for p in held], spec)}
    heldout["per_pair"] = {
        f"{color} {shape}": shapes.score(list(images[p * per_pair:(p + 1) * per_pair]),
                                         held[p * per_pair:(p + 1) * per_pair], spec)
        for p, (color, shape) in enumerate(spec.heldout)
    }
    metrics = {
        "color_accuracy": heldout["color"],
        "shape_accuracy": heldout["shape"],
        "both_accuracy": heldout["both"],
        "color_accuracy_per_pair": {pair: s["color"] for pair, s in heldout["per_pair"].items()},
        "chance_color": 1.0 / len(spec.colors),
        "chance_shape": 1.0 / len(spec.shapes),
        "num_samples": len(held),
        "heldout": heldout,
        "chance": shapes.chance_levels(spec),
        "split": "heldout: (color, shape) pairs never seen in training; in_distribution: fresh captions of trained pairs",
        "sampler": sampler, "schedule": schedule, "steps": steps, "guidance_scale": guidance_scale, "seed": seed,
        "sampling_seconds": round(seconds, 2),
    }
    if indist:
        metrics["in_distribution"] = {**shapes.score(list(images[len(held):]), indist, spec),
                                      "num_samples": len(indist),
                                      "shape_by_kind": shapes.shape_breakdown(
                                          list(images[len(held):]), [shapes.parse_caption(p) for p in indist], spec)}
    return metrics, images


def write_eval(workdir: str | pathlib.Path, metrics: Mapping[str, Any], images: np.ndarray) -> pathlib.Path:
    """Writes WORKDIR/eval.json and WORKDIR/eval_grid.png; returns the JSON path."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "eval.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(metrics), indent=2) + "\n")
    tmp.replace(path)
    save_png(workdir / "eval_grid.png", image_grid(images), {"eval": "heldout shapes prompts"})
    return path


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """The log lines: held-out color/shape/both, then every attribute of each split scored."""
    lines = [f"held-out shapes prompts ({metrics['num_samples']} samples): color accuracy "
             f"{metrics['color_accuracy']:.1%} (chance {metrics['chance_color']:.1%}), shape accuracy "
             f"{metrics['shape_accuracy']:.1%} (chance {metrics['chance_shape']:.1%}), both {metrics['both_accuracy']:.1%}"]
    for split in ("heldout", "in_distribution"):
        if split in metrics:
            m = metrics[split]
            attrs = ", ".join(f"{a} {m[a]:.1%}" for a in (*shapes.ATTRIBUTES, "all"))
            lines.append(f"  {split} ({m['num_samples']} samples): {attrs}")
            if m.get("shape_by_kind"):
                lines.append(f"    shape by kind: {shapes.format_breakdown(m['shape_by_kind'])}")
    return "\n".join(lines)


def log_to_tensorboard(workdir: str | pathlib.Path, metrics: Mapping[str, Any], step: int) -> None:
    """eval/<split>/<attribute> scalars in WORKDIR/tb (next to the training curves)."""
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(pathlib.Path(workdir) / "tb"))
    try:
        for split in ("heldout", "in_distribution"):
            for a in (*shapes.ATTRIBUTES, "both", "all"):
                if split in metrics:
                    writer.add_scalar(f"eval/{split}/{a}", float(metrics[split][a]), step)
    finally:
        writer.close()


RUN_SETTINGS = ("per_pair", "in_distribution", "sampler", "schedule", "steps", "guidance_scale", "seed",
                 "batch_size")


def run_settings(config: Any, **kwargs: Any) -> dict[str, Any]:
    """`kwargs` with each None among the scoring settings taken from the run's own `final_eval` block (how the run
    scored itself), else left to `evaluate_shapes`' defaults; other keys pass through."""
    block = dict(config.get("final_eval") or {}) if config is not None else {}
    out = {}
    for k, v in kwargs.items():
        if v is None and k in RUN_SETTINGS:
            if k in block:
                out[k] = block[k]
        else:
            out[k] = v
    return out


def evaluate_workdir(workdir: str | pathlib.Path, spec: shapes.ShapesSpec | None = None, *,
                     out_dir: str | pathlib.Path | None = None, **kwargs: Any) -> dict:
    """Loads WORKDIR's newest checkpoint (EMA), scores it, writes eval.json, prints and returns the metrics.

    A setting passed as None is the run's own (`run_settings`). With `out_dir`, eval.json and eval_grid.png go
    there and the run's eval.json and TensorBoard curves are left as they are (a re-score with other settings)."""
    import jax

    pipe = load_workdir(workdir)
    if spec is None:
        spec = shapes_spec(pipe.config.data) if pipe.config.data.source == "shapes" else shapes.ShapesSpec()
    settings = run_settings(pipe.config, **kwargs)
    metrics, images = evaluate_shapes(pipe, spec, **settings)
    metrics["checkpoint_step"] = pipe.step
    metrics["settings"] = {k: settings[k] for k in RUN_SETTINGS if k in settings}
    if jax.process_index() == 0:
        write_eval(out_dir or workdir, metrics, images)
        if out_dir is None:
            log_to_tensorboard(workdir, metrics, int(pipe.step or 0))
        print(format_metrics(metrics), flush=True)
    return metrics


def run_final_eval(config: Any, workdir: str | pathlib.Path) -> dict | None:
    """The `final_eval` block of a training config, run after training (configs/shapes.py uses it)."""
    block = config.get("final_eval")
    if block is None:
        return None
    block = dict(block)
    kind = block.pop("kind", "shapes")
    if kind != "shapes":
        raise ValueError(f"final_eval.kind={kind!r} is unknown; only 'shapes' exists")
    if config.data.source != "shapes":
        raise ValueError("final_eval kind 'shapes' scores the built-in shapes dataset; data.source is "
                         f"{config.data.source!r}")
    return evaluate_workdir(workdir, **block)
