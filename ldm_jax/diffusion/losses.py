"""Diffusion training losses (Ho et al. 2020, arXiv 2006.11239; LDM `ddpm.py` p_losses).

  x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε                                   (DDPM eq. 4)
  targets: eps → ε;  x0 → x0;  v → sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·x0         (Salimans & Ho 2022, arXiv 2202.00512)
  loss_t = mean over (H, W, C) of |out − target| (l1) or (out − target)² (l2), per sample
  loss   = mean_b( w_b · loss_t / exp(logvar_t) + logvar_t )           (LDM, learned per-timestep logvar)
  min-SNR-γ weights (Hang et al. 2023, arXiv 2303.09556), SNR = ᾱ/(1−ᾱ):
      eps: min(SNR, γ)/SNR;   v: min(SNR, γ)/(SNR+1);   x0: min(SNR, γ)
  offset noise (Guttenberg 2023): ε += s·ε', ε' ~ N(0, 1) of shape (B, 1, 1, C).
  timesteps: uniform over [0, T) (DDPM), or logit-normal (Esser et al. 2024, SD3, arXiv 2403.03206, sec. 3.1):
      t = floor(T·sigmoid(m + s·n)), n ~ N(0, 1); m > 0 puts more of the batch at high noise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PREDICTIONS = ("eps", "v", "x0")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")
LOSS_TYPES = ("l2", "l1")


def _bcast(a: jax.Array, x: jax.Array) -> jax.Array:
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)).astype(x.dtype)


def q_sample(x0: jax.Array, noise: jax.Array, t: jax.Array, alphas_cumprod: jax.Array) -> jax.Array:
    """x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε."""
    ab = alphas_cumprod[t]
    return _bcast(jnp.sqrt(ab), x0) * x0 + _bcast(jnp.sqrt(1.0 - ab), x0) * noise


def prediction_target(
    prediction: str, x0: jax.Array, noise: jax.Array, t: jax.Array, alphas_cumprod: jax.Array
) -> jax.Array:
    """What the model learns to output for `prediction` in ("eps", "v", "x0")."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        ab = alphas_cumprod[t]
        return _bcast(jnp.sqrt(ab), x0) * noise - _bcast(jnp.sqrt(1.0 - ab), x0) * x0
    raise ValueError(f"prediction {prediction!r} is unknown; choose one of {PREDICTIONS}")


def snr_table(alphas_cumprod) -> "np.ndarray":
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) per timestep, computed in float64 (1 − ᾱ_0 ≈ 1e-3 loses float32 digits)."""
    ab = np.asarray(alphas_cumprod, np.float64)
    return ab / (1.0 - ab)


def min_snr_weight(snr: jax.Array, gamma: float, prediction: str) -> jax.Array:
    """Min-SNR-γ loss weight per sample from each sample's SNR, for the given prediction type (Hang et al. 2023)."""
    s = snr
    clipped = jnp.minimum(s, gamma)
    if prediction == "eps":
        return clipped / s
    if prediction == "v":
        return clipped / (s + 1.0)
    if prediction == "x0":
        return clipped
    raise ValueError(f"prediction {prediction!r} is unknown; choose one of {PREDICTIONS}")


def sample_timesteps(key: jax.Array, n: int, num_timesteps: int, sampling: str = "uniform", loc: float = 0.0,
                     scale: float = 1.0) -> jax.Array:
    """(n,) int32 training timesteps in [0, num_timesteps): uniform, or logit-normal with location `loc` and
    scale `scale` (see the module docstring)."""
    if sampling == "uniform":
        return jax.random.randint(key, (n,), 0, num_timesteps)
    if sampling == "logit_normal":
        if not scale > 0:
            raise ValueError(f"logit-normal timestep scale must be > 0, got {scale}")
        u = jax.nn.sigmoid(loc + scale * jax.random.normal(key, (n,)))
        return jnp.clip(jnp.floor(u * num_timesteps).astype(jnp.int32), 0, num_timesteps - 1)
    raise ValueError(f"timestep sampling {sampling!r} is unknown; choose one of {TIMESTEP_SAMPLING}")


def sample_noise(key: jax.Array, shape: tuple[int, ...], offset: float = 0.0, dtype=jnp.float32) -> jax.Array:
    """Gaussian noise, plus offset noise constant over H and W when `offset` > 0."""
    k1, k2 = jax.random.split(key)
    noise = jax.random.normal(k1, shape, dtype)
    if offset:
        noise = noise + offset * jax.random.normal(k2, (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],), dtype)
    return noise


def per_sample_loss(out: jax.Array, target: jax.Array, loss_type: str) -> jax.Array:
    """Mean over all non-batch axes of the l1 or l2 error, in float32."""
    d = out.astype(jnp.float32) - target.astype(jnp.float32)
    if loss_type == "l2":
        e = jnp.square(d)
    elif loss_type == "l1":
        e = jnp.abs(d)
    else:
        raise ValueError(f"loss type {loss_type!r} is unknown; choose one of {LOSS_TYPES}")
    return jnp.mean(e, axis=tuple(range(1, e.ndim)))


def diffusion_loss(
    out: jax.Array,
    target: jax.Array,
    t: jax.Array,
    *,
    loss_type: str = "l2",
    logvar: jax.Array | None = None,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of LDM's p_losses: `mean(w · loss_t / exp(logvar_t) + logvar_t)`."""
    simple = per_sample_loss(out, target, loss_type)
    weighted = simple if weights is None else simple * weights
    if logvar is None:
        loss = jnp.mean(weighted)
        return loss, {"loss_simple": jnp.mean(simple)}
    lv = logvar[t].astype(jnp.float32)
    loss = jnp.mean(weighted / jnp.exp(lv) + lv)
    return loss, {"loss_simple": jnp.mean(simple), "logvar": jnp.mean(lv)}
