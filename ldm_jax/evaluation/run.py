"""One evaluation pass: sample (or read) images in chunks, features per chunk, metrics at the end.

Shared by `python -m ldm_jax.evaluation` and the training evaluator hook. Images are never all held at
once: each chunk goes through the feature extractors (and, for the CLI, to PNG files) and only features
stay. The chunk j samples with the key fold_in(seed, j), so samples are reproducible for a given chunk size.
"""
from __future__ import annotations

import pathlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np

from ldm_jax.data import pipeline as data_pipeline
from ldm_jax.evaluation import fid, reference, scores

Chunk = tuple[np.ndarray, "list[str] | None"]


def read_prompts(prompts_from: str, num: int, data_config: Any = None) -> list[str]:
    """`num` prompts, cycled: from a text file (one per line) or `data:SPLIT` (captions of the data config's split)."""
    if prompts_from.startswith("data:"):
        if data_config is None:
            raise ValueError(f"prompts_from={prompts_from!r} reads the run's data config; this model has none "
                             "(pass a text file with one prompt per line)")
        texts = data_pipeline.dataset_captions(data_config, prompts_from[5:] or "test")
    else:
        path = pathlib.Path(prompts_from).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no prompts file at {path} (one prompt per line, or data:SPLIT)")
        texts = [t.strip() for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
    if not texts:
        raise ValueError(f"{prompts_from} gives no prompts")
    return [texts[i % len(texts)] for i in range(num)]


def sample_chunks(pipe: Any, prompts: Sequence[str] | None, num: int, *, chunk: int, seed: int = 0,
                  params: Any = None, progress: bool = False, **sampling: Any) -> Iterator[Chunk]:
    """Yields (uint8 images, their prompts) chunks of `pipe.generate`; `prompts` None for unconditional models."""
    if num < 1:
        raise ValueError(f"num_samples must be >= 1, got {num}")
    if pipe.text_encoder is not None and prompts is None:
        raise ValueError("a text-conditional model needs prompts (prompts_from: a text file or data:SPLIT)")
    key = jax.random.key(seed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num, desc="sampling", unit="img")
    for j, start in enumerate(range(0, num, chunk)):
        n = min(chunk, num - start)
        batch_prompts = list(prompts[start:start + n]) if prompts is not None else None
        images = pipe.generate(batch_prompts if batch_prompts is not None else n, seed=jax.random.fold_in(key, j),
                               params=params, batch_size=chunk, **sampling)
        if bar is not None:
            bar.update(n)
        yield images, batch_prompts
    if bar is not None:
        bar.close()


def evaluate_chunks(chunks: Iterable[Chunk], metrics: Sequence[str], extractors: dict[str, Callable],
                    refs: dict[str, fid.Stats], *, clip: Any = None, on_chunk: Callable[[int, Chunk], None] | None = None,
                    **kid: Any) -> dict[str, float]:
    """Metrics of a stream of (images, prompts) chunks against reference stats (see `scores.score`)."""
    metrics = scores.check_metrics(metrics)
    spaces = scores.feature_spaces(metrics)
    feats: dict[str, list[np.ndarray]] = {s: [] for s in spaces}
    per_sample: list[np.ndarray] = []
    count = 0
    for i, (images, prompts) in enumerate(chunks):
        for s, f in scores.extract(spaces, extractors, images).items():
            feats[s].append(f)
        if "clip_score" in metrics:
            if clip is None or prompts is None:
                raise ValueError("clip_score needs CLIP weights (a transformers CLIP folder) and prompts")
            per_sample.append(clip.per_sample(images, prompts))
        if on_chunk is not None:
            on_chunk(count, (images, prompts))
        count += len(images)
    out = scores.score(metrics, {s: np.concatenate(v) for s, v in feats.items()}, refs,
                       clip_scores=np.concatenate(per_sample) if per_sample else None, **kid)
    out["num_samples"] = count
    return out


def reference_stats(space: str, extractor: Callable, cache: pathlib.Path, *, data_config: Any = None,
                    split: str = "test", folder: str | None = None, num: int | None = None,
                    describe: dict[str, Any] | None = None, progress: bool = False) -> fid.Stats:
    """Cached stats of a data config's split (or an image folder) in one feature space."""
    if folder:
        images, n = reference.folder_images(folder, resolution=None if data_config is None else
                                            int(data_config.resolution), num=num)
        what = {"folder": str(pathlib.Path(folder).resolve())}
    elif data_config is not None:
        images, n = reference.dataset_images(data_config, split, num)
        what = {"data": data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config),
                "split": split}
    else:
        raise ValueError("reference statistics need a dataset (the run's data config) or an image folder")
    what = {**what, "space": space, "num": n, **(describe or {})}
    return reference.cached_stats(cache, lambda: extractor(images, total=n, progress=progress), what)
