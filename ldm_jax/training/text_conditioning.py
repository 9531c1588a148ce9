"""The LDM objective's text condition: token ids -> (cross-attention context, added vector `y`), with caption dropout.

One path serves SD 1/2 (one CLIP tower, `cond.text` = its kwargs) and SDXL (`cond.text = {"encoders": {...}}`:
CLIP ViT-L/14 and OpenCLIP ViT-bigG/14, each at its penultimate layer; Podell et al. 2023, arXiv 2307.01952):
- context: the towers' hidden states concatenated on the feature axis (SDXL base: 768 + 1280 = 2048).
- y (UNets with `adm_in_channels`): the pooled, projected bigG output, then the 256-wide Fourier embedding of
  each micro-conditioning id (`UNet.added_cond`, sec. 2.2-2.3). `adm_in_channels` equal to the pooled width takes
  the pooled text alone (no ids; the global caption vector added to the time embedding, as GLIDE / Imagen add
  their pooled text; configs/shapes.py). The ids come from the batch as the input
  pipeline records them per image (data/buckets.py; `data.record_sizes` or `data.buckets`):
    base (6 ids):    original_size (h, w), crop_top_left (top, left), target_size (h, w)
    refiner (5 ids): original_size (h, w), crop_top_left (top, left), aesthetic_score (the batch's
                     "aesthetic_score" when it has one, else `cond.aesthetic_score`)
  `cond.micro_conditioning="fixed"` takes diffusers' sampling defaults instead (original = target =
  image_size, crop (0, 0)), for data that records no sizes (e.g. the latent cache).
- caption dropout (`cond.drop_prob`): ONE draw per example for all towers, so both encoders drop together.
    `cond.drop_mode="empty"`:  the empty prompt's tokens go through every tower (LDM / SD 1-2; diffusers'
                               `train_text_to_image_sdxl.py --proportion_empty_prompts`)
    `cond.drop_mode="zeros"`:  every tower's outputs — hidden states AND the pooled vector — are multiplied by
                               0, as SGM's `GeneralConditioner` does for an embedder with `ucg_rate` and no
                               `legacy_ucg_value` (SGM draws per embedder; here the draw is shared). This is
                               the null condition SDXL base samples with (`force_zeros_for_empty_prompt`), so
                               the sampling spec of such a run asks for zeroed negatives.
  The micro-conditioning is never dropped (SGM's size embedders have ucg_rate 0).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax.conditioning import n_micro_ids
from ldm_jax.models.text import build_text_encoder
from ldm_jax.training.objective import ConfigError

DROP_MODES = ("empty", "zeros")
MICRO_MODES = ("batch", "fixed")
BASE_KEYS = ("original_size", "crop_top_left", "target_size")  # 6 ids
REFINER_KEYS = ("original_size", "crop_top_left")  # + aesthetic score: 5 ids


def _tuples(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (_tuples(v) if isinstance(v, Mapping) else tuple(v) if isinstance(v, list) else v) for k, v in d.items()}


class TextConditioner:
    """The text tower(s) of an LDM objective and how a batch becomes (context, y); see the module docstring."""

    def __init__(self, cond: ml_collections.ConfigDict, unet_kwargs: Mapping[str, Any], image_size: int,
                 dtype: Any = jnp.float32, remat: str = "none", tokenizer: Any = None):
        text = cond.text.to_dict() if hasattr(cond.text, "to_dict") else dict(cond.text)
        self.kwargs = _tuples(text)
        self.module = build_text_encoder({**self.kwargs, "dtype": dtype, "remat_policy": remat})
        self.towers = tuple(self.kwargs["encoders"]) if "encoders" in self.kwargs else None
        tower_kwargs = list(self.kwargs["encoders"].values()) if self.towers else [self.kwargs]
        self.max_length = int(tower_kwargs[0].get("max_length", 77))
        self.tokenizer, self.image_size = tokenizer, int(image_size)
        self.drop_prob = float(cond.drop_prob)
        self.drop_mode = str(cond.get("drop_mode", "empty"))
        self.micro = str(cond.get("micro_conditioning", "batch"))
        self.aesthetic_score = float(cond.get("aesthetic_score", 6.0))
        if self.drop_mode not in DROP_MODES:
            raise ConfigError(f"cond.drop_mode={self.drop_mode!r} is unknown; use one of {DROP_MODES}")
        if self.micro not in MICRO_MODES:
            raise ConfigError(f"cond.micro_conditioning={self.micro!r} is unknown; use one of {MICRO_MODES}")
        ctx = unet_kwargs.get("context_dim")
        if ctx is not None and int(ctx) != int(self.module.width):
            raise ConfigError(f"unet.context_dim={ctx} but the text encoder(s) give {self.module.width}-wide hidden "
                              "states; set --config.unet.context_dim or cond.text to match")
        self.n_ids = 0
        adm = self.adm_in_channels = unet_kwargs.get("adm_in_channels")
        if adm is not None:
            try:
                self.n_ids = n_micro_ids(int(adm), int(self.module.pooled_dim),
                                         int(unet_kwargs.get("addition_time_embed_dim", 256)))
            except ValueError as e:
                raise ConfigError(f"unet.adm_in_channels does not fit the text encoder's pooled output: {e}") from None
            if self.n_ids not in (0, 5, 6):
                raise ConfigError(f"unet.adm_in_channels={adm} holds {self.n_ids} micro-conditioning ids; SDXL base "
                                  "takes 6 (original size, crop, target size), the refiner 5 (…, aesthetic score); "
                                  f"adm_in_channels={self.module.pooled_dim} (the pooled width) takes the pooled "
                                  "text alone")

    @property
    def added(self) -> bool:
        """Whether the UNet takes an added conditioning vector `y` (SDXL's, or the pooled text alone)."""
        return self.adm_in_channels is not None

    def uncond_ids(self) -> np.ndarray:
        """The empty prompt's ids: (L,) for one tower, (towers, L) for several."""
        shape = (self.max_length,) if self.towers is None else (len(self.towers), self.max_length)
        if self.tokenizer is None:
            return np.zeros(shape, np.int32)  # no tokenizer (tests): the all-zeros sequence is the null prompt
        return np.asarray(self.tokenizer([""]), np.int32)[0].reshape(shape)

    def init(self, key: jax.Array) -> Any:
        return self.module.init(key, jnp.asarray(self.uncond_ids())[None])["params"]

    def dummy_y(self) -> jax.Array | None:
        """A zero `y` (1, adm_in_channels) for the UNet's init, or None."""
        return jnp.zeros((1, int(self.adm_in_channels)), jnp.float32) if self.added else None

    def micro_ids(self, batch: Mapping[str, jax.Array], n: int) -> jax.Array:
        """(n, n_ids) float32 micro-conditioning ids of a batch (see the module docstring)."""
        if self.n_ids == 0:
            return jnp.zeros((n, 0), jnp.float32)
        if self.micro == "fixed":
            size, crop = (self.image_size, self.image_size), (0, 0)
            row = (*size, *crop, *size) if self.n_ids == 6 else (*size, *crop, self.aesthetic_score)
            return jnp.broadcast_to(jnp.asarray(row, jnp.float32), (n, self.n_ids))
        keys = BASE_KEYS if self.n_ids == 6 else REFINER_KEYS
        missing = [k for k in keys if k not in batch]
        if missing:
            raise ConfigError(f"the batch has no {missing} for SDXL's micro-conditioning: set "
                              "--config.data.record_sizes=True (or data.buckets=True), or "
                              "--config.cond.micro_conditioning=fixed")
        parts = [jnp.asarray(batch[k], jnp.float32).reshape(n, 2) for k in keys]
        if self.n_ids == 5:
            score = batch.get("aesthetic_score")
            score = jnp.full((n,), self.aesthetic_score, jnp.float32) if score is None else score
            parts.append(jnp.asarray(score, jnp.float32).reshape(n, 1))
        return jnp.concatenate(parts, axis=-1)

    def __call__(self, params: Any, unet: Any, batch: Mapping[str, jax.Array], drop: jax.Array,
                 uncond_ids: jax.Array, trainable: bool) -> tuple[jax.Array, jax.Array | None]:
        """(context, y) of the batch with the examples where `drop` (B,) is True set to the null condition."""
        ids = batch["input_ids"]
        if self.drop_mode == "empty":
            mask = drop.reshape((-1,) + (1,) * (ids.ndim - 1))
            ids = jnp.where(mask, uncond_ids[None], ids)
        hidden, pooled = self.module.apply({"params": params}, ids)
        if self.drop_mode == "zeros":
            keep = 1.0 - drop.astype(hidden.dtype)
            hidden, pooled = hidden * keep[:, None, None], pooled * keep[:, None].astype(pooled.dtype)
        if not trainable:
            hidden, pooled = jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(pooled)
        y = unet.added_cond(pooled, self.micro_ids(batch, ids.shape[0])) if self.added else None
        return hidden, y

    def sampling_options(self) -> dict[str, Any]:
        """Pipeline options of a model trained this way (`Pretrained.options`)."""
        if self.towers is None:
            return {}
        return {"force_zeros_for_empty_prompt": self.drop_mode == "zeros"}


def config_errors(config: ml_collections.ConfigDict, conditioner: TextConditioner | None) -> list[str]:
    """What cannot run in the data config for this conditioning (checked before compiling)."""
    if conditioner is None or conditioner.n_ids == 0 or conditioner.micro != "batch":
        return []
    d = config.data
    if d.get("cache"):
        return ["data.cache keeps no image sizes, but cond.micro_conditioning='batch' reads SDXL's micro-conditioning "
                "from the batch: set --config.cond.micro_conditioning=fixed, or train without the latent cache"]
    if not (d.get("record_sizes") or d.get("buckets")):
        return ["SDXL's micro-conditioning is read from the batch (cond.micro_conditioning='batch') but the input "
                "pipeline records no sizes: set --config.data.record_sizes=True (or data.buckets=True), or "
                "--config.cond.micro_conditioning=fixed"]
    return []
