"""SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion
Models", arXiv 2309.05019) in data prediction, with ComfyUI's defaults and step rules, as one
`lax.scan`.

Each step evaluates D at the predicted state, corrects the current state with a stochastic Adams-
Moulton step over the last `corrector_order` predictions (PECE: and re-evaluates D there), then
predicts the next state with a stochastic Adams-Bashforth step over the last `predictor_order`.
In λ = −log σ with stochasticity τ(σ):

    x_t = (σ_t/σ_s)·e^{−τ²h}·x_s + Σ_j b_j·D_j,   b_j = ∫_{λ_s}^{λ_t} (1+τ²) e^{(1+τ²)(λ−λ_t)} ℓ_j(λ) dλ

(ℓ_j the Lagrange basis on the nodes' λ) plus σ_t·sqrt(1 − e^{−2τ²h})·ε. Orders are traced, so the
coefficients solve a fixed-size system with the unused rows masked out.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from ldm_jax.diffusion.denoisers import inner_discrete
from ldm_jax.diffusion.registry import register_sampler
from ldm_jax.diffusion.sampler_core import Denoiser, call_denoiser, draw, scan_steps, setup, t_of
from ldm_jax.diffusion.samplers_comfy import positive


def _moments(h, tau_mul, n: int):
    """m_p = τ_m ∫_{−h}^{0} e^{τ_m u} u^p du for p < n (integration by parts, τ_m = 1 + τ²)."""
    m = [-jnp.expm1(-tau_mul * h)]
    for p in range(1, n):
        m.append(-((-h) ** p) * jnp.exp(-tau_mul * h) - p / tau_mul * m[-1])
    return jnp.stack(m)


def adams_coeffs(nodes, k, lam_s, lam_t, tau, simple_order_2: bool, corrector: bool):
    """Weights of the predictions at λ-nodes (newest first, the first `k` used) for one step
    λ_s → λ_t; zeros beyond k. `simple_order_2`: the paper's simplified 2-point weights (App. D)."""
    n = nodes.shape[0]
    tau_mul = 1 + tau ** 2
    h = lam_t - lam_s
    u = nodes - lam_t
    p = jnp.arange(n)
    used = p < k
    vander = jnp.where(used[:, None] & used[None, :], u[None, :] ** p[:, None], jnp.eye(n, dtype=nodes.dtype))
    rhs = jnp.where(used, _moments(h, tau_mul, n), 0.0)
    b = jnp.linalg.solve(vander, rhs)
    if not simple_order_2:
        return b
    total = -jnp.expm1(-h * tau_mul)
    if corrector:
        newest = 0.5 * tau_mul * h
        simple = jnp.stack([newest, total - newest])
    else:
        older = 0.5 * tau_mul * h ** 2 / (nodes[1] - lam_s)
        simple = jnp.stack([total - older, older])
    simple = jnp.concatenate([simple, jnp.zeros((n - 2,), nodes.dtype)])
    return jnp.where(k == 2, simple, b)


def interval_tau(start_sigma, end_sigma, eta: float = 1.0) -> Callable:
    """τ(σ) = η on start_sigma ≥ σ ≥ end_sigma, else 0 (ComfyUI's `get_tau_interval_func`)."""
    def tau(sigma):
        if not positive(eta):
            return jnp.zeros_like(sigma)
        return jnp.where((start_sigma >= sigma) & (sigma >= end_sigma), eta, 0.0).astype(sigma.dtype)
    return tau


def _default_interval(denoiser, name: str):
    inner = inner_discrete(denoiser)
    if inner is None:
        raise ValueError(f"{name}: the stochastic interval comes from the model's noise levels (ComfyUI: "
                         f"percent 0.2 to 0.8); this denoiser has none, so pass tau_interval=(sigma_start, "
                         f"sigma_end) or tau_func=")
    return inner.percent_to_sigma(0.2), inner.percent_to_sigma(0.8)


@register_sampler("sa_solver", noise="ancestral")
def sample_sa_solver(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                     tau_func: Callable | None = None, tau_interval=None, eta: float = 1.0,
                     s_noise: float = 1.0, predictor_order: int = 3, corrector_order: int = 4,
                     use_pece: bool = False, simple_order_2: bool = False) -> jax.Array:
    """SA-Solver predictor-corrector (ComfyUI `sa_solver`). τ(σ) is `tau_func`, else η on the
    interval `tau_interval` = (σ_start, σ_end), else on the denoiser's percent 0.2..0.8."""
    name = "sa_solver_pece" if use_pece else "sa_solver"
    for opt, v, lo in (("predictor_order", predictor_order, 1), ("corrector_order", corrector_order, 0)):
        if not isinstance(v, int) or not lo <= v <= 6:
            raise ValueError(f"{name}: {opt} must be an int in [{lo}, 6], got {v!r}")
    stochastic = positive(s_noise) and (tau_func is not None or positive(eta))
    x, sigmas, ns = setup(name, x, sigmas, key, noise_sampler, stochastic=stochastic)
    if tau_func is None:
        start, end = _default_interval(denoiser, name) if tau_interval is None else tau_interval
        tau_func = interval_tau(start, end, eta)
    n = sigmas.shape[0] - 1
    m = max(predictor_order, corrector_order)
    lambdas = t_of(jnp.where(sigmas > 0, sigmas, 1.0))  # λ of σ = 0 is never used
    lower_to_end = sigmas[-1] == 0

    def nodes_at(i):
        return lambdas[jnp.maximum(i - jnp.arange(m), 0)]

    def body(carry, i):
        x, x_pred, preds, tau_prev, h_prev, noise_prev, cnt = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x_pred, sigma)
        preds = jnp.concatenate([denoised[None], preds[:-1]])  # newest first
        have = jnp.minimum(i + 1, m)
        p_used = jnp.minimum(predictor_order, have)
        c_used = jnp.minimum(corrector_order, have)
        c_used = jnp.where((i == 0) | ((sigma_next == 0) & (not use_pece)), 0, c_used)
        p_used = jnp.where(lower_to_end, jnp.minimum(p_used, n - 1 - i), p_used)
        c_used = jnp.where(lower_to_end, jnp.minimum(c_used, n - i), c_used)

        def correct(_):
            b = adams_coeffs(nodes_at(i), c_used, lambdas[i - 1], lambdas[i], tau_prev, simple_order_2, True)
            x_c = sigma / sigmas[i - 1] * jnp.exp(-(tau_prev ** 2) * h_prev) * x + jnp.tensordot(b, preds, axes=1)
            if stochastic:
                x_c = x_c + jnp.where(tau_prev > 0, noise_prev, 0.0)
            if not use_pece:
                return x_c, preds
            return x_c, preds.at[0].set(call_denoiser(denoiser, x_c, sigma))

        x, preds = lax.cond(c_used > 0, correct, lambda _: (x_pred, preds), None)

        def predict(cnt):
            tau = tau_func(sigma_next)
            h = lambdas[i + 1] - lambdas[i]
            b = adams_coeffs(nodes_at(i), p_used, lambdas[i], lambdas[i + 1], tau, simple_order_2, False)
            x_p = sigma_next / sigma * jnp.exp(-(tau ** 2) * h) * x + jnp.tensordot(b, preds, axes=1)
            if not stochastic:
                return x_p, tau, h, noise_prev, cnt
            scale = sigma_next * jnp.sqrt(-jnp.expm1(-2 * tau ** 2 * h)) * s_noise
            noise = lax.cond(tau > 0, lambda: draw(ns, cnt, sigma, sigma_next, x) * scale, lambda: noise_prev)
            return x_p + jnp.where(tau > 0, noise, 0.0), tau, h, noise, cnt + (tau > 0)

        def last(cnt):
            return preds[0], tau_prev, h_prev, noise_prev, cnt

        x_pred, tau_prev, h_prev, noise_prev, cnt = lax.cond(sigma_next > 0, predict, last, cnt)
        return x, x_pred, preds, tau_prev, h_prev, noise_prev, cnt

    zero = jnp.zeros((), x.dtype)
    init = (x, x, jnp.zeros((m,) + x.shape, x.dtype), zero, zero, jnp.zeros_like(x), jnp.int32(0))
    return scan_steps(body, init, sigmas)[1]


@register_sampler("sa_solver_pece", noise="ancestral")
def sample_sa_solver_pece(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                          **options) -> jax.Array:
    """SA-Solver in PECE mode (ComfyUI `sa_solver_pece`): D is re-evaluated after each correction."""
    if "use_pece" in options:
        raise TypeError("sa_solver_pece: use_pece is fixed to True; use sa_solver for the PEC mode")
    return sample_sa_solver(denoiser, x, sigmas, key=key, noise_sampler=noise_sampler, use_pece=True, **options)


__all__ = ["sample_sa_solver", "sample_sa_solver_pece", "adams_coeffs", "interval_tau"]
