"""Sample-quality metrics by name, over feature spaces by name: what the CLI and the training hook compute.

Metric names (`config.eval.metrics`, the CLI's sub-commands):
  fid, kid                  FID Inception pool3 (comparable with published numbers when the weights are the
                            real `pt_inception-2015-12-05` file and the reference is the same split)
  fid_first_stage,          the same distances in the feature space of the run's own first-stage encoder
  kid_first_stage           (flattened posterior mean). NOT comparable with Inception-FID nor across runs with
                            another autoencoder; it exists so that a small offline run (the shapes main job) has a
                            sample-quality curve
  clip_score                torchmetrics' CLIPScore: max(mean_i 100·cos(image_i, text_i), 0)
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ldm_jax.evaluation import fid

FEATURE_SPACE = {"fid": "inception", "kid": "inception", "fid_first_stage": "first_stage",
                 "kid_first_stage": "first_stage"}
METRICS = (*FEATURE_SPACE, "clip_score")


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """Validates metric names (raises naming the valid ones)."""
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metrics {unknown or '(none given)'}; choose from {list(METRICS)}")
    return metrics


def feature_spaces(metrics: Sequence[str]) -> list[str]:
    """The feature spaces the metrics need, in a stable order."""
    return sorted({FEATURE_SPACE[m] for m in metrics if m in FEATURE_SPACE})


def score(metrics: Sequence[str], features: Mapping[str, np.ndarray], refs: Mapping[str, fid.Stats], *,
          clip_scores: np.ndarray | None = None, kid_subsets: int = 100, kid_subset_size: int = 1000,
          kid_seed: int = 2020) -> dict[str, float]:
    """{metric: value} from per-space sample features and reference stats (and per-sample CLIP scores)."""
    out: dict[str, float] = {}
    for m in check_metrics(metrics):
        if m == "clip_score":
            if clip_scores is None:
                raise ValueError("clip_score needs per-sample CLIP scores")
            out[m] = float(max(np.mean(clip_scores), 0.0))  # torchmetrics: the max of the mean
            continue
        space = FEATURE_SPACE[m]
        ref = refs[space]
        if m.startswith("fid"):
            out[m] = fid.fid_from_features(features[space], ref)
        else:
            if ref.features is None:
                raise ValueError(f"{m} needs the reference features; the {space} statistics file has only mu/sigma "
                                 "(recompute it with `python -m ldm_jax.evaluation stats`, which keeps them)")
            mean, std = fid.kernel_distance(features[space], ref.features, num_subsets=kid_subsets,
                                            subset_size=kid_subset_size, seed=kid_seed)
            out[m], out[m + "_std"] = mean, std
    return out


FeatureFn = Callable[[np.ndarray], np.ndarray]


def extract(spaces: Sequence[str], extractors: Mapping[str, Any], images: np.ndarray) -> dict[str, np.ndarray]:
    """Features of uint8 images in every needed space."""
    missing = [s for s in spaces if s not in extractors]
    if missing:
        raise ValueError(f"no feature extractor for {missing}")
    return {s: np.asarray(extractors[s](images)) for s in spaces}
