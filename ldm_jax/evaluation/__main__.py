"""python -m ldm_jax.evaluation: sample-quality metrics on demand, and the shapes main job's scoring.

    python -m ldm_jax.evaluation --workdir=DIR                  # shapes: DIR/eval.json, DIR/eval_grid.png
    python -m ldm_jax.evaluation --workdir=DIR --guidance_scale=1.5 --out=G  # re-score: G/eval.json; the rest as the run
    python -m ldm_jax.evaluation fid --workdir=DIR --inception=pt_inception-2015-12-05-6726825d.pth \
        --ref=ref.npz --num_samples=10000                        # samples in OUT/, OUT/fid.json next to them
    python -m ldm_jax.evaluation kid --pretrained=PATH --prompts=captions.txt --ref_data=images/ --inception=W
    python -m ldm_jax.evaluation fid --images=samples/ --ref=ref.npz --inception=W   # score existing images
    python -m ldm_jax.evaluation clip --pretrained=PATH --prompts=captions.txt --clip=clip-vit-large-patch14/
    python -m ldm_jax.evaluation stats --data=images/ --inception=W --out=ref.npz    # reference statistics
    python -m ldm_jax.evaluation stats --data=data:test --workdir=DIR --inception=W --out=ref.npz

`--features=first_stage` (fid/kid/stats with --workdir or --pretrained) uses the model's own autoencoder as
the feature space instead of Inception: offline, labelled fid_first_stage, not comparable with Inception-FID.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

from absl import app, flags

from ldm_jax import cli
from ldm_jax.evaluation import fid, first_stage, reference, run, shapes_eval
from ldm_jax.evaluation.clip_score import CLIPScorer
from ldm_jax.evaluation.features import RESIZES, InceptionFeatures
from ldm_jax.images import save_png
from ldm_jax.pipeline import load_pretrained

COMMANDS = ("shapes", "fid", "kid", "clip", "stats")
F = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "A training workdir of ours (newest checkpoint, EMA weights).")
    flags.DEFINE_string("pretrained", None, "A diffusers folder or single-file checkpoint to sample from.")
    flags.DEFINE_string("images", None, "fid/kid/clip: score the images in this folder instead of sampling.")
    flags.DEFINE_string("out", None, "Folder for the samples and the JSON (default WORKDIR/eval_<cmd>, ./eval_<cmd>).")
    flags.DEFINE_string("ref", None, "Reference statistics .npz (pytorch-fid format; KID needs ours, with features).")
    flags.DEFINE_string("ref_data", None, "Reference images: a folder, or data:SPLIT of the run's data config.")
    flags.DEFINE_string("data", None, "stats: the images (a folder, or data:SPLIT with --workdir).")
    flags.DEFINE_integer("num_ref", None, "Use at most this many reference images (default: all).")
    flags.DEFINE_string("inception", None, "FID Inception weights: pytorch-fid's .pth or its converted .safetensors.")
    flags.DEFINE_enum("resize", "pytorch_fid", RESIZES, "Resize to 299: pytorch-fid's bilinear or clean-fid's bicubic.")
    flags.DEFINE_enum("features", "inception", ["inception", "first_stage"], "Feature space for fid/kid/stats.")
    flags.DEFINE_string("clip", None, "clip: a transformers CLIP folder (e.g. openai/clip-vit-large-patch14).")
    flags.DEFINE_string("prompts", None, "Prompts to sample: a text file (one per line) or data:SPLIT.")
    flags.DEFINE_integer("num_samples", 1000, "Images to sample.")
    flags.DEFINE_integer("batch_size", 50, "Images per sampling call and per feature batch.")
    flags.DEFINE_string("sampler", "dpmpp_2m", "Sampler name.")
    flags.DEFINE_string("schedule", "karras", "Sigma schedule.")
    flags.DEFINE_integer("steps", None, "Sampler steps (default 25; shapes: the run's final_eval).")
    flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance (default 7.5; shapes: the run's final_eval).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("kid_subsets", 100, "KID: number of subsets.")
    flags.DEFINE_integer("kid_subset_size", 1000, "KID: subset size (capped by the sample counts).")
    flags.DEFINE_integer("per_pair", 16, "shapes: samples per held-out (color, shape) pair.")
    flags.DEFINE_integer("in_distribution", 96, "shapes: fresh captions of trained (color, shape) pairs (0 = none).")


def _shapes() -> None:
    if not F.workdir:
        raise app.UsageError("the shapes scoring needs --workdir=DIR (a shapes run)")
    given = lambda name: getattr(F, name) if F[name].present else None  # noqa: E731  (else: the run's own)
    shapes_eval.evaluate_workdir(F.workdir, out_dir=F.out, **{k: given(k) for k in shapes_eval.RUN_SETTINGS})


def _load_pipe() -> Any:
    return load_pretrained(F.workdir or F.pretrained)


def _extractor(pipe: Any) -> Any:
    if F.features == "first_stage":
        if pipe is None:
            raise app.UsageError("--features=first_stage needs the model's autoencoder: pass --workdir or --pretrained")
        return first_stage.from_pipeline(pipe, batch_size=F.batch_size)
    if not F.inception:
        raise app.UsageError("FID/KID need the FID Inception weights: --inception=pt_inception-2015-12-05-6726825d.pth "
                             "(or its .safetensors from python -m ldm_jax.interop.inception)")
    return InceptionFeatures.from_file(F.inception, resize=F.resize, batch_size=F.batch_size)


def _space_describe() -> dict[str, Any]:
    if F.features == "first_stage":
        return {"features": "first_stage", "model": str(F.workdir or F.pretrained),
                "note": "the model's own autoencoder latents: not comparable with Inception-FID"}
    return {"features": "inception", "weights": str(pathlib.Path(F.inception).resolve()), "resize": F.resize}


def _source_images(spec: str, pipe: Any) -> tuple[Any, int]:
    if spec.startswith("data:"):
        if pipe is None or getattr(pipe, "config", None) is None:
            raise app.UsageError(f"{spec} reads the run's data config: pass --workdir")
        return reference.dataset_images(pipe.config.data, spec[5:] or "test", F.num_ref, F.batch_size)
    res = None if pipe is None else getattr(pipe, "default_size", None)
    return reference.folder_images(spec, res, F.num_ref, F.batch_size)


def _stats() -> None:
    if not F.data or not F.out:
        raise app.UsageError("stats needs --data=FOLDER|data:SPLIT and --out=stats.npz")
    pipe = _load_pipe() if (F.workdir or F.pretrained) else None
    extractor = _extractor(pipe)
    images, n = _source_images(F.data, pipe)
    out = reference.cached_stats(F.out, lambda: extractor(images, total=n, progress=True),
                                 {"source": F.data, "num": n, **_space_describe()})
    print(f"wrote {F.out}: {out.num_samples} images, {out.mu.shape[0]}-d {F.features} features")


def _metric(cmd: str) -> None:
    if not (F.images or F.workdir or F.pretrained):
        raise app.UsageError(f"{cmd} needs what to score: --workdir=DIR, --pretrained=PATH or --images=FOLDER")
    if bool(F.workdir) and bool(F.pretrained):
        raise app.UsageError("give one of --workdir and --pretrained")
    metric = {"fid": "fid", "kid": "kid", "clip": "clip_score"}[cmd]
    if cmd != "clip" and F.features == "first_stage":
        metric += "_first_stage"
    if cmd != "clip" and not (F.ref or F.ref_data):
        raise app.UsageError(f"{cmd} needs reference statistics: --ref=stats.npz or --ref_data=FOLDER|data:SPLIT")
    if cmd == "clip" and not F.clip:
        raise app.UsageError("clip needs --clip=FOLDER, a transformers CLIP folder (openai/clip-vit-large-patch14)")
    pipe = _load_pipe() if (F.workdir or F.pretrained) else None
    out_dir = pathlib.Path(F.out or (pathlib.Path(F.workdir) / f"eval_{cmd}" if F.workdir else f"eval_{cmd}"))
    if F.images:
        out_dir = pathlib.Path(F.out or F.images)
    if out_dir.exists() and not out_dir.is_dir():
        raise app.UsageError(f"--out={out_dir} is a file, not a folder")
    clip = CLIPScorer.from_folder(F.clip, batch_size=F.batch_size) if cmd == "clip" else None
    extractors, refs = {}, {}
    if cmd != "clip":
        extractor = _extractor(pipe)
        space = "first_stage" if F.features == "first_stage" else "inception"
        extractors[space] = extractor
        if F.ref:
            refs[space] = fid.load_stats(F.ref)
        else:
            images, n = _source_images(F.ref_data, pipe)
            cache = out_dir / f"ref_{space}.npz"
            refs[space] = reference.cached_stats(cache, lambda: extractor(images, total=n, progress=True),
                                                 {"source": F.ref_data, "num": n, **_space_describe()})
    prompts = None
    if F.prompts:
        prompts = run.read_prompts(F.prompts, F.num_samples, getattr(pipe, "config", None) and pipe.config.data)
    settings: dict[str, Any] = {}
    if F.images:
        if prompts is None and cmd == "clip":  # the prompts `python -m ldm_jax.sample` / this CLI wrote into the PNGs
            prompts = reference.png_prompts(F.images, F.num_samples)
            if prompts is None:
                raise app.UsageError(f"clip needs --prompts: the images in {F.images} carry no ldm_jax prompt")
        chunks = _folder_chunks(F.images, prompts)
    else:
        settings = dict(sampler=F.sampler, schedule=F.schedule, steps=F.steps or 25, seed=F.seed,
                        guidance_scale=7.5 if F.guidance_scale is None else F.guidance_scale)
        gen = {k: v for k, v in settings.items() if k != "seed"}
        chunks = run.sample_chunks(pipe, prompts, F.num_samples, chunk=F.batch_size, seed=F.seed, progress=True, **gen)
    out_dir.mkdir(parents=True, exist_ok=True)

    def write(start: int, chunk: run.Chunk) -> None:
        if F.images:
            return
        for i, img in enumerate(chunk[0]):
            meta = {**settings, "index": start + i, **({"prompt": chunk[1][i]} if chunk[1] else {})}
            save_png(out_dir / f"{start + i:06d}.png", img, meta)

    values = run.evaluate_chunks(chunks, [metric], extractors, refs, clip=clip, on_chunk=write,
                                 kid_subsets=F.kid_subsets, kid_subset_size=F.kid_subset_size)
    result = {"metric": metric, **values, "model": F.workdir or F.pretrained, "images": str(out_dir),
              "reference": F.ref or F.ref_data, **settings, **({"clip": F.clip} if clip else _space_describe()),
              **({"checkpoint_step": pipe.step} if getattr(pipe, "step", None) is not None else {})}
    path = out_dir / f"{cmd}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    print(f"{metric} = {values[metric]:.6g} ({values['num_samples']} images) -> {path}")


def _folder_chunks(folder: str, prompts: list[str] | None):
    images, _ = reference.folder_images(folder, None, F.num_samples, F.batch_size)
    start = 0
    for batch in images:
        yield batch, (prompts[start:start + len(batch)] if prompts is not None else None)
        start += len(batch)


def _dispatch(argv: list[str]) -> None:
    cmd = argv[1] if len(argv) > 1 else "shapes"
    if cmd not in COMMANDS or len(argv) > 2:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; the command is one of {', '.join(COMMANDS)}")
    {"shapes": _shapes, "stats": _stats}.get(cmd, lambda: _metric(cmd))()


def main(argv: list[str]) -> None:
    cli.guarded(lambda: _dispatch(argv))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
