"""LDM's own samplers (CompVis `ldm/models/diffusion/ddim.py`, `plms.py`, `ddpm.py`) in σ form.

They take the same `(denoiser, x, sigmas)` as the k-diffusion samplers and work on the scaled
variable x = x_vp / sqrt(ᾱ) = x0 + σ·ε, which turns the CompVis updates into exact σ-space updates
(σ² = (1 − ᾱ)/ᾱ). With `sigmas = get_sigmas_ddim_uniform(S, train_sigmas, final="alpha0")` and a
discrete eps denoiser they reproduce CompVis/diffusers DDIM and PLMS with SD's settings: start
from x_T·sqrt(1 + σ_T²) and multiply the result by 1/sqrt(1 + σ_last²) to get their x_vp.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ldm_jax.diffusion.registry import register_sampler
from ldm_jax.diffusion.sampler_core import Denoiser, call_denoiser, draw, is_zero, sample_loop, setup, to_d


@register_sampler("ddim", space="vp", a1111="DDIM")
def sample_ddim(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                eta: float = 0.0, s_noise: float = 1.0) -> jax.Array:
    """DDIM (Song et al. 2021, eq. 12): x' = x̂0 + sqrt(σ'² − σ_η²)·ε̂ + σ_η·z, where
    σ_η = η·sqrt(σ'²(σ² − σ'²)/σ²) is the CompVis σ_t divided by sqrt(ᾱ_prev)."""
    x, sigmas, ns = setup("ddim", x, sigmas, key, noise_sampler, stochastic=not is_zero(eta))

    def step(x, s, state):
        sigma, sigma_next = s.sigma, s.sigma_next
        eps = to_d(x, sigma, s.denoised)
        if ns is None:
            return s.denoised + sigma_next * eps, s.cnt, state
        sigma_eta = eta * jnp.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
        x = s.denoised + jnp.sqrt(jnp.maximum(sigma_next ** 2 - sigma_eta ** 2, 0)) * eps
        # CompVis draws every step (the draw is multiplied by σ_t = 0 on a last step to σ = 0)
        return x + sigma_eta * s_noise * draw(ns, s.cnt, sigma, sigma_next, x), s.cnt + 1, state

    return sample_loop(denoiser, x, sigmas, step)


@register_sampler("ddpm", space="vp", noise="ancestral", a1111="DDPM")
def sample_ddpm(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                s_noise: float = 1.0) -> jax.Array:
    """DDPM ancestral sampling (Ho et al. 2020, eqs. 6-7: posterior mean and β̃ variance) over the
    given levels, as diffusers' DDPMScheduler ("fixed_small") / ComfyUI's `sample_ddpm`."""
    x, sigmas, ns = setup("ddpm", x, sigmas, key, noise_sampler, stochastic=True)

    def step(x, s, state):
        sigma, sigma_next = s.sigma, s.sigma_next
        eps = to_d(x, sigma, s.denoised)
        a_t, a_prev = 1 / (sigma ** 2 + 1), 1 / (sigma_next ** 2 + 1)
        alpha = a_t / a_prev
        mu = jnp.sqrt(1 / alpha) * (x * jnp.sqrt(a_t) - (1 - alpha) * eps / jnp.sqrt(1 - a_t))

        def noisy(cnt):
            std = jnp.sqrt((1 - alpha) * (1 - a_prev) / (1 - a_t))
            x_vp = mu + std * s_noise * draw(ns, cnt, sigma, sigma_next, x)
            return x_vp / jnp.sqrt(a_prev), cnt + 1

        return *lax.cond(sigma_next > 0, noisy, lambda cnt: (mu, cnt), s.cnt), state

    return sample_loop(denoiser, x, sigmas, step)


@register_sampler("plms", space="vp", a1111="PLMS", comfy=None)
def sample_plms(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None) -> jax.Array:
    """PLMS (Liu et al. 2022, PNDM eq. 12 with CompVis' pseudo improved Euler first step): Adams–
    Bashforth on ε̂ with x' = x + (σ' − σ)·ε'. One extra denoiser call on the first step."""
    x, sigmas, _ = setup("plms", x, sigmas)

    def step(x, s, old):  # old[0] is the newest previous ε̂
        sigma, sigma_next, i = s.sigma, s.sigma_next, s.i
        eps = to_d(x, sigma, s.denoised)

        def first(_):
            x_2 = x + (sigma_next - sigma) * eps
            eps_2 = to_d(x_2, sigma_next, call_denoiser(denoiser, x_2, sigma_next))
            return (eps + eps_2) / 2

        e_first = lax.cond((i == 0) & (sigma_next > 0), first, lambda _: eps, None)
        e_prime = jnp.where(i == 0, e_first, jnp.where(
            i == 1, (3 * eps - old[0]) / 2, jnp.where(
                i == 2, (23 * eps - 16 * old[0] + 5 * old[1]) / 12,
                (55 * eps - 59 * old[0] + 37 * old[1] - 9 * old[2]) / 24)))
        old = jnp.concatenate([eps[None], old[:-1]])
        return x + (sigma_next - sigma) * e_prime, s.cnt, old

    return sample_loop(denoiser, x, sigmas, step, jnp.zeros((3,) + x.shape, x.dtype))


__all__ = ["sample_ddim", "sample_ddpm", "sample_plms"]
