"""DreamBooth (Ruiz et al. 2023, arXiv 2208.12242): a few instance images + one prompt, optional prior preservation.

Every global batch of B examples holds instance images with `dreambooth.instance_prompt` and, when
`dreambooth.class_prompt` is set, B/2 of them are class images with the class prompt instead
(prior preservation). Each example carries "loss_weight" so that the LDM loss (a batch mean of
weight · per-example loss) equals

    mean over instance examples + prior_loss_weight · mean over class examples

(diffusers' train_dreambooth.py: loss + prior_loss_weight · prior_loss): instance rows weigh B / n_instance,
class rows prior_loss_weight · B / n_class. The class images are generated once with our pipeline from
the base weights (`init_from`) into WORKDIR/class_images/NNNNN.png; a restart generates only the missing
ones (each image's initial noise comes from fold_in(key(seed), index), so an image does not depend on
which others were missing) and never regenerates existing files.

Which examples a step sees is a function of (seed, step) only, so the iterator's state is the step and a
resume reproduces the batches exactly. Works with the full fine-tune (objective "dreambooth") and with
LoRA (objective "dreambooth_lora").
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from PIL import Image

from ldm_jax import sharding as shd
from ldm_jax.pipeline import load_pretrained
from ldm_jax.training import ldm, ldm_io
from ldm_jax.training import lora as lora_train
from ldm_jax.training.objective import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_images(folder: str | os.PathLike, resolution: int) -> np.ndarray:
    """(N, res, res, 3) float32 in [-1, 1]: every image in `folder`, center-cropped square, resized (bicubic)."""
    folder = pathlib.Path(folder)
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not paths:
        raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    out = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.BICUBIC)
            out.append(np.asarray(im, np.float32) / 127.5 - 1.0)
    return np.stack(out)


def ensure_class_images(folder: str | os.PathLike, count: int, generate: Callable[[list[int]], np.ndarray],
                        batch_size: int = 4) -> list[pathlib.Path]:
    """Makes folder/00000.png … up to `count`, calling `generate(indices) -> uint8 (n, H, W, 3)` for missing ones only."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.png" for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    from tqdm import tqdm

    for start in tqdm(range(0, len(missing), batch_size), desc="class images", disable=not missing):
        chunk = missing[start:start + batch_size]
        images = generate(chunk)
        for i, img in zip(chunk, images):
            tmp = paths[i].with_suffix(".tmp.png")
            Image.fromarray(np.asarray(img, np.uint8)).save(tmp)
            os.replace(tmp, paths[i])  # a killed run leaves no half-written image
    return paths


def pipeline_generator(init_from: str, prompt: str, cfg: ml_collections.ConfigDict, resolution: int,
                       tokenizer: Any = None) -> Callable[[list[int]], np.ndarray]:
    """generate(indices) with our pipeline on the base weights; image i starts from fold_in(key(seed), i)."""
    pipe = load_pretrained(init_from, tokenizer=tokenizer)
    f = pipe.downsample
    shape = (resolution // f, resolution // f, pipe.latent_channels)
    key = jax.random.key(int(cfg.seed))

    n = int(cfg.batch_size)

    def generate(indices: list[int]) -> np.ndarray:
        padded = list(indices) + [indices[-1]] * (n - len(indices))  # one batch shape: one compile
        latents = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), shape)) for i in padded])
        images = pipe.generate([prompt] * n, sampler=cfg.sampler, schedule=cfg.schedule, steps=int(cfg.steps),
                               guidance_scale=float(cfg.guidance_scale), latents=latents, height=resolution,
                               width=resolution)
        return images[: len(indices)]

    return generate


class DreamBoothData:
    """Global batches {"image", "input_ids", "loss_weight"} drawn from (seed, step); state = the step."""

    def __init__(self, instance: np.ndarray, instance_ids: np.ndarray, mesh: jax.sharding.Mesh,
                 global_batch_size: int, *, classes: np.ndarray | None = None, class_ids: np.ndarray | None = None,
                 prior_loss_weight: float = 1.0, seed: int = 0):
        b = int(global_batch_size)
        if classes is not None and b % 2:
            raise ConfigError(f"prior preservation puts half of each batch on class images: global_batch_size={b} "
                              "must be even")
        self.instance, self.classes, self.mesh, self.seed, self.b = instance, classes, mesh, int(seed), b
        n_inst = b // 2 if classes is not None else b
        self.n_inst, self.n_cls = n_inst, b - n_inst
        self.ids = np.concatenate([np.repeat(instance_ids[None], n_inst, 0)]
                                  + ([np.repeat(class_ids[None], self.n_cls, 0)] if classes is not None else []))
        w_cls = float(prior_loss_weight) * b / max(self.n_cls, 1)
        self.weights = np.asarray([b / n_inst] * n_inst + [w_cls] * self.n_cls, np.float32)
        self.step = 0

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """The global batch of `step` on the host."""
        rng = np.random.default_rng([self.seed, step])
        images = [self.instance[rng.integers(0, len(self.instance), self.n_inst)]]
        if self.classes is not None:
            images.append(self.classes[rng.integers(0, len(self.classes), self.n_cls)])
        return {"image": np.concatenate(images), "input_ids": self.ids.astype(np.int32), "loss_weight": self.weights}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        host = self.host_batch(self.step)
        self.step += 1
        return {k: jax.make_array_from_callback(v.shape, shd.batch_sharding(self.mesh, v.ndim), lambda idx, v=v: v[idx])
                for k, v in host.items()}

    def get_state(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed}

    def set_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


class _DreamBoothMixin:
    """make_dataset for DreamBooth on top of the LDM or the LoRA objective."""

    workdir: pathlib.Path | None = None

    def make_dataset(self, mesh):
        c, d = self.config, self.config.dreambooth
        res = int(c.image_size)
        ids = lambda text: np.asarray(self.tokenizer([text]), np.int32)[0]  # noqa: E731
        instance = load_images(d.instance_dir, res)
        classes = class_ids = None
        if d.class_prompt:
            folder = pathlib.Path(d.class_dir) if d.class_dir else pathlib.Path(self.workdir) / "class_images"
            factory = lambda: pipeline_generator(str(c.init_from), str(d.class_prompt), d.class_sampler, res,  # noqa: E731
                                                 self.tokenizer)
            ensure_class_images(folder, int(d.num_class_images), _lazy(factory), int(d.class_sampler.batch_size))
            classes, class_ids = load_images(folder, res), ids(str(d.class_prompt))
        return DreamBoothData(instance, ids(str(d.instance_prompt)), mesh, int(c.global_batch_size), classes=classes,
                              class_ids=class_ids, prior_loss_weight=float(d.prior_loss_weight), seed=int(c.seed))

    def validate(self, mesh) -> None:
        d = self.config.dreambooth
        if not d.instance_prompt or not d.instance_dir:
            raise ConfigError("DreamBooth needs --config.dreambooth.instance_dir=DIR and "
                              "--config.dreambooth.instance_prompt='a photo of sks dog'")
        if d.class_prompt and not self.config.init_from:
            raise ConfigError("class images are generated from the base weights: set --config.init_from")
        super().validate(mesh)


def _lazy(factory: Callable[[], Callable[[list[int]], np.ndarray]]) -> Callable[[list[int]], np.ndarray]:
    """A generator built on its first call (no pipeline is loaded when every class image exists)."""
    state: dict[str, Any] = {}

    def call(indices: list[int]) -> np.ndarray:
        if "fn" not in state:
            state["fn"] = factory()
        return state["fn"](indices)

    return call


class DreamBoothLDM(_DreamBoothMixin, ldm.LDMObjective):
    name = "dreambooth"


class DreamBoothLora(_DreamBoothMixin, lora_train.LoraLDMObjective):
    name = "dreambooth_lora"


def build(config: ml_collections.ConfigDict, tokenizer: Any = None, workdir: Any = None):
    """The DreamBooth objective: LoRA when `dreambooth.lora`, else the full fine-tune of the UNet."""
    config, base = lora_train.with_base(config)  # models, schedule and files from init_from (full or LoRA)
    if tokenizer is None and config.cond.type == "text" and config.cond.get("tokenizer"):
        tokenizer = ldm_io.load_tokenizer(config, workdir)
    cls = DreamBoothLora if config.dreambooth.lora else DreamBoothLDM
    objective = cls(config, tokenizer)
    objective.base, objective.workdir = base, workdir
    return objective


def default_dreambooth_block() -> ml_collections.ConfigDict:
    """The `dreambooth` block (diffusers' defaults: 100 class images, prior weight 1)."""
    return ml_collections.ConfigDict(dict(
        instance_dir="", instance_prompt="", class_prompt="", class_dir="", num_class_images=100,
        prior_loss_weight=1.0, lora=False,
        class_sampler=dict(sampler="dpmpp_2m", schedule="karras", steps=25, guidance_scale=7.5, seed=0, batch_size=4),
    ))

