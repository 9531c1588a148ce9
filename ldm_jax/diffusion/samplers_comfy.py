"""ComfyUI's own samplers (comfy/k_diffusion/sampling.py, not in k-diffusion) as single XLA programs.

Same contract as `ldm_jax.diffusion.samplers`: `sample_<name>(denoiser, x, sigmas, *, key=None,
noise_sampler=None, **options)` with ComfyUI's option names and defaults, one `lax.scan` whose
value-dependent branches (the last step to σ = 0, the first steps of a multistep method) are
`lax.cond`/`lax.switch`, so `sigmas` may be traced and the number of denoiser calls is ComfyUI's.
Each Gaussian draw goes through `noise_sampler(i, sigma, sigma_next)` in ComfyUI's order; draws
that ComfyUI multiplies by a static zero (η = 0, s_churn = 0) are not taken.

All of them work in k-diffusion's σ space (x = x0 + σ·ε, α = 1), where ComfyUI's half-log-SNR is
λ = −log σ. `res_multistep` and `gradient_estimation` step with `predictor(...)(x, σ) -> (D, D_u)`,
so their CFG++ variants (`samplers_cfgpp`) are the same code fed the unguided prediction D_u.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from ldm_jax.diffusion.denoisers import has_uncond
from ldm_jax.diffusion.registry import register_sampler
from ldm_jax.diffusion.sampler_core import (Denoiser, add_noise, call_denoiser, draw, get_ancestral_step, is_zero,
                                            scan_steps, setup, sigma_of, t_of, to_d)
from ldm_jax.diffusion.samplers import _churn

Predict = Callable[[jax.Array, jax.Array], tuple]


def positive(v) -> bool:
    """ComfyUI's `v > 0` test on an option; a traced option counts as positive."""
    return not isinstance(v, (int, float)) or v > 0


def predictor(name: str, denoiser, cfg_pp: bool) -> Predict:
    """predict(x, σ) -> (D, D_u). Outside CFG++ D stands in for D_u; CFG++ takes both from
    `denoiser.with_uncond` (one batched call) and rejects any other denoiser with a clear error."""
    if not cfg_pp:
        def plain(x, sigma):
            d = call_denoiser(denoiser, x, sigma)
            return d, d
        return plain
    if not has_uncond(denoiser):
        raise TypeError(f"{name} is a CFG++ sampler and needs the unguided prediction: pass a denoiser with "
                        f"with_uncond(x, sigma) -> (guided, unguided), e.g. denoisers.CFGDenoiser "
                        f"(got {type(denoiser).__name__}); for an unguided model use the sampler without '_cfg_pp'")

    def guided_and_uncond(x, sigma):
        s = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],))
        guided, uncond = denoiser.with_uncond(x, s)
        for what, v in (("guided", guided), ("unguided", uncond)):
            if v.shape != x.shape:
                raise ValueError(f"with_uncond returned a {what} prediction of shape {tuple(v.shape)}, "
                                 f"expected x's shape {tuple(x.shape)}")
        return guided.astype(x.dtype), uncond.astype(x.dtype)

    return guided_and_uncond


# ----------------------------------------------------------------------------------------------
# RES multistep (Zhang et al. 2023, "Improved Order Analysis and Design of Exponential Integrator
# for Diffusion Models Sampling", arXiv 2308.02157) and gradient estimation.


def res_multistep(name: str, denoiser, x, sigmas, key, noise_sampler, *, eta, s_noise, cfg_pp: bool):
    """Second-order RES multistep in t = −log σ with ancestral steps; Euler on the first and last step."""
    stochastic = not is_zero(eta)
    x, sigmas, ns = setup(name, x, sigmas, key, noise_sampler, stochastic=stochastic)
    predict = predictor(name, denoiser, cfg_pp)

    def body(carry, i):
        x, old_denoised, old_sigma_down, cnt = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, uncond = predict(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)

        def euler(_):
            if cfg_pp:
                return denoised + to_d(x, sigma, uncond) * sigma_down
            return x + to_d(x, sigma, denoised) * (sigma_down - sigma)

        def second(_):
            t, t_next = t_of(sigma), t_of(sigma_down)
            h = t_next - t
            c2 = (t_of(sigmas[i - 1]) - t_of(old_sigma_down)) / h
            phi1 = jnp.expm1(-h) / -h
            phi2 = (phi1 - 1) / -h
            b1 = jnp.nan_to_num(phi1 - phi2 / c2, nan=0.0)
            b2 = jnp.nan_to_num(phi2 / c2, nan=0.0)
            base = x + (denoised - uncond) if cfg_pp else x
            return sigma_of(h) * base + h * (b1 * uncond + b2 * old_denoised)

        x = lax.cond((sigma_down > 0) & (i > 0), second, euler, None)
        x, cnt = add_noise(x, cnt, ns, sigma, sigma_next, s_noise * sigma_up)
        return x, uncond, sigma_down, cnt

    return scan_steps(body, (x, jnp.zeros_like(x), sigmas[0], jnp.int32(0)), sigmas)[0]


@register_sampler("res_multistep")
def sample_res_multistep(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                         s_noise: float = 1.0) -> jax.Array:
    """RES second-order multistep (ComfyUI `res_multistep`), deterministic."""
    return res_multistep("res_multistep", denoiser, x, sigmas, key, noise_sampler, eta=0.0,
                         s_noise=s_noise, cfg_pp=False)


@register_sampler("res_multistep_ancestral", noise="ancestral")
def sample_res_multistep_ancestral(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                                   eta: float = 1.0, s_noise: float = 1.0) -> jax.Array:
    """RES second-order multistep with ancestral noise (ComfyUI `res_multistep_ancestral`)."""
    return res_multistep("res_multistep_ancestral", denoiser, x, sigmas, key, noise_sampler,
                         eta=eta, s_noise=s_noise, cfg_pp=False)


def gradient_estimation(name: str, denoiser, x, sigmas, *, ge_gamma, cfg_pp: bool):
    """Euler steps plus (γ − 1)·(d_i − d_{i−1})·dt (Permenter & Yuan 2024, "Interpreting and Improving
    Diffusion Models from an Optimization Perspective", ICML; ComfyUI `gradient_estimation`)."""
    x, sigmas, _ = setup(name, x, sigmas)
    predict = predictor(name, denoiser, cfg_pp)

    def body(carry, i):
        x, old_d = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, uncond = predict(x, sigma)
        d = to_d(x, sigma, uncond)
        dt = sigma_next - sigma
        x_new = denoised + d * sigma_next if cfg_pp else x + d * dt
        x_new = jnp.where(i >= 1, x_new + (ge_gamma - 1) * (d - old_d) * dt, x_new)
        return jnp.where(sigma_next == 0, denoised, x_new), d

    return scan_steps(body, (x, jnp.zeros_like(x)), sigmas)[0]


@register_sampler("gradient_estimation")
def sample_gradient_estimation(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                               ge_gamma: float = 2.0) -> jax.Array:
    """Gradient-estimation sampler (ComfyUI `gradient_estimation`), γ = `ge_gamma`."""
    return gradient_estimation("gradient_estimation", denoiser, x, sigmas, ge_gamma=ge_gamma,
                               cfg_pp=False)


# ----------------------------------------------------------------------------------------------
# ER-SDE (Cui et al. 2023, "Elucidating the Solution Space of Extended Reverse-Time SDE for
# Diffusion Models", arXiv 2309.06169), VP ER-SDE-Solver-3.


def er_sde_noise_scaler(lam):
    """ER-SDE's default noise scale function λ·(exp(λ^0.3) + 10) (ComfyUI's default)."""
    return lam * (jnp.exp(lam ** 0.3) + 10.0)


@register_sampler("er_sde", noise="ancestral")
def sample_er_sde(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None, s_noise: float = 1.0,
                  noise_scaler: Callable | None = None, max_stage: int = 3) -> jax.Array:
    """ER-SDE-Solver with stages 1-3 (its integrals by ComfyUI's 200-point rectangle rule in λ = σ)."""
    if max_stage not in (1, 2, 3):
        raise ValueError(f"er_sde: max_stage must be 1, 2 or 3, got {max_stage!r}")
    stochastic = positive(s_noise)
    x, sigmas, ns = setup("er_sde", x, sigmas, key, noise_sampler, stochastic=stochastic)
    fn = er_sde_noise_scaler if noise_scaler is None else noise_scaler
    points = jnp.arange(200, dtype=x.dtype)

    def body(carry, i):
        x, old_denoised, old_denoised_d, cnt = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x, sigma)
        stage = jnp.minimum(max_stage, i + 1)
        r = fn(sigma_next) / fn(sigma)
        x_new = r * x + (1 - r) * denoised
        dt = sigma_next - sigma
        step = -dt / 200.0
        pos = sigma_next + points * step
        scaled = fn(pos)
        s1 = jnp.sum(1 / scaled) * step
        prev1 = jnp.where(i >= 1, sigma - sigmas[jnp.maximum(i - 1, 0)], 1.0)
        denoised_d = (denoised - old_denoised) / prev1
        x2 = x_new + (dt + s1 * fn(sigma_next)) * denoised_d
        s_u = jnp.sum((pos - sigma) / scaled) * step
        prev2 = jnp.where(i >= 2, (sigma - sigmas[jnp.maximum(i - 2, 0)]) / 2, 1.0)
        denoised_u = (denoised_d - old_denoised_d) / prev2
        x3 = x2 + (dt ** 2 / 2 + s_u * fn(sigma_next)) * denoised_u
        x_new = jnp.where(stage >= 3, x3, jnp.where(stage >= 2, x2, x_new))
        old_denoised_d = jnp.where((stage >= 2) & (sigma_next > 0), denoised_d, old_denoised_d)
        scale = s_noise * jnp.nan_to_num(jnp.sqrt(sigma_next ** 2 - sigma ** 2 * r ** 2), nan=0.0)
        x_new, cnt = add_noise(x_new, cnt, ns, sigma, sigma_next, scale)
        return jnp.where(sigma_next == 0, denoised, x_new), denoised, old_denoised_d, cnt

    init = (x, jnp.zeros_like(x), jnp.zeros_like(x), jnp.int32(0))
    return scan_steps(body, init, sigmas)[0]


# ----------------------------------------------------------------------------------------------
# SEEDS (Gonzalez et al. 2023, "SEEDS: Exponential SDE Solvers for Fast High-Quality Sampling from
# Diffusion Models", arXiv 2305.14267), data prediction; exponential Heun is SEEDS-2 with r = 1.


def _h_phi_1(h):
    return jnp.expm1(h)


def _h_phi_2(h):
    return (jnp.expm1(h) - h) / h


def _segment_noise(sde_noise, seg, fresh):
    """Carry the SDE noise of [s, s_k] over to [s, s_{k+1}]: decay by exp(seg), top up with fresh noise."""
    return sde_noise * jnp.exp(seg) + jnp.sqrt(-jnp.expm1(2 * seg)) * fresh


def seeds(name: str, denoiser: Denoiser, x, sigmas, key, noise_sampler, *, eta, s_noise, rs, solver_type="phi_1"):
    """SEEDS-2 (rs = (r,)) or SEEDS-3 (rs = (r_1, r_2)): stages at λ_s + r_k·h, ComfyUI's noise order."""
    if solver_type not in ("phi_1", "phi_2"):
        raise ValueError(f"{name}: solver_type must be 'phi_1' or 'phi_2', got {solver_type!r}")
    inject = positive(eta) and positive(s_noise)
    x, sigmas, ns = setup(name, x, sigmas, key, noise_sampler, stochastic=inject)

    def step(carry, sigma, sigma_next, denoised):
        x, cnt = carry
        lam_s, lam_t = t_of(sigma), t_of(sigma_next)
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        nodes = [(r, sigma_of(lam_s + r * (lam_t - lam_s))) for r in rs]
        r1, s1 = nodes[0]
        x_k = s1 / sigma * jnp.exp(-r1 * h * eta) * x - _h_phi_1(-r1 * h_eta) * denoised
        sde_noise = None
        if inject:
            sde_noise = jnp.sqrt(-jnp.expm1(-2 * r1 * h * eta)) * draw(ns, cnt, sigma, s1, x)
            x_k = x_k + sde_noise * s1 * s_noise
        preds = [denoised, call_denoiser(denoiser, x_k, s1)]
        if len(rs) == 2:  # SEEDS-3's second stage at r_2 from the first two predictions
            r2, s2 = nodes[1]
            a2 = r2 / r1 * _h_phi_2(-r2 * h_eta)
            a1 = _h_phi_1(-r2 * h_eta) - a2
            x_k = s2 / sigma * jnp.exp(-r2 * h * eta) * x - (a1 * denoised + a2 * preds[1])
            if inject:
                sde_noise = _segment_noise(sde_noise, (r1 - r2) * h * eta, draw(ns, cnt + 1, s1, s2, x))
                x_k = x_k + sde_noise * s2 * s_noise
            preds.append(call_denoiser(denoiser, x_k, s2))
        r_last, s_last = nodes[-1]
        decay = sigma_next / sigma * jnp.exp(-h * eta)
        if solver_type == "phi_1" and len(rs) == 1:
            fac = 1 / (2 * r1)
            x = decay * x - _h_phi_1(-h_eta) * (denoised + fac * (preds[1] - denoised))
        else:
            b2 = _h_phi_2(-h_eta) / r_last
            b1 = _h_phi_1(-h_eta) - b2
            x = decay * x - (b1 * denoised + b2 * preds[-1])
        if inject:
            fresh = draw(ns, cnt + len(rs), s_last, sigma_next, x)
            x = x + _segment_noise(sde_noise, (r_last - 1) * h * eta, fresh) * sigma_next * s_noise
            cnt = cnt + len(rs) + 1
        return x, cnt

    def body(carry, i):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, carry[0], sigma)
        return lax.cond(sigma_next > 0, lambda c: step(c, sigma, sigma_next, denoised),
                        lambda c: (denoised, c[1]), carry)

    return scan_steps(body, (x, jnp.int32(0)), sigmas)[0]


@register_sampler("seeds_2", noise="ancestral")
def sample_seeds_2(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None, eta: float = 1.0,
                   s_noise: float = 1.0, r: float = 0.5, solver_type: str = "phi_1") -> jax.Array:
    """SEEDS-2 (two predictions per step; `solver_type` phi_1: midpoint mix, phi_2: φ₂-weighted)."""
    return seeds("seeds_2", denoiser, x, sigmas, key, noise_sampler, eta=eta, s_noise=s_noise, rs=(r,),
                 solver_type=solver_type)


@register_sampler("seeds_3", noise="ancestral")
def sample_seeds_3(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None, eta: float = 1.0,
                   s_noise: float = 1.0, r_1: float = 1.0 / 3, r_2: float = 2.0 / 3) -> jax.Array:
    """SEEDS-3 (three predictions per step at λ_s, λ_s + r_1·h, λ_s + r_2·h)."""
    return seeds("seeds_3", denoiser, x, sigmas, key, noise_sampler, eta=eta, s_noise=s_noise, rs=(r_1, r_2),
                 solver_type="phi_2")


@register_sampler("exp_heun_2_x0")
def sample_exp_heun_2_x0(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                         solver_type: str = "phi_2") -> jax.Array:
    """Exponential Heun in x0 and λ: SEEDS-2 with r = 1, η = 0 (ComfyUI `exp_heun_2_x0`)."""
    return seeds("exp_heun_2_x0", denoiser, x, sigmas, key, noise_sampler, eta=0.0, s_noise=0.0, rs=(1.0,),
                 solver_type=solver_type)


@register_sampler("exp_heun_2_x0_sde", noise="ancestral")
def sample_exp_heun_2_x0_sde(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                             eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "phi_2") -> jax.Array:
    """Stochastic exponential Heun: SEEDS-2 with r = 1 (ComfyUI `exp_heun_2_x0_sde`)."""
    return seeds("exp_heun_2_x0_sde", denoiser, x, sigmas, key, noise_sampler, eta=eta, s_noise=s_noise,
                 rs=(1.0,), solver_type=solver_type)


# ----------------------------------------------------------------------------------------------
# Heun++ and variable-step iPNDM.


@register_sampler("heunpp2")
def sample_heunpp2(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None, s_churn: float = 0.0,
                   s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0) -> jax.Array:
    """Heun++ (Carzit, sd-webui-samplers-scheduler; ComfyUI `heunpp2`): Karras churn, then a
    3-point average of slopes at σ_i, σ_{i+1}, σ_{i+2} weighted by σ/(3σ_0) (2 points on the
    second-to-last step, Euler on the last), steps judged against the final σ."""
    x, sigmas, ns = setup("heunpp2", x, sigmas, key, noise_sampler, stochastic=not is_zero(s_churn))
    n = sigmas.shape[0] - 1
    s_end, s_first = sigmas[-1], sigmas[0]

    def body(carry, i):
        x, cnt = carry
        sigma, sigma_next, sigma_2 = sigmas[i], sigmas[i + 1], sigmas[jnp.minimum(i + 2, n)]
        x, sigma_hat, cnt = _churn(x, sigma, n, cnt, ns, sigma_next, s_churn, s_tmin, s_tmax, s_noise)
        d = to_d(x, sigma_hat, call_denoiser(denoiser, x, sigma_hat))
        dt = sigma_next - sigma_hat

        def euler():
            return x + d * dt

        def heun():
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, call_denoiser(denoiser, x_2, sigma_next))
            w2 = sigma_next / (2 * s_first)
            return x + (d * (1 - w2) + d_2 * w2) * dt

        def heunpp():
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, call_denoiser(denoiser, x_2, sigma_next))
            x_3 = x_2 + d_2 * (sigma_2 - sigma_next)
            d_3 = to_d(x_3, sigma_2, call_denoiser(denoiser, x_3, sigma_2))
            w2, w3 = sigma_next / (3 * s_first), sigma_2 / (3 * s_first)
            return x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt

        branch = jnp.where(sigma_next == s_end, 0, jnp.where(sigma_2 == s_end, 1, 2))
        return lax.switch(branch, [euler, heun, heunpp]), cnt

    return scan_steps(body, (x, jnp.int32(0)), sigmas)[0]


def _ipndm_v_coeffs(h, h1, h2, h3):
    """Variable-step Adams–Bashforth weights of d_i, d_{i−1}, ... for orders 2, 3, 4 (iPNDM-v of
    Zhang & Chen 2023, DEIS, as zju-pi/diff-sampler), h = σ_{i+1} − σ_i, h_k the k-th previous step."""
    c2 = [(2 + h / h1) / 2, -(h / h1) / 2]
    t1 = (1 - h / (3 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2
    c3 = [c2[0] + t1, c2[1] - (1 + h1 / h2) * t1, t1 * h1 / h2]
    t2 = (((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2)))
          * (h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3)))
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    c4 = [c3[0] + t2, c3[1] - (1 + h1 / h2 + q) * t2, c3[2] + (h1 / h2 + q * (1 + h2 / h3)) * t2,
          -t2 * q * h1 / h2]
    return c2, c3, c4


@register_sampler("ipndm_v")
def sample_ipndm_v(denoiser: Denoiser, x: jax.Array, sigmas, *, key=None, noise_sampler=None,
                   max_order: int = 4) -> jax.Array:
    """Improved PNDM with variable step sizes (ComfyUI `ipndm_v`): order min(i + 1, max_order) in σ;
    the last step to σ = 0 returns D."""
    if max_order not in (1, 2, 3, 4):
        raise ValueError(f"ipndm_v: max_order must be 1, 2, 3 or 4, got {max_order!r}")
    x, sigmas, _ = setup("ipndm_v", x, sigmas)
    slots = max(max_order - 1, 1)

    def body(carry, i):
        x, ds = carry  # ds: previous slopes, newest first
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x, sigma)
        d = to_d(x, sigma, denoised)
        order = jnp.minimum(max_order, i + 1)
        prev = [sigmas[jnp.maximum(i - k, 0)] for k in range(4)]
        steps = [prev[k] - prev[k + 1] for k in range(3)]
        steps = [jnp.where(i > k, s, 1.0) for k, s in enumerate(steps)]  # unused ones: keep finite
        c2, c3, c4 = _ipndm_v_coeffs(sigma_next - sigma, *steps)
        hist = [ds[min(k, slots - 1)] for k in range(3)]

        def combo(cs):
            return cs[0] * d + sum(c * hist[k] for k, c in enumerate(cs[1:]))

        slope = jnp.where(order == 1, d, jnp.where(order == 2, combo(c2), jnp.where(order == 3, combo(c3),
                                                                                      combo(c4))))
        x_new = jnp.where(sigma_next == 0, denoised, x + (sigma_next - sigma) * slope)
        return x_new, jnp.concatenate([d[None], ds[:-1]])

    return scan_steps(body, (x, jnp.zeros((slots,) + x.shape, x.dtype)), sigmas)[0]


__all__ = [
    "res_multistep", "gradient_estimation", "predictor", "sample_res_multistep", "sample_res_multistep_ancestral",
    "sample_gradient_estimation", "sample_er_sde", "er_sde_noise_scaler", "sample_seeds_2", "sample_seeds_3",
    "sample_exp_heun_2_x0", "sample_exp_heun_2_x0_sde", "sample_heunpp2", "sample_ipndm_v",
]
