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
               linear_end: float = 0.012, cosine_s: float = 8e-3, zero_terminal_snr: bool = False) -> np.ndarray:
    """Training betas; `zero_terminal_snr` rescales them so ᾱ_{T−1} = 0 (`rescale_zero_terminal_snr`)."""
    betas = _make_betas(schedule, num_timesteps, linear_start, linear_end, cosine_s)
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


def rescale_zero_terminal_snr(betas) -> np.ndarray:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1):
    shift and scale sqrt(ᾱ) so the last timestep has zero SNR and the first keeps its value (float64)."""
    ab_sqrt = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
    first, last = ab_sqrt[0], ab_sqrt[-1]
    ab = ((ab_sqrt - last) * (first / (first - last))) ** 2
    return 1.0 - np.concatenate([ab[:1], ab[1:] / ab[:-1]])


# diffusers' σ-space schedulers (Euler, DPM-Solver, UniPC, ...) with rescale_betas_zero_snr replace
# ᾱ_{T−1} = 0 (σ = ∞) by 2^-24 (σ = 4096): the first step starts from (almost) pure noise.
ZERO_SNR_ALPHA_CUMPROD = 2.0 ** -24


def _make_betas(schedule: str, num_timesteps: int, linear_start: float, linear_end: float,
                cosine_s: float) -> np.ndarray:
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
    """Inverse of `sigma_to_t`: interpolate log σ between the training levels floor(t), ceil(t)
    (numpy in, numpy out: the host-side schedules; otherwise jnp, traceable)."""
    xp = np if isinstance(t, np.ndarray) and isinstance(log_sigmas, np.ndarray) else jnp
    log_sigmas = xp.asarray(log_sigmas)
    t = xp.clip(xp.asarray(t), 0, log_sigmas.shape[0] - 1)
    low_idx = xp.floor(t).astype(xp.int32)
    high_idx = xp.ceil(t).astype(xp.int32)
    w = t - low_idx
    return xp.exp((1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx])


def get_sigmas_normal(n: int, train_sigmas) -> np.ndarray:
    """k-diffusion `DiscreteSchedule.get_sigmas(n)`: t = linspace(T−1, 0, n) mapped to σ, then 0
    (ComfyUI's "normal"); numpy, in the dtype of `train_sigmas`."""
    _check_n(n)
    log_sigmas = np.log(np.asarray(train_sigmas))
    t = np.linspace(log_sigmas.shape[0] - 1, 0, n, dtype=log_sigmas.dtype)
    return np.append(t_to_sigma(t, log_sigmas), np.zeros(1, log_sigmas.dtype))


def get_sigmas_simple(n: int, train_sigmas) -> np.ndarray:
    """ComfyUI's "simple": every (T/n)-th training σ counted from the top, then 0."""
    _check_n(n)
    s = np.asarray(train_sigmas)
    step = len(s) / n
    return np.asarray([s[-(1 + int(k * step))] for k in range(n)] + [0.0], dtype=s.dtype)


TIMESTEP_SPACINGS = ("leading", "trailing", "linspace", "compvis")


def discrete_timesteps(n: int, num_timesteps: int = 1000, spacing: str = "leading",
                       steps_offset: int = 0) -> np.ndarray:
    """The descending integer timesteps of an n-step discrete sampler.

    "leading", "trailing", "linspace": diffusers' `timestep_spacing` (Lin et al. 2023, Table 2), as
    DDIMScheduler.set_timesteps places them (`steps_offset` shifts "leading" only): exactly n of them.
    "compvis": CompVis' `make_ddim_timesteps(..., "uniform")`, range(0, T, T // n) + 1, which has
    more than n entries when n does not divide T (31 for n = 30), as ComfyUI's ddim_uniform.
    """
    _check_n(n)
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, got {spacing!r}")
    if n > num_timesteps:
        raise ValueError(f"{n} steps is more than the model's {num_timesteps} training timesteps")
    if spacing == "linspace":
        t = np.linspace(0, num_timesteps - 1, n).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        t = (np.arange(0, n) * (num_timesteps // n)).round()[::-1].astype(np.int64) + int(steps_offset)
    elif spacing == "trailing":
        # diffusers' np.arange(T, 0, -T / n) gets an extra entry (timestep -1) from float round-off for
        # 124 of the counts 1..1000 (61, 103, ...); these are its first n
        t = np.round(np.arange(num_timesteps, 0, -num_timesteps / n)[:n]).astype(np.int64) - 1
    else:
        c = max(num_timesteps // n, 1)
        t = np.arange(0, num_timesteps, c)[::-1] + 1
        t = t[t < num_timesteps]
    if t.min() < 0 or t.max() >= num_timesteps:
        raise ValueError(f"timestep_spacing {spacing!r} with steps_offset {steps_offset} puts {n} steps at "
                         f"timesteps {t.max()}..{t.min()}, outside 0..{num_timesteps - 1} (diffusers fails "
                         f"there too); use fewer steps or steps_offset 0")
    return t


def get_sigmas_ddim_uniform(n: int, train_sigmas, final: str = "zero", spacing: str = "compvis",
                            steps_offset: int = 1) -> np.ndarray:
    """The σ of `discrete_timesteps(n, T, spacing, steps_offset)`, then the final level.

    `final="zero"` appends σ=0 (ComfyUI "ddim_uniform", diffusers DDPM); `final="alpha0"` appends
    σ of ᾱ_0, the last target of CompVis DDIM/PLMS and diffusers DDIM/PNDM with
    `set_alpha_to_one=False` (SD's setting). The default spacing is CompVis' (ComfyUI's).
    """
    if final not in ("zero", "alpha0"):
        raise ValueError(f"final must be 'zero' or 'alpha0', got {final!r}")
    s = np.asarray(train_sigmas)
    t = discrete_timesteps(n, len(s), spacing, steps_offset)
    last = 0.0 if final == "zero" else s[0]
    return np.concatenate([s[t], np.asarray([last], s.dtype)])


def ddim_timesteps(n: int, num_timesteps: int = 1000) -> np.ndarray:
    """The descending integer timesteps of `get_sigmas_ddim_uniform` (CompVis spacing)."""
    return discrete_timesteps(n, num_timesteps, "compvis")


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
