"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models", arXiv 2302.04867) as one `lax.scan`, step for step as diffusers'
`UniPCMultistepScheduler` (data prediction, `lower_order_final`), in k-diffusion's σ space.

With λ = −log σ, h = λ_{i+1} − λ_i and the data predictions m_k = D(x_k, σ_k), the UniP-p predictor
x_{i+1} = (σ_{i+1}/σ_i)·x_i − (e^{−h} − 1)·m_i − B(h)·Σ_k ρ_k·(m_{i−k} − m_i)/r_k and the UniC
corrector (the same with the new m_{i+1}, no extra denoiser call) use B(h) = −h ("bh1") or
e^{−h} − 1 ("bh2"); ρ solves the order conditions R·ρ = b (eq. 8 of the paper; ρ = 1/2 at the
lowest order as diffusers). The corrector runs at every step but the first unless
`disable_corrector` lists the index of the predictor step it would correct (diffusers' option).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ldm_jax.diffusion.registry import register_sampler
from ldm_jax.diffusion.sampler_core import Denoiser, sample_loop, setup, t_of


def _coefficients(hh, rks, order: int, variant: str):
    """(R, b, B(h), h·φ₁) of UniPC's linear system for `order`, as diffusers builds them."""
    h_phi_1 = jnp.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else jnp.expm1(hh)
    rows, b, fact = [], [], 1
    for i in range(1, order + 1):
        rows.append(rks ** (i - 1))
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return jnp.stack(rows), jnp.stack(b), b_h, h_phi_1


def _history(lams, lam0, h, ms, m0, k_max: int):
    """r_k = (λ_{s−k} − λ_s)/h and D1_k = (m_{s−k} − m_s)/r_k for k = 1..k_max (newest first)."""
    rks = [(lams[k] - lam0) / h for k in range(k_max)]
    return rks, [(ms[k] - m0) / r for k, r in enumerate(rks)]


def _predict(x, sigma, sigma_next, m0, lams, ms, order: int, variant: str):
    lam0, lam1 = t_of(sigma), t_of(sigma_next)
    h = lam1 - lam0
    rks, d1s = _history(lams, lam0, h, ms, m0, order - 1)
    R, b, b_h, h_phi_1 = _coefficients(-h, jnp.stack(rks + [jnp.ones_like(h)]), order, variant)
    x_t = sigma_next / sigma * x - h_phi_1 * m0
    if order == 1:
        return x_t
    rhos = jnp.full((1,), 0.5, x.dtype) if order == 2 else jnp.linalg.solve(R[:-1, :-1], b[:-1])
    return x_t - b_h * sum(r * d for r, d in zip(rhos, d1s))


def _correct(x_last, sigma_prev, sigma, m_prev, m_t, lams, ms, order: int, variant: str):
    lam0, lam1 = t_of(sigma_prev), t_of(sigma)
    h = lam1 - lam0
    rks, d1s = _history(lams, lam0, h, ms, m_prev, order - 1)
    R, b, b_h, h_phi_1 = _coefficients(-h, jnp.stack(rks + [jnp.ones_like(h)]), order, variant)
    rhos = jnp.full((1,), 0.5, x_last.dtype) if order == 1 else jnp.linalg.solve(R, b)
    corr = sum(r * d for r, d in zip(rhos[:-1], d1s)) + rhos[-1] * (m_t - m_prev)
    return sigma / sigma_prev * x_last - h_phi_1 * m_prev - b_h * corr


def _unipc(name: str, variant: str, denoiser: Denoiser, x, sigmas, order: int, disable_corrector) -> jax.Array:
    if not isinstance(order, int) or not 1 <= order <= 3:
        raise ValueError(f"{name}: order must be 1, 2 or 3, got {order!r}")
    x, sigmas, _ = setup(name, x, sigmas)
    n = sigmas.shape[0] - 1
    bad = [j for j in disable_corrector if not isinstance(j, int) or not 0 <= j < n]
    if bad:
        raise ValueError(f"{name}: disable_corrector holds predictor step indices 0..{n - 1}, got {bad}")
    corrector_off = jnp.zeros((n + 1,), bool).at[jnp.asarray(list(disable_corrector), jnp.int32)].set(True) \
        if len(disable_corrector) else jnp.zeros((n + 1,), bool)
    k = order  # history slots: m_{i-1}.. and the matching λ, newest first

    def step(x, s, state):
        ms, lams, x_last, prev_order = state
        i, m = s.i, s.denoised

        # UniC: correct x_i (predicted from x_last at step i − 1) with the new m_i
        def corrector(o):
            return lambda: _correct(x_last, sigmas[i - 1], s.sigma, ms[0], m, lams[1:], ms[1:], o, variant)

        use_c = (i > 0) & ~corrector_off[jnp.maximum(i - 1, 0)]
        x = lax.cond(use_c, lambda: lax.switch(prev_order - 1, [corrector(o) for o in range(1, k + 1)]), lambda: x)
        ms = jnp.concatenate([m[None], ms[:-1]])
        lams = jnp.concatenate([t_of(s.sigma)[None], lams[:-1]])
        this_order = jnp.minimum(jnp.minimum(order, n - i), i + 1).astype(jnp.int32)

        def predictor(o):
            return lambda: _predict(x, s.sigma, s.sigma_next, m, lams[1:], ms[1:], o, variant)

        x_new = lax.switch(this_order - 1, [predictor(o) for o in range(1, k + 1)])
        return x_new, s.cnt, (ms, lams, x, this_order)

    init = (jnp.zeros((k,) + x.shape, x.dtype), jnp.zeros((k,), x.dtype), x, jnp.int32(1))
    return sample_loop(denoiser, x, sigmas, step, init)


@register_sampler("uni_pc", a1111="UniPC")
def sample_uni_pc(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None, order: int = 3,
                  disable_corrector: tuple[int, ...] = ()) -> jax.Array:
    """UniPC with B(h) = h ("bh1"), `order` 1–3 (ComfyUI's 3; diffusers' default is 2)."""
    return _unipc("uni_pc", "bh1", denoiser, x, sigmas, order, disable_corrector)


@register_sampler("uni_pc_bh2")
def sample_uni_pc_bh2(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None, order: int = 3,
                      disable_corrector: tuple[int, ...] = ()) -> jax.Array:
    """UniPC with B(h) = e^h − 1 ("bh2", recommended for guided sampling), `order` 1–3."""
    return _unipc("uni_pc_bh2", "bh2", denoiser, x, sigmas, order, disable_corrector)


__all__ = ["sample_uni_pc", "sample_uni_pc_bh2"]
