"""Public sampling namespace: k-diffusion's schedule and sampler names over a denoiser D(x, σ).

    from ldm_jax import sampling
    sigmas = sampling.get_sigmas_karras(30, 0.0292, 14.6146)
    x = sampling.sample_dpmpp_2m(denoiser, noise * sigmas[0], sigmas)

Every `sample_<name>(denoiser, x, sigmas, *, key=None, noise_sampler=None, **options)` is one
XLA program (jit it with the model parameters as arguments); `SAMPLERS` maps names to functions,
`SAMPLER_INFO` to their metadata (`ldm_jax.diffusion.registry.SamplerInfo`), `SCHEDULES` to the
registered schedules, each `fn(steps, NoiseLevels) -> steps + 1 sigmas` (`schedule_sigmas` calls
one by name). This module is the catalog: it imports every sampler module, so the registry is
complete once it is imported.
"""
from __future__ import annotations

from typing import Callable

# The sampler modules register themselves on import (ldm_jax/diffusion/registry.py says how to add one).
from ldm_jax.diffusion import (samplers, samplers_cfgpp, samplers_comfy, samplers_deis,  # noqa: F401
                                samplers_dpm_solver,
                                samplers_ipndm_lcm, samplers_ldm, samplers_sa_solver, samplers_unipc)
from ldm_jax.diffusion.brownian import BrownianTree, BrownianTreeNoiseSampler, key_noise_sampler
from ldm_jax.diffusion.denoisers import CFGDenoiser, DiscreteDenoiser, EDMDenoiser, discrete_denoiser
from ldm_jax.diffusion.registry import (SAMPLER_INFO, SAMPLERS, SCHEDULE_INFO, NoiseLevels, SamplerInfo,
                                        ScheduleInfo, a1111_infotext, display_names, sampler_info, sampler_levels,
                                        schedule_sigmas)
from ldm_jax.diffusion.sampler_core import get_ancestral_step, to_d
from ldm_jax.diffusion.schedules import (get_sigmas_ddim_uniform, get_sigmas_discrete, get_sigmas_exponential,
                                         get_sigmas_karras, get_sigmas_normal, get_sigmas_polyexponential,
                                         get_sigmas_simple, get_sigmas_vp)

SCHEDULES: dict[str, Callable] = {name: info.fn for name, info in SCHEDULE_INFO.items()}

# sample_<name> for every registered sampler (variants such as dpmpp_2m_sde_heun included)
globals().update({f"sample_{name}": fn for name, fn in SAMPLERS.items()})


def get_sampler(name: str) -> Callable:
    """The sampler function called `name` (ComfyUI / k-diffusion names, plus ddim/plms/ddpm)."""
    return sampler_info(name).fn


def sample(name: str, denoiser, x, sigmas, **kwargs):
    """`SAMPLERS[name](denoiser, x, sigmas, **kwargs)` with a clear error for unknown names."""
    return get_sampler(name)(denoiser, x, sigmas, **kwargs)


__all__ = [
    "SAMPLERS", "SAMPLER_INFO", "SCHEDULES", "SCHEDULE_INFO", "SamplerInfo", "ScheduleInfo", "NoiseLevels",
    "get_sampler", "sampler_info", "sample", "schedule_sigmas", "sampler_levels", "display_names", "a1111_infotext", "BrownianTree",
    "BrownianTreeNoiseSampler", "key_noise_sampler", "CFGDenoiser", "DiscreteDenoiser", "EDMDenoiser",
    "discrete_denoiser", "get_ancestral_step", "to_d", "get_sigmas_karras", "get_sigmas_exponential",
    "get_sigmas_polyexponential", "get_sigmas_vp", "get_sigmas_normal", "get_sigmas_simple",
    "get_sigmas_ddim_uniform", "get_sigmas_discrete",
] + [f"sample_{n}" for n in SAMPLERS]
