"""Noise schedules: training betas / alphas_cumprod (numpy, float64) and sampling sigma schedules.

Sampling schedules follow k-diffusion 0.1.1 (`k_diffusion/sampling.py`, `external.py`): they are
descending sigmas with a 0 appended. The continuous ones (karras, exponential, polyexponential, vp)
are jnp functions so `sigma_min`/`sigma_max` may be traced; `n` is static. The discrete ones
(normal, simple, ddim_uniform) pick training noise levels of a trained model.
"""
from __future__ import annotations


import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "linear_plain", "linear_diffusers", "sqrt_linear",
                  "sqrt", "cosine", "squaredcos_cap_v2")
DISCRETE_SCHEDULES = ("normal", "simple", "ddim_uniform")


def make_betas(schedule: str, num_timesteps: int = 1000, linear_start: float = 0.00085,
               linear_end: float = 0.012, cosine_s: float = 8e-3) -> np.ndarray:
    """Training betas (float64), as LDM's `make_beta_schedule` (ldm/modules/diffusionmodules/util.py).

    "linear"/"scaled_linear": linspace in sqrt(beta) then squared (LDM "linear" = diffusers
    "scaled_linear", SD's schedule). "linear_plain"/"linear_diffusers"/"sqrt_linear": plain linspace
    (diffusers "linear"; LDM confusingly calls it "sqrt_linear"). "sqrt": sqrt of the plain linspace.
    "cosine"/"squaredcos_cap_v2": Nichol & Dhariwal 2021 eq. 17, betas clipped to 0.999.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if schedule in ("linear", "scaled_linear"):
        return np.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
    if schedule in ("linear_plain", "linear_diffusers", "sqrt_linear"):
        return np.linspace(linear_start, linear_end, num_timesteps, dtype=np.float64)
    if schedule == "sqrt":
        return np.linspace(linear_start, linear_end, num_timesteps, dtype=np.float64) ** 0.5
    if schedule in ("cosine", "squaredcos_cap_v2"):
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps + cosine_s
        f = np.cos(steps / (1 + cosine_s) * np.pi / 2) ** 2
        f = f / f[0]
        return np.clip(1 - f[1:] / f[:-1], 0.0, 0.999)
    raise ValueError(f"unknown beta schedule {schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """ᾱ_t = prod_{s<=t} (1 - β_s) (Ho et al. 2020, eq. 4)."""
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


def sigmas_from_alphas_cumprod(alphas_cumprod):
    """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t): the variance-exploding noise level of a VP model (Karras et al. 2022)."""
    xp = np if isinstance(alphas_cumprod, np.ndarray) else jnp
    return xp.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def alphas_cumprod_from_sigmas(sigmas):
    """Inverse of `sigmas_from_alphas_cumprod`: ᾱ = 1 / (1 + σ²)."""
    return 1 / (1 + sigmas ** 2)


def training_sigmas(schedule: str = "linear", num_timesteps: int = 1000, linear_start: float = 0.00085,
                    linear_end: float = 0.012, cosine_s: float = 8e-3) -> np.ndarray:
    """The training noise levels σ_0 < ... < σ_{T-1} of a discrete model (float64)."""
    return sigmas_from_alphas_cumprod(alphas_cumprod(make_betas(
        schedule, num_timesteps, linear_start, linear_end, cosine_s)))


# ----------------------------------------------------------------------------------------------
# Continuous sampling schedules (k-diffusion names and formulas).


def _check_n(n: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"the number of steps n must be an int >= 1, got {n!r}")


def _append_zero(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.concatenate([x, jnp.zeros((1,), x.dtype)])


def get_sigmas_karras(n: int, sigma_min, sigma_max, rho: float = 7.0) -> jnp.ndarray:
    """Karras et al. 2022 eq. 5: (σmax^(1/ρ) + ramp·(σmin^(1/ρ) − σmax^(1/ρ)))^ρ, then 0."""
    _check_n(n)
    ramp = jnp.linspace(0.0, 1.0, n)
    min_inv_rho = jnp.asarray(sigma_min, ramp.dtype) ** (1 / rho)
    max_inv_rho = jnp.asarray(sigma_max, ramp.dtype) ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def get_sigmas_exponential(n: int, sigma_min, sigma_max) -> jnp.ndarray:
    """Sigmas evenly spaced in log σ from σmax to σmin, then 0."""
    _check_n(n)
    lo = jnp.log(jnp.asarray(sigma_min, jnp.result_type(float)))
    hi = jnp.log(jnp.asarray(sigma_max, jnp.result_type(float)))
    return _append_zero(jnp.exp(jnp.linspace(hi, lo, n)))


def get_sigmas_polyexponential(n: int, sigma_min, sigma_max, rho: float = 1.0) -> jnp.ndarray:
    """exp(ramp^ρ·(log σmax − log σmin) + log σmin) with ramp from 1 to 0, then 0."""
    _check_n(n)
    ramp = jnp.linspace(1.0, 0.0, n) ** rho
    lo = jnp.log(jnp.asarray(sigma_min, ramp.dtype))
    hi = jnp.log(jnp.asarray(sigma_max, ramp.dtype))
    return _append_zero(jnp.exp(ramp * (hi - lo) + lo))


def get_sigmas_vp(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> jnp.ndarray:
    """Continuous VP schedule (Song et al. 2021): sqrt(exp(β_d t²/2 + β_min t) − 1), t from 1 to ε_s."""
    _check_n(n)
    t = jnp.linspace(1.0, eps_s, n)
    return _append_zero(jnp.sqrt(jnp.exp(beta_d * t ** 2 / 2 + beta_min * t) - 1))


# ----------------------------------------------------------------------------------------------
# Discrete schedules over a trained model's noise levels (`train_sigmas` ascending, length T).


def sigma_to_t(sigma, log_sigmas, quantize: bool = False):
    """Continuous timestep of σ: linear interpolation in log σ between the bracketing training
    levels, or the nearest one when quantized (k-diffusion `DiscreteSchedule.sigma_to_t`)."""
    log_sigmas = jnp.asarray(log_sigmas)
    log_sigma = jnp.log(sigma)
    dists = log_sigma - log_sigmas.reshape((-1,) + (1,) * jnp.ndim(sigma))
    if quantize:
        return jnp.argmin(jnp.abs(dists), axis=0)
    num = log_sigmas.shape[0]
    # index of the last training level <= σ (0 when σ is below them all), as k-diffusion.
    low_idx = jnp.clip(jnp.sum(dists >= 0, axis=0) - 1, 0, num - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = jnp.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * high_idx


def t_to_sigma(t, log_sigmas):
    """Inverse of `sigma_to_t`: interpolate log σ between the training levels floor(t), ceil(t)."""
    log_sigmas = jnp.asarray(log_sigmas)
    t = jnp.asarray(t)
    low_idx = jnp.floor(t).astype(jnp.int32)
    high_idx = jnp.ceil(t).astype(jnp.int32)
    w = t - low_idx
    return jnp.exp((1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx])


def get_sigmas_normal(n: int, train_sigmas) -> jnp.ndarray:
    """k-diffusion `DiscreteSchedule.get_sigmas(n)`: t = linspace(T−1, 0, n) mapped to σ, then 0."""
    _check_n(n)
    log_sigmas = jnp.log(jnp.asarray(train_sigmas))
    t = jnp.linspace(log_sigmas.shape[0] - 1, 0, n, dtype=log_sigmas.dtype)
    return _append_zero(t_to_sigma(t, log_sigmas))


def get_sigmas_simple(n: int, train_sigmas) -> np.ndarray:
    """ComfyUI's "simple": every (T/n)-th training σ counted from the top, then 0."""
    _check_n(n)
    s = np.asarray(train_sigmas)
    step = len(s) / n
    return np.asarray([s[-(1 + int(k * step))] for k in range(n)] + [0.0], dtype=s.dtype)


def get_sigmas_ddim_uniform(n: int, train_sigmas, final: str = "zero") -> np.ndarray:
    """LDM's uniform DDIM timesteps `range(0, T, T // n) + 1` (descending) as σ.

    `final="zero"` appends σ=0 (ComfyUI "ddim_uniform", diffusers DDPM); `final="alpha0"` appends
    σ of ᾱ_0, the last target of CompVis DDIM/PLMS and diffusers DDIM/PNDM with
    `set_alpha_to_one=False` (SD's setting).
    """
    _check_n(n)
    s = np.asarray(train_sigmas)
    c = max(len(s) // n, 1)
    t = np.arange(0, len(s), c) + 1
    t = t[t < len(s)]
    if final not in ("zero", "alpha0"):
        raise ValueError(f"final must be 'zero' or 'alpha0', got {final!r}")
    last = 0.0 if final == "zero" else s[0]
    return np.concatenate([s[t[::-1]], np.asarray([last], s.dtype)])


def ddim_timesteps(n: int, num_timesteps: int = 1000) -> np.ndarray:
    """The descending integer timesteps of `get_sigmas_ddim_uniform` (for eps models called by t)."""
    c = max(num_timesteps // n, 1)
    t = np.arange(0, num_timesteps, c) + 1
    return t[t < num_timesteps][::-1]


def get_sigmas_discrete(kind: str, n: int, train_sigmas):
    """Dispatch to the discrete schedules by name ("normal", "simple", "ddim_uniform")."""
    fns = {"normal": get_sigmas_normal, "simple": get_sigmas_simple, "ddim_uniform": get_sigmas_ddim_uniform}
    if kind not in fns:
        raise ValueError(f"unknown discrete schedule {kind!r}; choose one of {', '.join(fns)}")
    return fns[kind](n, train_sigmas)


def sigma_min_max(train_sigmas) -> tuple[float, float]:
    """(σ_min, σ_max) of a trained model's levels, e.g. for `get_sigmas_karras`."""
    s = np.asarray(train_sigmas)
    return float(s.min()), float(s.max())


__all__ = [n for n in dir() if not n.startswith("_") and n not in ("annotations", "np", "jnp")]
