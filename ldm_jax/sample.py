"""python -m ldm_jax.sample: text-to-image (and img2img / inpainting) from a workdir or pretrained weights.

    python -m ldm_jax.sample --workdir=/tmp/shapes --prompt="a large red circle in the center on a black background" \
        --num_images=8 --out=samples/
    python -m ldm_jax.sample --pretrained=path/to/sd-v1-5 --prompt="an astronaut riding a horse" --steps=25
    python -m ldm_jax.sample --pretrained=... --prompt=... --init_image=in.png --strength=0.6          # img2img
    python -m ldm_jax.sample --pretrained=... --prompt=... --init_image=in.png --mask=mask.png          # inpaint

Writes OUT/000000.png ... (one per image) and OUT/grid.png. Each PNG carries the generation parameters
in its text chunk: "parameters" (A1111's format: prompt, negative prompt, "Steps: …, Sampler: DPM++ 2M,
Schedule type: Karras, …") and "ldm_jax" (JSON, with the A1111 and ComfyUI names of sampler and schedule).
"""
from __future__ import annotations

import pathlib
import sys
from typing import Any

import numpy as np
from absl import app, flags

from ldm_jax import cli, pipeline, sampling
from ldm_jax.images import image_grid, save_png


def _read_image(path: str, mode: str = "RGB") -> np.ndarray:
    from PIL import Image

    if not pathlib.Path(path).is_file():
        raise app.UsageError(f"no image at {path}")
    try:
        return np.asarray(Image.open(path).convert(mode))
    except OSError as e:  # PIL.UnidentifiedImageError and truncated files
        raise app.UsageError(f"cannot read the image {path}: {e}") from e


def _define_flags() -> None:
    """The CLI flags (defined only when run as a program, so importing this module defines none)."""
    flags.DEFINE_string("workdir", None, "A training workdir of ours (newest checkpoint, EMA weights).")
    flags.DEFINE_string("pretrained", None, "A diffusers folder or a single-file .safetensors/.ckpt checkpoint.")
    flags.DEFINE_multi_string("prompt", None, "Prompt; repeat the flag for several prompts (cycled over --num_images).")
    flags.DEFINE_string("negative_prompt", "", "Negative prompt (the unconditional half of guidance).")
    flags.DEFINE_integer("num_images", 4, "How many images to write.")
    flags.DEFINE_string("sampler", "dpmpp_2m", f"Sampler: {', '.join(sampling.SAMPLERS)}.")
    flags.DEFINE_string("schedule", "karras", f"Sigma schedule: {', '.join(sampling.SCHEDULES)}.")
    flags.DEFINE_integer("steps", 25, "Sampler steps.")
    flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance scale.")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_integer("height", None, "Image height (default: the model's size).")
    flags.DEFINE_integer("width", None, "Image width (default: the model's size).")
    flags.DEFINE_integer("batch_size", None, "Images per device program call (default: all at once).")
    flags.DEFINE_string("init_image", None, "img2img / inpainting: the starting image (PNG/JPEG).")
    flags.DEFINE_float("strength", None, "img2img: how much to change the image (0..1]; default 0.8, inpainting 1.0.")
    flags.DEFINE_string("mask", None, "Inpainting: mask image, white = repaint.")
    flags.DEFINE_integer("checkpoint_step", None, "--workdir: checkpoint step to load (default: newest).")
    flags.DEFINE_string("out", "samples", "Output folder.")


def run(argv_flags=None) -> list[pathlib.Path]:
    """Loads the model, samples, writes the PNGs; returns their paths."""
    f = argv_flags or flags.FLAGS
    if bool(f.workdir) == bool(f.pretrained):
        raise app.UsageError("give exactly one of --workdir=DIR or --pretrained=PATH")
    if f.num_images < 1:
        raise app.UsageError("--num_images must be >= 1")
    if f.mask and not f.init_image:
        raise app.UsageError("--mask needs --init_image")
    try:  # unknown names fail before the model loads, with the lists
        names = sampling.display_names(f.sampler, f.schedule)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    if pathlib.Path(f.out).exists() and not pathlib.Path(f.out).is_dir():
        raise app.UsageError(f"--out={f.out} is a file, not a folder")
    image = _read_image(f.init_image) if f.init_image else None  # bad files fail before the model loads
    mask = _read_image(f.mask, "L") if f.mask else None
    pipe = (pipeline.load_workdir(f.workdir, step=f.checkpoint_step) if f.workdir
            else pipeline.load_pretrained(f.pretrained))
    n = f.num_images
    if pipe.text_encoder is not None:
        if not f.prompt:
            raise app.UsageError("this model is text-conditional: give --prompt")
        prompts: Any = [f.prompt[i % len(f.prompt)] for i in range(n)]
    else:
        prompts = n
    kwargs = dict(negative_prompts=f.negative_prompt, sampler=f.sampler, schedule=f.schedule, steps=f.steps,
                  guidance_scale=f.guidance_scale, seed=f.seed, height=f.height, width=f.width,
                  batch_size=f.batch_size, progress=True)
    params: dict[str, Any] = dict(sampler=f.sampler, schedule=f.schedule, steps=f.steps,
                                  guidance_scale=f.guidance_scale, seed=f.seed,
                                  model=f.workdir or f.pretrained, **names)
    if image is not None:
        kwargs.update(height=image.shape[0], width=image.shape[1])
        if mask is not None:
            strength = 1.0 if f.strength is None else f.strength
            images = pipe.inpaint(prompts, image, mask, strength=strength, **kwargs)
            params.update(mode="inpaint", init_image=f.init_image, mask=f.mask, strength=strength)
        else:
            strength = 0.8 if f.strength is None else f.strength
            images = pipe.img2img(prompts, image, strength=strength, **kwargs)
            params.update(mode="img2img", init_image=f.init_image, strength=strength)
    else:
        images = pipe.generate(prompts, **kwargs)
    out = pathlib.Path(f.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        meta = dict(params, index=i, height=img.shape[0], width=img.shape[1])
        if pipe.text_encoder is not None:
            meta.update(prompt=prompts[i], negative_prompt=f.negative_prompt)
        paths.append(out / f"{i:06d}.png")
        infotext = sampling.a1111_infotext(
            prompt=meta.get("prompt"), negative_prompt=f.negative_prompt, steps=f.steps, sampler=f.sampler,
            schedule=f.schedule, guidance_scale=f.guidance_scale, seed=f.seed, width=img.shape[1],
            height=img.shape[0], model=pathlib.Path(f.workdir or f.pretrained).name)
        save_png(paths[-1], img, meta, infotext)
    grid_meta = dict(params, prompts=list(prompts) if pipe.text_encoder is not None else None, n=n)
    paths.append(out / "grid.png")
    save_png(paths[-1], image_grid(images), grid_meta)
    print(f"wrote {n} images and {paths[-1]}", file=sys.stderr)
    return paths


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.guarded(run)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
