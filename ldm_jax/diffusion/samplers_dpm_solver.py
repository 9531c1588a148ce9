"""DPM-Solver fast (fixed orders) and adaptive (PID step size) samplers (Lu et al. 2022,
arXiv 2206.00927), as k-diffusion 0.1.1's `DPMSolver`.

k-diffusion calls them with (sigma_min, sigma_max, n); here they take the common `sigmas` argument
like the popular front ends: sigma_max = sigmas[0], sigma_min = the last non-zero sigma and, for
dpm_fast, n = len(sigmas) − 1 denoiser evaluations.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ldm_jax.diffusion.registry import register_sampler
from ldm_jax.diffusion.sampler_core import Denoiser, call_denoiser, draw, get_ancestral_step, is_zero, setup
from ldm_jax.diffusion.sampler_core import sigma_of as _sigma
from ldm_jax.diffusion.sampler_core import t_of as _t


def _range(sigmas):
    sigma_min = jnp.where(sigmas[-1] > 0, sigmas[-1], sigmas[-2])
    return _t(sigmas[0]), _t(sigma_min)


class _Solver:
    """The eps-form DPM-Solver-1/2/3 updates (DPM-Solver paper Alg. 1, 4, 5)."""

    def __init__(self, denoiser, x):
        self.denoiser = denoiser

    def eps(self, x, t):
        return (x - call_denoiser(self.denoiser, x, _sigma(t))) / _sigma(t)

    @staticmethod
    def step_1(x, t, t_next, eps):
        return x - _sigma(t_next) * jnp.expm1(t_next - t) * eps

    @staticmethod
    def u1(x, t, t_next, eps, r1):
        h = t_next - t
        return x - _sigma(t + r1 * h) * jnp.expm1(r1 * h) * eps, t + r1 * h

    @staticmethod
    def step_2(x, t, t_next, eps, eps_r1, r1):
        h = t_next - t
        return (x - _sigma(t_next) * jnp.expm1(h) * eps
                - _sigma(t_next) / (2 * r1) * jnp.expm1(h) * (eps_r1 - eps))

    @staticmethod
    def u2(x, t, t_next, eps, eps_r1, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        s2 = t + r2 * h
        return (x - _sigma(s2) * jnp.expm1(r2 * h) * eps
                - _sigma(s2) * (r2 / r1) * (jnp.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps)), s2

    @staticmethod
    def step_3(x, t, t_next, eps, eps_r2, r2=2 / 3):
        h = t_next - t
        return (x - _sigma(t_next) * jnp.expm1(h) * eps
                - _sigma(t_next) / r2 * (jnp.expm1(h) / h - 1) * (eps_r2 - eps))


def _ancestral_target(t, t_next, t_end, eta, stochastic: bool):
    """(t of σ_down capped at t_end, σ_up) of an ancestral step from t to t_next (k-diffusion DPMSolver)."""
    if not stochastic:
        return t_next, None
    sd, _ = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
    t_next_ = jnp.minimum(t_end, _t(sd))
    return t_next_, jnp.sqrt(jnp.maximum(_sigma(t_next) ** 2 - _sigma(t_next_) ** 2, 0))


def dpm_fast_orders(nfe: int) -> list[int]:
    """k-diffusion's static order plan: floor(nfe/3)+1 steps of order 3 ending with 2,1 or nfe%3."""
    m = nfe // 3 + 1
    return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


@register_sampler("dpm_fast", a1111="DPM fast")
def sample_dpm_fast(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                    eta: float = 0.0, s_noise: float = 1.0) -> jax.Array:
    """DPM-Solver-Fast: fixed steps uniform in log σ with orders 3,…,3,(2,1 | nfe%3)."""
    stochastic = not is_zero(eta)
    x, sigmas, ns = setup("dpm_fast", x, sigmas, key, noise_sampler, stochastic=stochastic)
    orders = dpm_fast_orders(sigmas.shape[0] - 1)
    t_start, t_end = _range(sigmas)
    ts = jnp.linspace(t_start, t_end, len(orders) + 1)
    solver = _Solver(denoiser, x)

    def body(x, inputs):
        i, order = inputs
        t, t_next = ts[i], ts[i + 1]
        t_next_, su = _ancestral_target(t, t_next, t_end, eta, stochastic)
        eps = solver.eps(x, t)
        r1 = jnp.where(order == 3, 1 / 3, 1 / 2).astype(x.dtype)
        u1, s1 = solver.u1(x, t, t_next_, eps, r1)
        eps_r1 = lax.cond(order >= 2, lambda: solver.eps(u1, s1), lambda: eps)
        u2, s2 = solver.u2(x, t, t_next_, eps, eps_r1)
        eps_r2 = lax.cond(order == 3, lambda: solver.eps(u2, s2), lambda: eps)
        x_new = jnp.where(order == 1, solver.step_1(x, t, t_next_, eps),
                          jnp.where(order == 2, solver.step_2(x, t, t_next_, eps, eps_r1, r1),
                                    solver.step_3(x, t, t_next_, eps, eps_r2)))
        if stochastic:
            x_new = x_new + su * s_noise * draw(ns, i, _sigma(t), _sigma(t_next), x)
        return x_new, None

    steps = (jnp.arange(len(orders)), jnp.asarray(orders, jnp.int32))
    return lax.scan(body, x, steps)[0]


@register_sampler("dpm_adaptive", a1111="DPM adaptive")
def sample_dpm_adaptive(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                        order: int = 3, rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                        pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0,
                        accept_safety: float = 0.81, eta: float = 0.0, s_noise: float = 1.0,
                        return_info: bool = False, max_steps: int | None = None):
    """DPM-Solver-12/23 with PID step-size control (Söderlind 2003), one `lax.while_loop`.

    With `return_info`, also returns k-diffusion's info dict (steps, nfe, n_accept, n_reject).
    `max_steps` (an addition) bounds the number of attempted steps; None = unbounded as k-diffusion.
    """
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive: order should be 2 or 3, got {order!r}")
    stochastic = not is_zero(eta)
    x, sigmas, ns = setup("dpm_adaptive", x, sigmas, key, noise_sampler, stochastic=stochastic)
    t_start, t_end = _range(sigmas)
    solver = _Solver(denoiser, x)
    pid_order = 1.5 if stochastic else order
    b1 = (pcoeff + icoeff + dcoeff) / pid_order
    b2 = -(pcoeff + 2 * dcoeff) / pid_order
    b3 = dcoeff / pid_order
    dtype = x.dtype

    def cond(state):
        s, steps = state["s"], state["steps"]
        go = s < t_end - 1e-5
        return go if max_steps is None else go & (steps < max_steps)

    def body(state):
        s, x, x_prev, h = state["s"], state["x"], state["x_prev"], state["h"]
        t = jnp.minimum(t_end, s + h)
        t_, su = _ancestral_target(s, t, t_end, eta, stochastic)
        eps = solver.eps(x, s)
        if order == 2:
            u1, s1 = solver.u1(x, s, t_, eps, 0.5)
            eps_r1 = solver.eps(u1, s1)
            x_low = solver.step_1(x, s, t_, eps)
            x_high = solver.step_2(x, s, t_, eps, eps_r1, 0.5)
        else:
            u1, s1 = solver.u1(x, s, t_, eps, 1 / 3)
            eps_r1 = solver.eps(u1, s1)
            u2, s2 = solver.u2(x, s, t_, eps, eps_r1)
            eps_r2 = solver.eps(u2, s2)
            x_low = solver.step_2(x, s, t_, eps, eps_r1, 1 / 3)
            x_high = solver.step_3(x, s, t_, eps, eps_r2)
        delta = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_low), jnp.abs(x_prev)))
        error = jnp.sqrt(jnp.sum(((x_low - x_high) / delta) ** 2)) / (x.size ** 0.5)
        # PIDStepSizeController.propose_step
        inv_error = 1 / (error + 1e-8)
        errs = jnp.where(state["steps"] == 0, jnp.full((3,), inv_error), state["errs"]).at[0].set(inv_error)
        factor = errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3
        factor = 1 + jnp.arctan(factor - 1)
        accept = factor >= accept_safety
        errs = jnp.where(accept, jnp.stack([errs[0], errs[0], errs[1]]), errs)
        x_new = x_high
        if stochastic:
            cnt = state["n_accept"]
            x_new = x_new + lax.cond(accept, lambda: su * s_noise * draw(ns, cnt, _sigma(s), _sigma(t), x),
                                     lambda: jnp.zeros_like(x))
        return dict(
            s=jnp.where(accept, t, s), x=jnp.where(accept, x_new, x), x_prev=jnp.where(accept, x_low, x_prev),
            h=h * factor, errs=errs, steps=state["steps"] + 1,
            n_accept=state["n_accept"] + accept, n_reject=state["n_reject"] + (~accept))

    init = dict(s=t_start, x=x, x_prev=x, h=jnp.asarray(abs(h_init), dtype), errs=jnp.ones((3,), dtype),
                steps=jnp.int32(0), n_accept=jnp.int32(0), n_reject=jnp.int32(0))
    out = lax.while_loop(cond, body, init)
    if return_info:
        info = {"steps": out["steps"], "nfe": out["steps"] * order, "n_accept": out["n_accept"],
                "n_reject": out["n_reject"]}
        return out["x"], info
    return out["x"]


__all__ = ["sample_dpm_fast", "sample_dpm_adaptive", "dpm_fast_orders"]
