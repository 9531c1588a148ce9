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

from ldm_jax.diffusion.brownian import BrownianTreeNoiseSampler, key_noise_sampler

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------------------------
# Shared pieces.


def _is_zero(v) -> bool:
    """True only for a static zero (a traced option counts as non-zero)."""
    return isinstance(v, (int, float, np.floating, np.integer)) and v == 0


def check_inputs(name: str, x, sigmas, *, needs_noise: bool = False, key=None, noise_sampler=None):
    """Validate before tracing; returns (x, sigmas) in x's dtype (at least float32).

    Value checks on sigmas (finite, non-negative, decreasing, only the last 0) run when sigmas are
    concrete; a traced schedule is only checked for its shape."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: x must be an array, got {type(x).__name__}")
    if x.ndim < 1:
        raise ValueError(f"{name}: x must have a leading batch axis, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: x must be floating point, got {x.dtype}")
    if not hasattr(sigmas, "shape"):
        sigmas = np.asarray(sigmas, dtype=np.float64)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"{name}: sigmas must be a 1-D schedule with at least 2 entries (>= 1 step), "
                         f"got shape {tuple(sigmas.shape)}")
    if not isinstance(sigmas, jax.core.Tracer):
        s = np.asarray(sigmas, dtype=np.float64)
        if not np.all(np.isfinite(s)):
            raise ValueError(f"{name}: sigmas must be finite, got {s}")
        if np.any(s < 0):
            raise ValueError(f"{name}: sigmas must be non-negative, got {s}")
        bad = np.nonzero(np.diff(s) > 0)[0]
        if bad.size:
            raise ValueError(f"{name}: sigmas must be decreasing, but sigmas[{bad[0] + 1}]={s[bad[0] + 1]} > "
                             f"sigmas[{bad[0]}]={s[bad[0]]}")
        if np.any(s[:-1] == 0):
            raise ValueError(f"{name}: only the last sigma may be 0, got {s}")
    if needs_noise and key is None and noise_sampler is None:
        raise ValueError(f"{name} draws noise: pass key= (a jax.random key) or noise_sampler=")
    # half-precision latents are integrated in float32 (σ in bf16 would lose the schedule)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    return jnp.asarray(x, dtype), jnp.asarray(sigmas, dtype)


def call_denoiser(denoiser: Denoiser, x: jax.Array, sigma) -> jax.Array:
    """denoiser(x, sigma·1_B), checking that the result has x's shape (a trace-time error)."""
    s = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],))
    out = denoiser(x, s)
    if out.shape != x.shape:
        raise ValueError(f"denoiser returned shape {tuple(out.shape)}, expected x's shape {tuple(x.shape)}")
    return out.astype(x.dtype)


def default_noise(x, sigmas, key, noise_sampler, brownian: bool = False):
    """The caller's noise sampler, else a Brownian tree (SDE samplers) or i.i.d. draws from `key`."""
    if noise_sampler is not None:
        return noise_sampler
    if brownian:
        positive = jnp.where(sigmas > 0, sigmas, jnp.inf)
        return BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), key)
    return key_noise_sampler(key, x)


def draw(noise_sampler, i, sigma, sigma_next, x) -> jax.Array:
    """One draw, checked against x's shape."""
    n = noise_sampler(i, sigma, sigma_next)
    if n.shape != x.shape:
        raise ValueError(f"noise_sampler returned shape {tuple(n.shape)}, expected {tuple(x.shape)}")
    return n.astype(x.dtype)


def to_d(x, sigma, denoised):
    """Karras ODE derivative (x − D(x, σ)) / σ."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    """(σ_down, σ_up) of an ancestral step; σ_up = min(σ_to, η·sqrt(σ_to²(σ_from² − σ_to²)/σ_from²))."""
    if _is_zero(eta):
        return sigma_to, jnp.zeros_like(sigma_to)
    sigma_up = jnp.minimum(sigma_to, eta * jnp.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2)
                                                    / sigma_from ** 2))
    sigma_down = jnp.sqrt(jnp.maximum(sigma_to ** 2 - sigma_up ** 2, 0))
    return sigma_down, sigma_up


def scan_steps(body, carry, sigmas):
    """lax.scan of body(carry, i) over the len(sigmas) − 1 steps; returns the final carry."""
    carry, _ = lax.scan(lambda c, i: (body(c, i), None), carry, jnp.arange(sigmas.shape[0] - 1))
    return carry


def _churn(x, sigma, n_steps, cnt, ns, sigma_next, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al. 2022 Alg. 2 lines 4-6; k-diffusion 0.1.1 draws randn_like on every step."""
    if _is_zero(s_churn):
        return x, sigma, cnt
    gamma = jnp.where((s_tmin <= sigma) & (sigma <= s_tmax), min(s_churn / n_steps, 2 ** 0.5 - 1), 0.0)
    eps = draw(ns, cnt, sigma, sigma_next, x) * s_noise
    sigma_hat = sigma * (gamma + 1)
    # max(., 0): with FMA contraction σ̂² − σ² is a tiny negative number when γ = 0
    return x + eps * jnp.sqrt(jnp.maximum(sigma_hat ** 2 - sigma ** 2, 0)), sigma_hat, cnt + 1


def _t(sigma):
    return -jnp.log(sigma)


def _sigma(t):
    return jnp.exp(-t)


# ----------------------------------------------------------------------------------------------
# Karras et al. 2022 samplers.


def _churn_sampler(name: str, second_order: str | None):
    def sampler(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                s_noise: float = 1.0) -> jax.Array:
        x, sigmas = check_inputs(name, x, sigmas, needs_noise=not _is_zero(s_churn), key=key,
                                 noise_sampler=noise_sampler)
        ns = default_noise(x, sigmas, key, noise_sampler) if not _is_zero(s_churn) else None
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


def sample_euler_ancestral(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                           eta: float = 1.0, s_noise: float = 1.0) -> jax.Array:
    """Ancestral sampling with Euler steps (k-diffusion `sample_euler_ancestral`)."""
    stochastic = not _is_zero(eta)
    x, sigmas = check_inputs("euler_ancestral", x, sigmas, needs_noise=stochastic, key=key,
                             noise_sampler=noise_sampler)
    ns = default_noise(x, sigmas, key, noise_sampler) if stochastic else None

    def body(carry, i):
        x, cnt = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        if not stochastic:
            return x, cnt
        add = lax.cond(sigma_next > 0, lambda: draw(ns, cnt, sigma, sigma_next, x) * s_noise * sigma_up,
                       lambda: jnp.zeros_like(x))
        return x + add, cnt + (sigma_next > 0)

    return scan_steps(body, (x, jnp.int32(0)), sigmas)[0]


def sample_dpm_2_ancestral(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                           eta: float = 1.0, s_noise: float = 1.0) -> jax.Array:
    """Ancestral sampling with DPM-Solver-2 steps (k-diffusion `sample_dpm_2_ancestral`)."""
    stochastic = not _is_zero(eta)
    x, sigmas = check_inputs("dpm_2_ancestral", x, sigmas, needs_noise=stochastic, key=key,
                             noise_sampler=noise_sampler)
    ns = default_noise(x, sigmas, key, noise_sampler) if stochastic else None

    def body(carry, i):
        x, cnt = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        d = to_d(x, sigma, denoised)

        def euler(cnt):
            return x + d * (sigma_down - sigma), cnt

        def dpm_2(cnt):
            sigma_mid = jnp.exp(jnp.log(sigma) + 0.5 * (jnp.log(sigma_down) - jnp.log(sigma)))
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = to_d(x_2, sigma_mid, call_denoiser(denoiser, x_2, sigma_mid))
            x_new = x + d_2 * (sigma_down - sigma)
            if not stochastic:
                return x_new, cnt
            return x_new + draw(ns, cnt, sigma, sigma_next, x) * s_noise * sigma_up, cnt + 1

        return lax.cond(sigma_down > 0, dpm_2, euler, cnt)

    return scan_steps(body, (x, jnp.int32(0)), sigmas)[0]


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


def sample_lms(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
               order: int = 4) -> jax.Array:
    """Linear multistep (Adams–Bashforth in σ) of the given order (k-diffusion `sample_lms`)."""
    x, sigmas = check_inputs("lms", x, sigmas)
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"lms: order must be an int >= 1, got {order!r}")

    def body(carry, i):
        x, ds = carry
        d = to_d(x, sigmas[i], call_denoiser(denoiser, x, sigmas[i]))
        ds = jnp.concatenate([d[None], ds[:-1]])  # newest first
        coeffs = _lms_coeffs(sigmas, i, order)
        return x + jnp.tensordot(coeffs, ds, axes=1), ds

    return scan_steps(body, (x, jnp.zeros((order,) + x.shape, x.dtype)), sigmas)[0]


# ----------------------------------------------------------------------------------------------
# DPM-Solver++ family (Lu et al. 2022, arXiv 2211.01095), in t = −log σ.


def sample_dpmpp_2s_ancestral(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                              eta: float = 1.0, s_noise: float = 1.0) -> jax.Array:
    """Ancestral sampling with DPM-Solver++(2S) second-order steps."""
    stochastic = not _is_zero(eta)
    x, sigmas = check_inputs("dpmpp_2s_ancestral", x, sigmas, needs_noise=stochastic, key=key,
                             noise_sampler=noise_sampler)
    ns = default_noise(x, sigmas, key, noise_sampler) if stochastic else None

    def body(carry, i):
        x, cnt = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)

        def euler(_):
            return x + to_d(x, sigma, denoised) * (sigma_down - sigma)

        def dpmpp_2s(_):
            t, t_next = _t(sigma), _t(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (_sigma(s) / _sigma(t)) * x - jnp.expm1(-0.5 * h) * denoised
            denoised_2 = call_denoiser(denoiser, x_2, _sigma(s))
            return (_sigma(t_next) / _sigma(t)) * x - jnp.expm1(-h) * denoised_2

        x = lax.cond(sigma_down > 0, dpmpp_2s, euler, None)
        if not stochastic:
            return x, cnt
        add = lax.cond(sigma_next > 0, lambda: draw(ns, cnt, sigma, sigma_next, x) * s_noise * sigma_up,
                       lambda: jnp.zeros_like(x))
        return x + add, cnt + (sigma_next > 0)

    return scan_steps(body, (x, jnp.int32(0)), sigmas)[0]


def sample_dpmpp_sde(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                     eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5) -> jax.Array:
    """DPM-Solver++ (stochastic, 2 stages per step; Brownian-tree noise by default)."""
    stochastic = not _is_zero(eta)
    x, sigmas = check_inputs("dpmpp_sde", x, sigmas, needs_noise=stochastic, key=key,
                             noise_sampler=noise_sampler)
    ns = default_noise(x, sigmas, key, noise_sampler, brownian=True) if stochastic else None
    fac = 1 / (2 * r)

    def body(carry, i):
        x, cnt = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x, sigma)

        def euler(cnt):
            return x + to_d(x, sigma, denoised) * (sigma_next - sigma), cnt

        def dpmpp(cnt):
            t, t_next = _t(sigma), _t(sigma_next)
            h = t_next - t
            s = t + h * r
            sd, su = get_ancestral_step(_sigma(t), _sigma(s), eta)
            s_ = _t(sd)
            x_2 = (_sigma(s_) / _sigma(t)) * x - jnp.expm1(t - s_) * denoised
            if stochastic:
                x_2 = x_2 + draw(ns, cnt, _sigma(t), _sigma(s), x) * s_noise * su
            denoised_2 = call_denoiser(denoiser, x_2, _sigma(s))
            sd, su = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
            t_next_ = _t(sd)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x_new = (_sigma(t_next_) / _sigma(t)) * x - jnp.expm1(t - t_next_) * denoised_d
            if stochastic:
                x_new = x_new + draw(ns, cnt + 1, _sigma(t), _sigma(t_next), x) * s_noise * su
                cnt = cnt + 2
            return x_new, cnt

        return lax.cond(sigma_next > 0, dpmpp, euler, cnt)

    return scan_steps(body, (x, jnp.int32(0)), sigmas)[0]


def sample_dpmpp_2m(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None) -> jax.Array:
    """DPM-Solver++(2M); first order on the first step and on the last step to σ = 0."""
    x, sigmas = check_inputs("dpmpp_2m", x, sigmas)

    def body(carry, i):
        x, old_denoised = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x, sigma)

        def first(_):
            return (sigma_next / sigma) * x - jnp.expm1(-(_t(sigma_next) - _t(sigma))) * denoised

        def second(_):
            t, t_next = _t(sigma), _t(sigma_next)
            h = t_next - t
            r = (t - _t(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            return (_sigma(t_next) / _sigma(t)) * x - jnp.expm1(-h) * denoised_d

        x = lax.cond((i > 0) & (sigma_next > 0), second, first, None)
        return x, denoised

    return scan_steps(body, (x, jnp.zeros_like(x)), sigmas)[0]


def sample_dpmpp_2m_sde(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                        eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint") -> jax.Array:
    """DPM-Solver++(2M) SDE with the 'midpoint' or 'heun' second-order correction."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"dpmpp_2m_sde: solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    stochastic = not _is_zero(eta)
    x, sigmas = check_inputs("dpmpp_2m_sde", x, sigmas, needs_noise=stochastic, key=key,
                             noise_sampler=noise_sampler)
    ns = default_noise(x, sigmas, key, noise_sampler, brownian=True) if stochastic else None

    def body(carry, i):
        x, old_denoised, h_last, cnt = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x, sigma)
        h = _t(sigma_next) - _t(sigma)

        def last(cnt):
            return denoised, cnt

        def step(cnt):
            eta_h = eta * h
            phi = -jnp.expm1(-h - eta_h)
            x_new = sigma_next / sigma * jnp.exp(-eta_h) * x + phi * denoised
            r = h_last / h
            if solver_type == "heun":
                corr = (phi / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
            else:
                corr = 0.5 * phi * (1 / r) * (denoised - old_denoised)
            x_new = jnp.where(i > 0, x_new + corr, x_new)
            if stochastic:
                noise = draw(ns, cnt, sigma, sigma_next, x)
                x_new = x_new + noise * sigma_next * jnp.sqrt(-jnp.expm1(-2 * eta_h)) * s_noise
                cnt = cnt + 1
            return x_new, cnt

        x, cnt = lax.cond(sigma_next > 0, step, last, cnt)
        return x, denoised, jnp.where(sigma_next > 0, h, h_last), cnt

    init = (x, jnp.zeros_like(x), jnp.ones((), x.dtype), jnp.int32(0))
    return scan_steps(body, init, sigmas)[0]


def sample_dpmpp_3m_sde(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                        eta: float = 1.0, s_noise: float = 1.0) -> jax.Array:
    """DPM-Solver++(3M) SDE (k-diffusion `sample_dpmpp_3m_sde`)."""
    stochastic = not _is_zero(eta)
    x, sigmas = check_inputs("dpmpp_3m_sde", x, sigmas, needs_noise=stochastic, key=key,
                             noise_sampler=noise_sampler)
    ns = default_noise(x, sigmas, key, noise_sampler, brownian=True) if stochastic else None

    def body(carry, i):
        x, denoised_1, denoised_2, h_1, h_2, cnt = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x, sigma)
        h = _t(sigma_next) - _t(sigma)

        def last(cnt):
            return denoised, cnt

        def step(cnt):
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
            x_new = jnp.where(i >= 2, third, jnp.where(i == 1, second, x_new))
            if stochastic:
                noise = draw(ns, cnt, sigma, sigma_next, x)
                x_new = x_new + noise * sigma_next * jnp.sqrt(-jnp.expm1(-2 * h * eta)) * s_noise
                cnt = cnt + 1
            return x_new, cnt

        x, cnt = lax.cond(sigma_next > 0, step, last, cnt)
        return x, denoised, denoised_1, h, h_1, cnt

    one = jnp.ones((), x.dtype)
    init = (x, jnp.zeros_like(x), jnp.zeros_like(x), one, one, jnp.int32(0))
    return scan_steps(body, init, sigmas)[0]


__all__ = [
    "Denoiser", "check_inputs", "call_denoiser", "default_noise", "to_d", "get_ancestral_step",
    "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
    "sample_lms", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde",
]
