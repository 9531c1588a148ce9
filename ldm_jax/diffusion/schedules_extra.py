"""ComfyUI's sigma schedules beyond k-diffusion's, and Align Your Steps (numpy, float64).

Each returns steps + 1 descending sigmas ending at 0 from a model's training levels
`train_sigmas` (ascending σ(t), t = 0..T−1) or its (σ_min, σ_max), with ComfyUI's formulas
(comfy/samplers.py, 2025): sgm_uniform, beta (Lee et al. 2024, "Beta Sampling is All You Need",
arXiv 2407.12173), linear_quadratic (Genmo's Mochi schedule), kl_optimal (Sabour et al. 2024,
"Align Your Steps", eq. for the KL-optimal schedule: tan of a linear ramp in arctan σ), and the
Align Your Steps tables (NVIDIA's published 10-step levels for SD1 and SDXL) interpolated
log-linearly to any count.
"""
from __future__ import annotations

import numpy as np
import scipy.stats

from ldm_jax.diffusion.schedules import _check_n, t_to_sigma

# Sabour et al. 2024 (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html): 10-step levels.
AYS_LEVELS = {
    "sd1": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
            0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "sdxl": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
             0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
}


def get_sigmas_sgm_uniform(n: int, train_sigmas) -> np.ndarray:
    """SGM's uniform timesteps linspace(T−1, 0, n + 1) without the last one, as σ, then 0."""
    _check_n(n)
    t = np.linspace(len(train_sigmas) - 1, 0, n + 1)[:-1]
    return np.append(t_to_sigma(t, np.log(np.asarray(train_sigmas, np.float64))), 0.0)


def get_sigmas_beta(n: int, train_sigmas, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Timesteps at the Beta(α, β) quantiles 1 − k/n (k = 0..n−1) of [0, T−1], rounded, as σ, then 0.

    ComfyUI drops a timestep that repeats the previous one (and then runs fewer steps); here that
    is an error, since a schedule has exactly n + 1 entries."""
    _check_n(n)
    total = len(train_sigmas) - 1
    ts = np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), alpha, beta) * total).astype(np.int64)
    if np.any(np.diff(ts) == 0):
        k = int(np.nonzero(np.diff(ts) == 0)[0][0])
        raise ValueError(f"the beta schedule (alpha={alpha}, beta={beta}) puts steps {k} and {k + 1} of {n} on the "
                         f"same timestep {ts[k]} (ComfyUI drops the repeat and runs fewer steps); use fewer steps")
    return np.append(np.asarray(train_sigmas, np.float64)[ts], 0.0)


def get_sigmas_linear_quadratic(n: int, sigma_max: float, threshold_noise: float = 0.025,
                                linear_steps: int | None = None) -> np.ndarray:
    """σ_max·(1 − s) for Mochi's schedule s: linear up to `threshold_noise` over `linear_steps`
    (n // 2) steps, then quadratic to 1."""
    _check_n(n)
    if n == 1:
        return np.asarray([sigma_max, 0.0])
    linear_steps = n // 2 if linear_steps is None else linear_steps
    lin = [i * threshold_noise / linear_steps for i in range(linear_steps)]
    step_diff = linear_steps - threshold_noise * n
    quad_steps = n - linear_steps
    quad_coef = step_diff / (linear_steps * quad_steps ** 2)
    lin_coef = threshold_noise / linear_steps - 2 * step_diff / quad_steps ** 2
    const = quad_coef * linear_steps ** 2
    quad = [quad_coef * i ** 2 + lin_coef * i + const for i in range(linear_steps, n)]
    return (1.0 - np.asarray(lin + quad + [1.0], np.float64)) * sigma_max


def get_sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """tan((1 − k/(n−1))·atan σ_max + k/(n−1)·atan σ_min), k = 0..n−1, then 0 (n = 1: σ_max, 0)."""
    _check_n(n)
    w = np.arange(n, dtype=np.float64) / max(n - 1, 1)
    return np.append(np.tan(w * np.arctan(sigma_min) + (1 - w) * np.arctan(sigma_max)), 0.0)


def get_sigmas_ays(n: int, model: str = "sd1") -> np.ndarray:
    """Align Your Steps levels for `model` ("sd1", "sdxl"), log-linearly interpolated to n + 1
    points (ComfyUI's `loglinear_interp`), the last replaced by 0."""
    _check_n(n)
    if model not in AYS_LEVELS:
        raise ValueError(f"Align Your Steps has tables for {', '.join(AYS_LEVELS)}, not {model!r}")
    levels = np.asarray(AYS_LEVELS[model], np.float64)
    if n + 1 != len(levels):
        ys = np.log(levels[::-1])
        levels = np.exp(np.interp(np.linspace(0, 1, n + 1), np.linspace(0, 1, len(ys)), ys))[::-1]
    levels = levels.copy()
    levels[-1] = 0.0
    return levels


__all__ = ["AYS_LEVELS", "get_sigmas_sgm_uniform", "get_sigmas_beta", "get_sigmas_linear_quadratic",
           "get_sigmas_kl_optimal", "get_sigmas_ays"]
