"""Public sampling namespace: k-diffusion's schedule and sampler names over a denoiser D(x, σ).

    from ldm_jax import sampling
    sigmas = sampling.get_sigmas_karras(30, 0.0292, 14.6146)
    x = sampling.sample_dpmpp_2m(denoiser, noise * sigmas[0], sigmas)

Every `sample_<name>(denoiser, x, sigmas, *, key=None, noise_sampler=None, **options)` is one
XLA program (jit it with the model parameters as arguments); `SAMPLERS` maps names to functions.
"""
from __future__ import annotations

from typing import Callable

from ldm_jax.diffusion.brownian import BrownianTree, BrownianTreeNoiseSampler, key_noise_sampler
from ldm_jax.diffusion.denoisers import CFGDenoiser, DiscreteDenoiser, EDMDenoiser, discrete_denoiser
from ldm_jax.diffusion.samplers import (get_ancestral_step, sample_dpm_2, sample_dpm_2_ancestral,
                                        sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_2s_ancestral,
                                        sample_dpmpp_3m_sde, sample_dpmpp_sde, sample_euler,
                                        sample_euler_ancestral, sample_heun, sample_lms, to_d)
from ldm_jax.diffusion.samplers_dpm_solver import sample_dpm_adaptive, sample_dpm_fast
from ldm_jax.diffusion.samplers_ldm import sample_ddim, sample_ddpm, sample_plms
from ldm_jax.diffusion.schedules import (get_sigmas_ddim_uniform, get_sigmas_discrete, get_sigmas_exponential,
                                         get_sigmas_karras, get_sigmas_normal, get_sigmas_polyexponential,
                                         get_sigmas_simple, get_sigmas_vp)

SAMPLERS: dict[str, Callable] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "ddim": sample_ddim,
    "plms": sample_plms,
    "ddpm": sample_ddpm,
}

SCHEDULES: dict[str, Callable] = {
    "karras": get_sigmas_karras,
    "exponential": get_sigmas_exponential,
    "polyexponential": get_sigmas_polyexponential,
    "vp": get_sigmas_vp,
}


def get_sampler(name: str) -> Callable:
    """The sampler function called `name` (k-diffusion names, plus ddim/plms/ddpm)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]


def sample(name: str, denoiser, x, sigmas, **kwargs):
    """`SAMPLERS[name](denoiser, x, sigmas, **kwargs)` with a clear error for unknown names."""
    return get_sampler(name)(denoiser, x, sigmas, **kwargs)


__all__ = [
    "SAMPLERS", "SCHEDULES", "get_sampler", "sample", "BrownianTree", "BrownianTreeNoiseSampler",
    "key_noise_sampler", "CFGDenoiser", "DiscreteDenoiser", "EDMDenoiser", "discrete_denoiser",
    "get_ancestral_step", "to_d", "get_sigmas_karras", "get_sigmas_exponential", "get_sigmas_polyexponential",
    "get_sigmas_vp", "get_sigmas_normal", "get_sigmas_simple", "get_sigmas_ddim_uniform", "get_sigmas_discrete",
] + [f"sample_{n}" for n in SAMPLERS]
