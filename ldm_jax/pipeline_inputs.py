"""The pipeline's host-side inputs: the training noise schedule (`SchedulerConfig`), prompts -> token ids,
img2img/inpainting images and masks -> arrays, host arrays <-> global (batch-sharded, multi-process) arrays."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ldm_jax import sharding
from ldm_jax.diffusion import schedules

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclasses.dataclass
class SchedulerConfig:
    """The training noise schedule of a model (diffusers' scheduler_config fields)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    scale_factor: float = 0.18215
    trained_betas: tuple[float, ...] | None = None
    # where discrete-timestep schedules (ddim_uniform) put their steps, as diffusers' DDIM reads them
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    rescale_betas_zero_snr: bool = False  # Lin et al. 2023; pair with timestep_spacing "trailing"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SchedulerConfig":
        """Keeps the known keys of a diffusers/Pretrained scheduler dict."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t for t = 0..T-1 in float64."""
        # diffusers' names: "linear" is a plain linspace (ours "linear_diffusers"), "scaled_linear" is LDM's "linear".
        name = {"linear": "linear_diffusers"}.get(self.beta_schedule, self.beta_schedule)
        if self.trained_betas is not None:
            betas = np.asarray(self.trained_betas, np.float64)
        else:
            betas = schedules.make_betas(
                name, self.num_train_timesteps, linear_start=self.beta_start, linear_end=self.beta_end
            )
        if not self.rescale_betas_zero_snr:
            return schedules.alphas_cumprod(betas)
        ac = schedules.alphas_cumprod(schedules.rescale_zero_terminal_snr(betas))
        ac[-1] = schedules.ZERO_SNR_ALPHA_CUMPROD  # σ = 4096 instead of ∞, as diffusers' σ-space schedulers
        return ac


def as_host_ids(tokenizer: Callable[[Sequence[str]], np.ndarray], texts: Sequence[str]) -> np.ndarray:
    ids = np.asarray(tokenizer(list(texts)), dtype=np.int32)
    if ids.ndim not in (2, 3) or ids.shape[0] != len(texts):  # (B, towers, L) for several text towers (SDXL)
        raise ValueError(f"tokenizer returned shape {ids.shape} for {len(texts)} texts; expected (B, L)")
    return ids


def to_list(x: str | Sequence[str] | None, n: int | None, what: str) -> list[str] | None:
    if x is None:
        return None
    items = [x] if isinstance(x, str) else list(x)
    if not all(isinstance(s, str) for s in items):
        raise TypeError(f"{what} must be a string or a list of strings, got {items!r}")
    if n is not None and len(items) == 1 and n > 1:
        items = items * n
    if n is not None and len(items) != n:
        raise ValueError(f"{what}: got {len(items)} entries for {n} images")
    return items


def prepare_images(image: Any, mask: Any, n: int, height: int, width: int) -> tuple[Any, Any]:
    """img2img / inpainting inputs: images (n, H, W, 3) in [-1, 1] and masks (n, H, W) of 0/1 (1 = repaint)."""
    if image is None:
        return None, None
    img = np.asarray(image)
    if img.ndim == 3:
        img = np.broadcast_to(img[None], (n, *img.shape))
    if img.ndim != 4 or img.shape[-1] != 3 or img.shape[0] != n:
        raise ValueError(f"image must be (H,W,3) or ({n},H,W,3), got {img.shape}")
    if img.shape[1:3] != (height, width):
        raise ValueError(f"image is {img.shape[1]}x{img.shape[2]} but height x width is {height}x{width}")
    img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    img = img * 2.0 - 1.0
    if mask is None:
        return img, None
    m = np.asarray(mask)
    if m.ndim == 4 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim == 2:
        m = np.broadcast_to(m[None], (n, *m.shape))
    if m.shape != (n, height, width):
        raise ValueError(f"mask must be (H,W) or ({n},H,W) matching the image, got {np.asarray(mask).shape}")
    m = m.astype(np.float32) / 255.0 if m.dtype == np.uint8 else m.astype(np.float32)
    return img, (m >= 0.5).astype(np.float32)


def global_array(x: np.ndarray, sh: jax.sharding.NamedSharding) -> jax.Array:
    """A global array from a host array every process holds in full (works single- and multi-process)."""
    x = np.ascontiguousarray(x)
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])


def global_keys(key: jax.Array, idx: np.ndarray, mesh: Mesh) -> jax.Array:
    """Raw data of the per-image keys fold_in(key, j), sharded like the batch (a host array every process holds)."""
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.asarray(idx, jnp.uint32))
    data = np.asarray(jax.random.key_data(keys))
    return global_array(data, sharding.batch_sharding(mesh, data.ndim))


def fetch(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


@dataclasses.dataclass(frozen=True)
class ProgramKey:
    """Everything that shapes the compiled program (a new value compiles a new program)."""

    sampler: str
    options: tuple[tuple[str, Any], ...]
    n_sigmas: int
    batch: int
    latent_hw: tuple[int, int]
    mode: str  # txt2img | img2img | inpaint
    from_image: bool  # start from the noised image latents (strength < 1) rather than pure noise
    has_latents: bool
    output: str
    continues: bool = False  # `latents` are a previous stage's partly denoised output (denoising_start)
