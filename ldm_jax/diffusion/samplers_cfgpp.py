"""CFG++ samplers (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance for
Diffusion Models", arXiv 2406.08070) with ComfyUI's step rules and names.

CFG++ moves to the guided x0-estimate D but re-noises along the *unguided* direction
(x − D_u)/σ, e.g. its Euler step is x' = D + σ'·(x − D_u)/σ instead of x + (σ' − σ)·(x − D)/σ. The
denoiser must therefore offer `with_uncond(x, σ) -> (D, D_u)` from one batched call
(`ldm_jax.diffusion.denoisers.CFGDenoiser` does); a denoiser without it is rejected before anything
is traced. Contract otherwise as `ldm_jax.diffusion.samplers`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ldm_jax.diffusion.registry import register_sampler
from ldm_jax.diffusion.sampler_core import (Denoiser, add_noise, get_ancestral_step, is_zero, scan_steps, setup,
                                            sigma_of, t_of, to_d)
from ldm_jax.diffusion.samplers_comfy import gradient_estimation, positive, predictor, res_multistep


def euler_cfg_pp(name: str, denoiser, x, sigmas, key, noise_sampler, *, eta, s_noise):
    """x' = D + σ_down·(x − D_u)/σ + σ_up·s_noise·ε, and D on the last step."""
    stochastic = positive(eta) and positive(s_noise)
    # σ_down keeps η even when s_noise = 0 (no draws then), as ComfyUI
    x, sigmas, ns = setup(name, x, sigmas, key, noise_sampler, stochastic=stochastic)
    predict = predictor(name, denoiser, cfg_pp=True)

    def body(carry, i):
        x, cnt = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, uncond = predict(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x_new, cnt = add_noise(denoised + sigma_down * to_d(x, sigma, uncond), cnt, ns, sigma, sigma_next,
                               s_noise * sigma_up)
        return jnp.where(sigma_next == 0, denoised, x_new), cnt

    return scan_steps(body, (x, jnp.int32(0)), sigmas)[0]


@register_sampler("euler_ancestral_cfg_pp", noise="ancestral", needs_uncond=True)
def sample_euler_ancestral_cfg_pp(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                                  eta: float = 1.0, s_noise: float = 1.0) -> jax.Array:
    """Ancestral Euler with CFG++ (ComfyUI `euler_ancestral_cfg_pp`)."""
    return euler_cfg_pp("euler_ancestral_cfg_pp", denoiser, x, sigmas, key, noise_sampler, eta=eta, s_noise=s_noise)


@register_sampler("euler_cfg_pp", needs_uncond=True)
def sample_euler_cfg_pp(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None) -> jax.Array:
    """Euler with CFG++ (ComfyUI `euler_cfg_pp`): x' = D + σ'·(x − D_u)/σ."""
    return euler_cfg_pp("euler_cfg_pp", denoiser, x, sigmas, None, None, eta=0.0, s_noise=0.0)


@register_sampler("dpmpp_2s_ancestral_cfg_pp", noise="ancestral", needs_uncond=True)
def sample_dpmpp_2s_ancestral_cfg_pp(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                                     eta: float = 1.0, s_noise: float = 1.0) -> jax.Array:
    """DPM-Solver++(2S) ancestral with CFG++ (ComfyUI `dpmpp_2s_ancestral_cfg_pp`). As ComfyUI, the
    final update shifts x by D − D_u with D_u of the *midpoint* evaluation (its post-CFG hook keeps
    the last unguided prediction)."""
    stochastic = not is_zero(eta)
    x, sigmas, ns = setup("dpmpp_2s_ancestral_cfg_pp", x, sigmas, key, noise_sampler, stochastic=stochastic)
    predict = predictor("dpmpp_2s_ancestral_cfg_pp", denoiser, cfg_pp=True)

    def body(carry, i):
        x, cnt = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, uncond = predict(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)

        def euler(_):
            return denoised + to_d(x, sigma, uncond) * sigma_down

        def dpmpp_2s(_):
            t, t_next = t_of(sigma), t_of(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (sigma_of(s) / sigma_of(t)) * (x + (denoised - uncond)) - jnp.expm1(-0.5 * h) * denoised
            denoised_2, uncond_2 = predict(x_2, sigma_of(s))
            return (sigma_of(t_next) / sigma_of(t)) * (x + (denoised - uncond_2)) - jnp.expm1(-h) * denoised_2

        x = lax.cond(sigma_down > 0, dpmpp_2s, euler, None)
        return add_noise(x, cnt, ns, sigma, sigma_next, s_noise * sigma_up)

    return scan_steps(body, (x, jnp.int32(0)), sigmas)[0]


@register_sampler("dpmpp_2m_cfg_pp", needs_uncond=True)
def sample_dpmpp_2m_cfg_pp(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None) -> jax.Array:
    """DPM-Solver++(2M) with CFG++ (ComfyUI `dpmpp_2m_cfg_pp`): x' = D + e^{−h}(x − D_u) − (e^{−h} − 1)
    ·(D − D_u,prev)/(2r); first order on the first step, x' = D on the last."""
    x, sigmas, _ = setup("dpmpp_2m_cfg_pp", x, sigmas)
    predict = predictor("dpmpp_2m_cfg_pp", denoiser, cfg_pp=True)

    def body(carry, i):
        x, old_uncond = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, uncond = predict(x, sigma)
        second = (i > 0) & (sigma_next > 0)
        t = t_of(sigma)
        # the last step's h is +inf (t(0)); keep the unused branches finite
        h = jnp.where(sigma_next > 0, t_of(jnp.where(sigma_next > 0, sigma_next, sigma)) - t, jnp.inf)
        r = (t - t_of(sigmas[jnp.maximum(i - 1, 0)])) / jnp.where(second, h, 1.0)
        mix = -jnp.exp(-h) * uncond
        corr = jnp.expm1(-h) * (1 / (2 * jnp.where(second, r, 1.0))) * (denoised - old_uncond)
        mix = jnp.where(second, mix - corr, mix)
        return denoised + mix + jnp.exp(-h) * x, uncond

    return scan_steps(body, (x, jnp.zeros_like(x)), sigmas)[0]


@register_sampler("res_multistep_cfg_pp", needs_uncond=True)
def sample_res_multistep_cfg_pp(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                                s_noise: float = 1.0) -> jax.Array:
    """RES multistep with CFG++ (ComfyUI `res_multistep_cfg_pp`)."""
    return res_multistep("res_multistep_cfg_pp", denoiser, x, sigmas, key, noise_sampler, eta=0.0, s_noise=s_noise,
                         cfg_pp=True)


@register_sampler("res_multistep_ancestral_cfg_pp", noise="ancestral", needs_uncond=True)
def sample_res_multistep_ancestral_cfg_pp(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None,
                                          noise_sampler=None, eta: float = 1.0, s_noise: float = 1.0) -> jax.Array:
    """Ancestral RES multistep with CFG++ (ComfyUI `res_multistep_ancestral_cfg_pp`)."""
    return res_multistep("res_multistep_ancestral_cfg_pp", denoiser, x, sigmas, key, noise_sampler, eta=eta,
                         s_noise=s_noise, cfg_pp=True)


@register_sampler("gradient_estimation_cfg_pp", needs_uncond=True)
def sample_gradient_estimation_cfg_pp(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                                      ge_gamma: float = 2.0) -> jax.Array:
    """Gradient estimation with CFG++ (ComfyUI `gradient_estimation_cfg_pp`)."""
    return gradient_estimation("gradient_estimation_cfg_pp", denoiser, x, sigmas, ge_gamma=ge_gamma, cfg_pp=True)


__all__ = [
    "sample_euler_cfg_pp", "sample_euler_ancestral_cfg_pp", "sample_dpmpp_2s_ancestral_cfg_pp",
    "sample_dpmpp_2m_cfg_pp", "sample_res_multistep_cfg_pp", "sample_res_multistep_ancestral_cfg_pp",
    "sample_gradient_estimation_cfg_pp",
]
