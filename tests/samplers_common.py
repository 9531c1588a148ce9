"""Shared helpers for the sampler tests: the analytic Gaussian-mixture denoiser and the goldens."""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

GOLDENS = pathlib.Path(__file__).parent / "goldens"


def load(name: str) -> dict:
    with np.load(GOLDENS / name) as f:
        return {k: f[k] for k in f.files}


def mixture_denoiser(means, stds, weights):
    """Exact D(x, σ) = E[x0 | x0 + σ n = x] for x0 ~ Σ w_k N(μ_k, s_k² I) (per sample, flattened)."""
    means, stds, weights = (np.asarray(a) for a in (means, stds, weights))
    d = means.shape[1]

    def denoise(x, sigma):
        mu = jnp.asarray(means, x.dtype)
        sk2 = jnp.asarray(stds, x.dtype) ** 2
        xf = x.reshape(x.shape[0], -1)
        v = sk2[None, :] + jnp.reshape(sigma, (-1, 1)) ** 2
        diff = xf[:, None, :] - mu[None]
        logp = jnp.log(jnp.asarray(weights, x.dtype))[None] - (diff ** 2).sum(-1) / (2 * v) - d / 2 * jnp.log(v)
        r = jax.nn.softmax(logp, axis=1)
        post = mu[None] + (sk2[None, :] / v)[..., None] * diff
        return (r[..., None] * post).sum(1).reshape(x.shape)

    return denoise


def bank_sampler(bank):
    """noise_sampler that returns the i-th stored draw."""
    def sample(i, sigma, sigma_next):
        return bank[i]
    return sample


def rel_err(a, b) -> float:
    """max |a − b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())
