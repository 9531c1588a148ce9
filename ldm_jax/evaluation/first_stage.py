"""An offline feature space for FID/KID: the run's own first-stage encoder (flattened posterior mean).

For runs where the FID Inception weights are not at hand (the shapes main job, tests, a machine without the
.pth), samples and reference images are encoded by the autoencoder the latent diffusion model was trained on,
and FID/KID are computed on the flattened latents (KL: the posterior mean; VQ: the pre-quantisation latents).
The numbers are labelled `fid_first_stage` / `kid_first_stage`: they are NOT comparable with Inception-FID,
nor between runs with different autoencoders, but within a run they fall as samples approach the data, so a
user gets a sample-quality curve. 32x32 shapes through the KL-f4 autoencoder: 8x8x4 = 256-d features.
"""
from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from ldm_jax import sharding
from ldm_jax.evaluation.features import BatchedApply, check_images


def _encode_fn(vae: nn.Module):
    def fn(params, x):
        x = x.astype(jnp.float32) / 127.5 - 1.0
        z = vae.apply({"params": params}, x, method="encode_latent")  # KL: the posterior mean; VQ: pre-quantization
        return z.reshape(z.shape[0], -1).astype(jnp.float32)

    return fn


class FirstStageFeatures:
    """uint8 images -> (N, h*w*embed_dim) first-stage latents, batch-sharded like `InceptionFeatures`."""

    def __init__(self, vae: nn.Module, vae_params: Any, *, batch_size: int = 50, mesh: Mesh | None = None):
        self._apply = BatchedApply(_encode_fn(vae), vae_params, batch_size, mesh)

    def set_params(self, vae_params: Any) -> None:
        """New buffers of the same weights (a training state's, donated by each step): no recompile."""
        rep = sharding.replicated(self._apply.mesh)
        self._apply.params = jax.tree_util.tree_map(lambda a: jax.device_put(a, rep), vae_params)

    def __call__(self, images: np.ndarray | Iterable[np.ndarray], *, total: int | None = None,
                 progress: bool = False) -> np.ndarray:
        if isinstance(images, np.ndarray):
            check_images(images)
        return self._apply(images, total=total, progress=progress, desc="first-stage features")


def from_pipeline(pipe: Any, **kwargs: Any) -> FirstStageFeatures:
    """The first-stage feature space of a `ldm_jax.pipeline.Pipeline` (its VAE and weights)."""
    params = pipe.params["vae"]
    return FirstStageFeatures(pipe.vae, jax.tree_util.tree_map(np.asarray, params), mesh=pipe.mesh, **kwargs)
