"""Scores a text-to-image model on the built-in shapes dataset: does it draw the color and shape it is asked for?

Samples held-out prompts (captions of (color, shape) pairs that never appear in training, see
`ldm_jax.data.shapes.ShapesSpec.heldout`) and reads each sample back with the dataset's classifier
`ldm_jax.data.shapes.classify` (nearest-palette color, best-IoU shape template).

    python -m ldm_jax.evaluation --workdir=DIR        # writes DIR/eval.json and DIR/eval_grid.png
"""
from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Mapping

import numpy as np

from ldm_jax.data import shapes
from ldm_jax.images import image_grid, save_png


def evaluate_shapes(
    pipe: Any,
    spec: shapes.ShapesSpec | None = None,
    *,
    per_pair: int = 16,
    prompts_seed: int = 1234,
    sampler: str = "dpmpp_2m",
    schedule: str = "karras",
    steps: int = 20,
    guidance_scale: float = 3.0,
    seed: int = 0,
    params: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Generates `per_pair` samples per held-out (color, shape) pair; returns (metrics, uint8 images).

    metrics: color_accuracy, shape_accuracy, both_accuracy (fractions of samples whose classified
    attribute matches the prompt), chance levels, the per-pair color accuracy and the settings used.
    """
    spec = spec or shapes.ShapesSpec()
    prompts = shapes.heldout_prompts(spec, per_pair=per_pair, seed=prompts_seed)
    start = time.perf_counter()
    images = pipe.generate(prompts, sampler=sampler, schedule=schedule, steps=steps, guidance_scale=guidance_scale,
                           seed=seed, params=params, height=spec.resolution, width=spec.resolution,
                           batch_size=batch_size)
    seconds = time.perf_counter() - start
    scores = shapes.score(list(images), prompts, spec)
    per_pair_color = {}
    for p, (color, shape) in enumerate(spec.heldout):
        sl = slice(p * per_pair, (p + 1) * per_pair)
        per_pair_color[f"{color} {shape}"] = shapes.score(list(images[sl]), prompts[sl], spec)["color"]
    metrics = {
        "color_accuracy": scores["color"],
        "shape_accuracy": scores["shape"],
        "both_accuracy": scores["both"],
        "chance_color": 1.0 / len(spec.colors),
        "chance_shape": 1.0 / len(spec.shapes),
        "color_accuracy_per_pair": per_pair_color,
        "num_samples": len(prompts),
        "split": "heldout (color, shape) pairs never seen in training",
        "sampler": sampler, "schedule": schedule, "steps": steps, "guidance_scale": guidance_scale, "seed": seed,
        "sampling_seconds": round(seconds, 2),
    }
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
    """One line for the log."""
    return (f"held-out shapes prompts ({metrics['num_samples']} samples): color accuracy "
            f"{metrics['color_accuracy']:.1%} (chance {metrics['chance_color']:.1%}), shape accuracy "
            f"{metrics['shape_accuracy']:.1%} (chance {metrics['chance_shape']:.1%}), both {metrics['both_accuracy']:.1%}")


def evaluate_workdir(workdir: str | pathlib.Path, spec: shapes.ShapesSpec | None = None, **kwargs: Any) -> dict:
    """Loads WORKDIR's newest checkpoint (EMA), scores it, writes eval.json, prints and returns the metrics."""
    import jax

    from ldm_jax.data.config import shapes_spec
    from ldm_jax.pipeline import load_workdir

    pipe = load_workdir(workdir)
    if spec is None:
        spec = shapes_spec(pipe.config.data) if pipe.config.data.source == "shapes" else shapes.ShapesSpec()
    metrics, images = evaluate_shapes(pipe, spec, **kwargs)
    metrics["checkpoint_step"] = pipe.step
    if jax.process_index() == 0:
        write_eval(workdir, metrics, images)
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


def main(argv: list[str]) -> None:
    del argv
    from absl import flags

    f = flags.FLAGS
    evaluate_workdir(f.workdir, per_pair=f.per_pair, steps=f.steps, guidance_scale=f.guidance_scale,
                     sampler=f.sampler, seed=f.seed)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "Workdir of a shapes run.", required=True)
    flags.DEFINE_integer("per_pair", 16, "Samples per held-out (color, shape) pair.")
    flags.DEFINE_integer("steps", 20, "Sampler steps.")
    flags.DEFINE_float("guidance_scale", 3.0, "Classifier-free guidance scale.")
    flags.DEFINE_string("sampler", "dpmpp_2m", "Sampler.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    app.run(main)
