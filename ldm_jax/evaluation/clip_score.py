"""CLIP score (Hessel et al. 2021, arXiv 2104.08718) as torchmetrics computes it, with our two CLIP towers.

    per sample  s_i = 100 · cos(E_image(x_i), E_text(c_i))
    clip_score  = max(mean_i s_i, 0)          (torchmetrics' `CLIPScore.compute`: the max is taken of the mean)

The weights come from a transformers CLIP folder (`openai/clip-vit-large-patch14` for the usual ViT-L/14
number), read by `ldm_jax.interop.clip_model`. Images are preprocessed like transformers'
`CLIPImageProcessor` (PIL backend): the shorter side resized to the tower's size with PIL bicubic, a
center crop, /255, CLIP's mean/std. Prompts are tokenized with the folder's tokenizer (padded to the text
tower's context; CLIP's causal text tower pools at the first EOS, so padding does not change the embedding).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ldm_jax.data.tokenizers import load_tokenizer
from ldm_jax.evaluation.features import BatchedApply, batches, check_images
from ldm_jax.interop.clip_model import CLIPWeights, load_clip_folder
from ldm_jax.models.clip_vision import CLIPVisionTransformer
from ldm_jax.models.text import CLIPTextTransformer

CLIP_MEAN = np.asarray([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.asarray([0.26862954, 0.26130258, 0.27577711], np.float32)


def preprocess(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, size, size, 3) CLIP pixel values (CLIPImageProcessor, PIL backend)."""
    from PIL import Image

    out = np.empty((len(images), size, size, 3), np.float32)
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(size * long / short)
        new_h, new_w = (size, new_long) if h <= w else (new_long, size)
        im = np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.BICUBIC))
        top, left = (new_h - size) // 2, (new_w - size) // 2
        out[i] = im[top:top + size, left:left + size].astype(np.float32) / 255.0
    return (out - CLIP_MEAN) / CLIP_STD


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPScorer:
    """Image and text embeddings and the per-sample CLIP score of (image, prompt) pairs."""

    def __init__(self, weights: CLIPWeights, tokenizer: Any = None, *, batch_size: int = 32, mesh: Mesh | None = None):
        self.weights = weights
        self.vision = CLIPVisionTransformer(**weights.vision_kwargs)
        self.text = CLIPTextTransformer(**weights.text_kwargs)
        if tokenizer is None:
            if weights.folder is None:
                raise ValueError("CLIPScorer needs a tokenizer (or weights loaded from a folder that has one)")
            tokenizer = load_tokenizer(weights.folder, max_length=int(weights.text_kwargs["max_length"]))
        self.tokenizer = tokenizer
        vision, text = self.vision, self.text
        self._images = BatchedApply(lambda p, x: _unit(vision.apply({"params": p}, x)[1]), weights.vision_params,
                                    batch_size, mesh)
        self._texts = BatchedApply(lambda p, ids: _unit(text.apply({"params": p}, ids)[1]), weights.text_params,
                                   batch_size, mesh)

    @classmethod
    def from_folder(cls, path: str, **kwargs: Any) -> "CLIPScorer":
        return cls(load_clip_folder(path), **kwargs)

    def image_embeds(self, images: np.ndarray) -> np.ndarray:
        """uint8 images -> unit-norm projected image embeddings (N, projection_dim)."""
        size = int(self.weights.vision_kwargs["image_size"])
        pixels = (preprocess(b, size) for b in batches(check_images(images), self._images.batch_size))
        return self._images(pixels)

    def pixel_embeds(self, pixels: np.ndarray) -> np.ndarray:
        """Already preprocessed pixel values (N, S, S, 3) -> unit-norm image embeddings."""
        return self._images(np.asarray(pixels, np.float32))

    def text_embeds(self, prompts: Sequence[str] | np.ndarray) -> np.ndarray:
        """Prompts (or token ids (N, L)) -> unit-norm projected text embeddings."""
        ids = prompts if isinstance(prompts, np.ndarray) else np.asarray(self.tokenizer(list(prompts)), np.int32)
        return self._texts(ids)

    def per_sample(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """100 · cos(image_i, prompt_i) for each pair, float64."""
        if len(images) != len(prompts):
            raise ValueError(f"CLIP score pairs images with prompts: got {len(images)} images, {len(prompts)} prompts")
        img, txt = self.image_embeds(images), self.text_embeds(prompts)
        return 100.0 * np.sum(img.astype(np.float64) * txt.astype(np.float64), axis=-1)


def clip_score(per_sample: np.ndarray) -> float:
    """torchmetrics' reduction: max(mean(per-sample scores), 0)."""
    return float(max(np.mean(per_sample), 0.0))

