"""k-diffusion's samplers (v0.1.1, `k_diffusion/sampling.py`) as single XLA programs.

Every sampler is `sample_<name>(denoiser, x, sigmas, *, key=None, noise_sampler=None, **options)`
with `denoiser(x, sigma) -> denoised` (sigma has shape (batch,)), options named as in k-diffusion.
Steps run in one `lax.scan`; branches that k-diffusion takes on the value of a sigma (the last
step to σ = 0, the first step of a multistep method) are `lax.cond`s, so the number of denoiser
calls is k-diffusion's while `sigmas` may be traced: a new schedule of the same length reuses the
compiled program. Each Gaussian draw goes through `noise_sampler(i, sigma, sigma_next)` with `i`
counting the draws in k-diffusion's order (`torch.randn_like` churn draws included).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ldm_jax.diffusion.registry import register_sampler, register_variant
from ldm_jax.diffusion.sampler_core import (Denoiser, add_noise, call_denoiser, draw, get_ancestral_step,
                                            is_zero, sample_loop, scan_steps, setup, to_d)
from ldm_jax.diffusion.sampler_core import sigma_of as _sigma
from ldm_jax.diffusion.sampler_core import t_of as _t


def _churn(x, sigma, n_steps, cnt, ns, sigma_next, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al. 2022 Alg. 2 lines 4-6; k-diffusion 0.1.1 draws randn_like on every step."""
    if is_zero(s_churn):
        return x, sigma, cnt
    gamma = jnp.where((s_tmin <= sigma) & (sigma <= s_tmax), min(s_churn / n_steps, 2 ** 0.5 - 1), 0.0)
    eps = draw(ns, cnt, sigma, sigma_next, x) * s_noise
    sigma_hat = sigma * (gamma + 1)
    # max(., 0): with FMA contraction σ̂² − σ² is a tiny negative number when γ = 0
    return x + eps * jnp.sqrt(jnp.maximum(sigma_hat ** 2 - sigma ** 2, 0)), sigma_hat, cnt + 1


# ----------------------------------------------------------------------------------------------
# Karras et al. 2022 samplers.


def _churn_sampler(name: str, second_order: str | None):
    def sampler(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                s_noise: float = 1.0) -> jax.Array:
        x, sigmas, ns = setup(name, x, sigmas, key, noise_sampler, stochastic=not is_zero(s_churn))
        n_steps = sigmas.shape[0] - 1

        def body(carry, i):
            x, cnt = carry
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            x, sigma_hat, cnt = _churn(x, sigma, n_steps, cnt, ns, sigma_next, s_churn, s_tmin, s_tmax, s_noise)
            d = to_d(x, sigma_hat, call_denoiser(denoiser, x, sigma_hat))
            dt = sigma_next - sigma_hat
            if second_order is None:
                return x + d * dt, cnt

            def euler(_):
                return x + d * dt

            def heun(_):
                x_2 = x + d * dt
                d_2 = to_d(x_2, sigma_next, call_denoiser(denoiser, x_2, sigma_next))
                return x + (d + d_2) / 2 * dt

            def dpm_2(_):
                sigma_mid = jnp.exp(jnp.log(sigma_hat) + 0.5 * (jnp.log(sigma_next) - jnp.log(sigma_hat)))
                x_2 = x + d * (sigma_mid - sigma_hat)
                d_2 = to_d(x_2, sigma_mid, call_denoiser(denoiser, x_2, sigma_mid))
                return x + d_2 * dt

            step = heun if second_order == "heun" else dpm_2
            return lax.cond(sigma_next > 0, step, euler, None), cnt

        return scan_steps(body, (x, jnp.int32(0)), sigmas)[0]

    return sampler


sample_euler = _churn_sampler("euler", None)
sample_euler.__doc__ = "Karras et al. 2022 Algorithm 2 with Euler steps (k-diffusion `sample_euler`)."
sample_heun = _churn_sampler("heun", "heun")
sample_heun.__doc__ = "Karras et al. 2022 Algorithm 2 (Heun steps; Euler on the last step to σ = 0)."
sample_dpm_2 = _churn_sampler("dpm_2", "dpm_2")
sample_dpm_2.__doc__ = "DPM-Solver-2 (Lu et al. 2022) midpoint in log σ with Karras churn (k-diffusion dpm_2)."
register_sampler("euler", a1111="Euler")(sample_euler)
register_sampler("heun", a1111="Heun")(sample_heun)
register_sampler("dpm_2", a1111="DPM2")(sample_dpm_2)


def _ancestral_sampler(name: str, to_down: Callable, draw_if_down: bool = False) -> Callable:
    """An ancestral sampler: a deterministic step `to_down(denoiser, x, σ, σ_down, denoised)` to
    σ_down, then σ_up·s_noise·z, drawn while σ_next > 0 (or, as k-diffusion's dpm_2_ancestral, only
    when σ_down > 0)."""
    def sampler(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                eta: float = 1.0, s_noise: float = 1.0) -> jax.Array:
        x, sigmas, ns = setup(name, x, sigmas, key, noise_sampler, stochastic=not is_zero(eta))

        def step(x, s, state):
            sigma_down, sigma_up = get_ancestral_step(s.sigma, s.sigma_next, eta)
            euler = lambda: x + to_d(x, s.sigma, s.denoised) * (sigma_down - s.sigma)  # noqa: E731
            x = lax.cond(sigma_down > 0, lambda: to_down(denoiser, x, s.sigma, sigma_down, s.denoised), euler)
            return *add_noise(x, s.cnt, ns, s.sigma, sigma_down if draw_if_down else s.sigma_next,
                              s_noise * sigma_up), state

        return sample_loop(denoiser, x, sigmas, step)

    return sampler


def _euler_down(denoiser, x, sigma, sigma_down, denoised):
    return x + to_d(x, sigma, denoised) * (sigma_down - sigma)


def _dpm_2_down(denoiser, x, sigma, sigma_down, denoised):
    d = to_d(x, sigma, denoised)
    sigma_mid = jnp.exp(jnp.log(sigma) + 0.5 * (jnp.log(sigma_down) - jnp.log(sigma)))
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, call_denoiser(denoiser, x_2, sigma_mid))
    return x + d_2 * (sigma_down - sigma)


def _dpmpp_2s_down(denoiser, x, sigma, sigma_down, denoised):
    t, t_next = _t(sigma), _t(sigma_down)
    h = t_next - t
    t_mid = t + 0.5 * h
    x_2 = (_sigma(t_mid) / _sigma(t)) * x - jnp.expm1(-0.5 * h) * denoised
    denoised_2 = call_denoiser(denoiser, x_2, _sigma(t_mid))
    return (_sigma(t_next) / _sigma(t)) * x - jnp.expm1(-h) * denoised_2


sample_euler_ancestral = register_sampler("euler_ancestral", noise="ancestral", a1111="Euler a")(
    _ancestral_sampler("euler_ancestral", _euler_down))
sample_euler_ancestral.__doc__ = "Ancestral sampling with Euler steps (k-diffusion `sample_euler_ancestral`)."
sample_dpm_2_ancestral = register_sampler("dpm_2_ancestral", noise="ancestral", a1111="DPM2 a")(
    _ancestral_sampler("dpm_2_ancestral", _dpm_2_down, draw_if_down=True))
sample_dpm_2_ancestral.__doc__ = "Ancestral sampling with DPM-Solver-2 steps (k-diffusion `sample_dpm_2_ancestral`)."


def _lms_coeffs(sigmas, i, order: int):
    """Adams coefficients ∫ ℓ_j(τ) dτ over [σ_i, σ_{i+1}] of the Lagrange basis on σ_i..σ_{i-k+1},
    for k = min(i + 1, order) (k-diffusion `linear_multistep_coeff`; Gauss–Legendre is exact here)."""
    nodes, weights = np.polynomial.legendre.leggauss(max(order, 1))
    a, b = sigmas[i], sigmas[i + 1]
    tau = (b - a) / 2 * jnp.asarray(nodes, sigmas.dtype) + (a + b) / 2
    w = jnp.asarray(weights, sigmas.dtype) * (b - a) / 2
    hist = [sigmas[jnp.maximum(i - m, 0)] for m in range(order)]
    rows = []
    for k in range(1, order + 1):
        row = []
        for j in range(k):
            prod = jnp.ones_like(tau)
            for m in range(k):
                if m != j:
                    prod = prod * (tau - hist[m]) / (hist[j] - hist[m])
            row.append(jnp.sum(w * prod))
        rows.append(jnp.stack(row + [jnp.zeros((), sigmas.dtype)] * (order - k)))
    return jnp.stack(rows)[jnp.minimum(i + 1, order) - 1]


@register_sampler("lms", a1111="LMS")
def sample_lms(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
               order: int = 4) -> jax.Array:
    """Linear multistep (Adams–Bashforth in σ) of the given order (k-diffusion `sample_lms`)."""
    x, sigmas, _ = setup("lms", x, sigmas)
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"lms: order must be an int >= 1, got {order!r}")

    def step(x, s, ds):
        ds = jnp.concatenate([to_d(x, s.sigma, s.denoised)[None], ds[:-1]])  # newest first
        return x + jnp.tensordot(_lms_coeffs(sigmas, s.i, order), ds, axes=1), s.cnt, ds

    return sample_loop(denoiser, x, sigmas, step, jnp.zeros((order,) + x.shape, x.dtype))


# ----------------------------------------------------------------------------------------------
# DPM-Solver++ family (Lu et al. 2022, arXiv 2211.01095), in t = −log σ.


# DPM-Solver++(2S) second-order steps to σ_down (Lu et al. 2022, arXiv 2211.01095, Alg. 1).
sample_dpmpp_2s_ancestral = register_sampler("dpmpp_2s_ancestral", noise="ancestral", a1111="DPM++ 2S a")(
    _ancestral_sampler("dpmpp_2s_ancestral", _dpmpp_2s_down))
sample_dpmpp_2s_ancestral.__doc__ = "Ancestral sampling with DPM-Solver++(2S) second-order steps."


@register_sampler("dpmpp_sde", noise="sde", a1111="DPM++ SDE")
def sample_dpmpp_sde(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                     eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5) -> jax.Array:
    """DPM-Solver++ (stochastic, 2 stages per step; Brownian-tree noise by default)."""
    x, sigmas, ns = setup("dpmpp_sde", x, sigmas, key, noise_sampler, stochastic=not is_zero(eta))
    fac = 1 / (2 * r)

    def step(x, st, state):
        sigma, sigma_next, denoised = st.sigma, st.sigma_next, st.denoised

        def euler(cnt):
            return x + to_d(x, sigma, denoised) * (sigma_next - sigma), cnt

        def dpmpp(cnt):
            t, t_next = _t(sigma), _t(sigma_next)
            h = t_next - t
            s = t + h * r
            sd, su = get_ancestral_step(_sigma(t), _sigma(s), eta)
            s_ = _t(sd)
            x_2 = (_sigma(s_) / _sigma(t)) * x - jnp.expm1(t - s_) * denoised
            if ns is not None:
                x_2 = x_2 + draw(ns, cnt, _sigma(t), _sigma(s), x) * s_noise * su
            denoised_2 = call_denoiser(denoiser, x_2, _sigma(s))
            sd, su = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
            t_next_ = _t(sd)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x_new = (_sigma(t_next_) / _sigma(t)) * x - jnp.expm1(t - t_next_) * denoised_d
            if ns is not None:
                x_new = x_new + draw(ns, cnt + 1, _sigma(t), _sigma(t_next), x) * s_noise * su
                cnt = cnt + 2
            return x_new, cnt

        return *lax.cond(sigma_next > 0, dpmpp, euler, st.cnt), state

    return sample_loop(denoiser, x, sigmas, step)


@register_sampler("dpmpp_2m", a1111="DPM++ 2M")
def sample_dpmpp_2m(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None) -> jax.Array:
    """DPM-Solver++(2M); first order on the first step and on the last step to σ = 0."""
    x, sigmas, _ = setup("dpmpp_2m", x, sigmas)

    def step(x, s, old_denoised):
        sigma, sigma_next, denoised, i = s.sigma, s.sigma_next, s.denoised, s.i

        def first(_):
            return (sigma_next / sigma) * x - jnp.expm1(-(_t(sigma_next) - _t(sigma))) * denoised

        def second(_):
            t, t_next = _t(sigma), _t(sigma_next)
            h = t_next - t
            r = (t - _t(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            return (_sigma(t_next) / _sigma(t)) * x - jnp.expm1(-h) * denoised_d

        return lax.cond((i > 0) & (sigma_next > 0), second, first, None), s.cnt, denoised

    return sample_loop(denoiser, x, sigmas, step, jnp.zeros_like(x))


def _sde_noise(x_new, x, s, ns, h_eta, s_noise):
    """The DPM-Solver++ SDE noise term σ_next·sqrt(1 − e^(−2ηh))·s_noise·z; returns (x, cnt)."""
    if ns is None:
        return x_new, s.cnt
    noise = draw(ns, s.cnt, s.sigma, s.sigma_next, x)
    return x_new + noise * s.sigma_next * jnp.sqrt(-jnp.expm1(-2 * h_eta)) * s_noise, s.cnt + 1


@register_sampler("dpmpp_2m_sde", noise="sde", a1111="DPM++ 2M SDE")
def sample_dpmpp_2m_sde(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                        eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint") -> jax.Array:
    """DPM-Solver++(2M) SDE with the 'midpoint' or 'heun' second-order correction."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"dpmpp_2m_sde: solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    x, sigmas, ns = setup("dpmpp_2m_sde", x, sigmas, key, noise_sampler, stochastic=not is_zero(eta))

    def step(x, s, state):
        old_denoised, h_last = state
        sigma, sigma_next, denoised = s.sigma, s.sigma_next, s.denoised
        h = _t(sigma_next) - _t(sigma)

        def last(_):
            return denoised, s.cnt

        def sde_step(_):
            eta_h = eta * h
            phi = -jnp.expm1(-h - eta_h)
            x_new = sigma_next / sigma * jnp.exp(-eta_h) * x + phi * denoised
            r = h_last / h
            if solver_type == "heun":
                corr = (phi / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
            else:
                corr = 0.5 * phi * (1 / r) * (denoised - old_denoised)
            x_new = jnp.where(s.i > 0, x_new + corr, x_new)
            return _sde_noise(x_new, x, s, ns, eta_h, s_noise)

        x, cnt = lax.cond(sigma_next > 0, sde_step, last, None)
        return x, cnt, (denoised, jnp.where(sigma_next > 0, h, h_last))

    return sample_loop(denoiser, x, sigmas, step, (jnp.zeros_like(x), jnp.ones((), x.dtype)))


@register_sampler("dpmpp_3m_sde", noise="sde", a1111="DPM++ 3M SDE")
def sample_dpmpp_3m_sde(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                        eta: float = 1.0, s_noise: float = 1.0) -> jax.Array:
    """DPM-Solver++(3M) SDE (k-diffusion `sample_dpmpp_3m_sde`)."""
    x, sigmas, ns = setup("dpmpp_3m_sde", x, sigmas, key, noise_sampler, stochastic=not is_zero(eta))

    def step(x, s, state):
        denoised_1, denoised_2, h_1, h_2 = state
        denoised = s.denoised
        h = _t(s.sigma_next) - _t(s.sigma)

        def last(_):
            return denoised, s.cnt

        def sde_step(_):
            h_eta = h * (eta + 1)
            x_new = jnp.exp(-h_eta) * x - jnp.expm1(-h_eta) * denoised
            phi_2 = jnp.expm1(-h_eta) / h_eta + 1
            # third order once two previous steps exist (k-diffusion: h_2 is not None)
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            third = x_new + phi_2 * d1 - phi_3 * d2
            second = x_new + phi_2 * d1_0
            x_new = jnp.where(s.i >= 2, third, jnp.where(s.i == 1, second, x_new))
            return _sde_noise(x_new, x, s, ns, h * eta, s_noise)

        x, cnt = lax.cond(s.sigma_next > 0, sde_step, last, None)
        return x, cnt, (denoised, denoised_1, h, h_1)

    one = jnp.ones((), x.dtype)
    return sample_loop(denoiser, x, sigmas, step, (jnp.zeros_like(x), jnp.zeros_like(x), one, one))


sample_dpmpp_2m_sde_heun = register_variant("dpmpp_2m_sde_heun", "dpmpp_2m_sde", a1111="DPM++ 2M SDE Heun",
                                            solver_type="heun")

__all__ = [
    "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
    "sample_lms", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde", "sample_dpmpp_2m_sde_heun", "sample_dpmpp_3m_sde",
]
