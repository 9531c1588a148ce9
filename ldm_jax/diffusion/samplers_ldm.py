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

from ldm_jax.diffusion.samplers import (Denoiser, _is_zero, call_denoiser, check_inputs, default_noise,
                                        draw, scan_steps, to_d)


def sample_ddim(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                eta: float = 0.0, s_noise: float = 1.0) -> jax.Array:
    """DDIM (Song et al. 2021, eq. 12): x' = x̂0 + sqrt(σ'² − σ_η²)·ε̂ + σ_η·z, where
    σ_η = η·sqrt(σ'²(σ² − σ'²)/σ²) is the CompVis σ_t divided by sqrt(ᾱ_prev)."""
    stochastic = not _is_zero(eta)
    x, sigmas = check_inputs("ddim", x, sigmas, needs_noise=stochastic, key=key, noise_sampler=noise_sampler)
    ns = default_noise(x, sigmas, key, noise_sampler) if stochastic else None

    def body(carry, i):
        x, cnt = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x, sigma)
        eps = to_d(x, sigma, denoised)
        if not stochastic:
            return denoised + sigma_next * eps, cnt
        sigma_eta = eta * jnp.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
        x = denoised + jnp.sqrt(jnp.maximum(sigma_next ** 2 - sigma_eta ** 2, 0)) * eps
        # CompVis draws every step (the draw is multiplied by σ_t = 0 on a last step to σ = 0)
        return x + sigma_eta * s_noise * draw(ns, cnt, sigma, sigma_next, x), cnt + 1

    return scan_steps(body, (x, jnp.int32(0)), sigmas)[0]


def sample_ddpm(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                s_noise: float = 1.0) -> jax.Array:
    """DDPM ancestral sampling (Ho et al. 2020, eqs. 6-7: posterior mean and β̃ variance) over the
    given levels, as diffusers' DDPMScheduler ("fixed_small") / ComfyUI's `sample_ddpm`."""
    x, sigmas = check_inputs("ddpm", x, sigmas, needs_noise=True, key=key, noise_sampler=noise_sampler)
    ns = default_noise(x, sigmas, key, noise_sampler)

    def body(carry, i):
        x, cnt = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x, sigma)
        eps = to_d(x, sigma, denoised)
        a_t, a_prev = 1 / (sigma ** 2 + 1), 1 / (sigma_next ** 2 + 1)
        alpha = a_t / a_prev
        mu = jnp.sqrt(1 / alpha) * (x * jnp.sqrt(a_t) - (1 - alpha) * eps / jnp.sqrt(1 - a_t))

        def noisy(cnt):
            std = jnp.sqrt((1 - alpha) * (1 - a_prev) / (1 - a_t))
            x_vp = mu + std * s_noise * draw(ns, cnt, sigma, sigma_next, x)
            return x_vp / jnp.sqrt(a_prev), cnt + 1

        return lax.cond(sigma_next > 0, noisy, lambda cnt: (mu, cnt), cnt)

    return scan_steps(body, (x, jnp.int32(0)), sigmas)[0]


def sample_plms(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None) -> jax.Array:
    """PLMS (Liu et al. 2022, PNDM eq. 12 with CompVis' pseudo improved Euler first step): Adams–
    Bashforth on ε̂ with x' = x + (σ' − σ)·ε'. One extra denoiser call on the first step."""
    x, sigmas = check_inputs("plms", x, sigmas)

    def body(carry, i):
        x, old = carry  # old[0] is the newest previous ε̂
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        eps = to_d(x, sigma, call_denoiser(denoiser, x, sigma))

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
        return x + (sigma_next - sigma) * e_prime, old

    return scan_steps(body, (x, jnp.zeros((3,) + x.shape, x.dtype)), sigmas)[0]


__all__ = ["sample_ddim", "sample_ddpm", "sample_plms"]
