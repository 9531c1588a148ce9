"""Schedules and denoiser wrappers against k-diffusion 0.1.1 / LDM / diffusers / ComfyUI goldens."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import sampling
from ldm_jax.diffusion import denoisers, schedules
from samplers_common import load

G = load("samplers_schedules.npz")


def _close(a, b, rtol=1e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=rtol * np.abs(b).max())


def test_sigma_schedules_match_kdiffusion():
    with jax.enable_x64(True):
        _close(sampling.get_sigmas_karras(10, 0.0292, 14.6146), G["karras_10"])
        _close(sampling.get_sigmas_karras(7, 0.1, 80.0, rho=5.0), G["karras_7_rho5"])
        _close(sampling.get_sigmas_exponential(10, 0.0292, 14.6146), G["exponential_10"])
        _close(sampling.get_sigmas_polyexponential(10, 0.0292, 14.6146, rho=2.0), G["polyexponential_10_rho2"])
        _close(sampling.get_sigmas_vp(10), G["vp_10"])
    # float32 (the default) stays within float32 rounding
    _close(sampling.get_sigmas_karras(10, 0.0292, 14.6146), G["karras_10"], rtol=1e-5)


def test_schedules_trace_sigma_range():
    f = jax.jit(lambda lo, hi: sampling.get_sigmas_karras(10, lo, hi))
    _close(f(0.0292, 14.6146), G["karras_10"], rtol=1e-5)
    _close(f(0.1, 80.0), np.asarray(sampling.get_sigmas_karras(10, 0.1, 80.0)), rtol=1e-6)


def test_discrete_schedules():
    train = schedules.training_sigmas("linear", 1000, 0.00085, 0.012)
    assert train[0] == pytest.approx(0.029168, abs=1e-6) and train[-1] == pytest.approx(14.6146, abs=1e-4)
    with jax.enable_x64(True):
        _close(schedules.get_sigmas_normal(10, train), G["sched_normal_10"])
        _close(schedules.get_sigmas_normal(25, train), G["sched_normal_25"])
    for n in (10, 30):
        _close(schedules.get_sigmas_simple(n, train), G[f"simple_{n}"])
        _close(schedules.get_sigmas_ddim_uniform(n, train), G[f"ddim_uniform_{n}"])
        _close(sampling.get_sigmas_discrete("ddim_uniform", n, train), G[f"ddim_uniform_{n}"])
    with pytest.raises(ValueError, match="normal, simple, ddim_uniform"):
        schedules.get_sigmas_discrete("quad", 10, train)


def test_betas():
    _close(schedules.make_betas("linear"), G["betas_linear"], rtol=1e-12)
    _close(schedules.make_betas("cosine", cosine_s=8e-3), G["betas_cosine"], rtol=1e-12)
    _close(schedules.make_betas("sqrt_linear", linear_start=1e-4, linear_end=2e-2), G["betas_sqrt_linear"], rtol=1e-12)
    # diffusers stores float32 tables
    _close(schedules.make_betas("scaled_linear"), G["diffusers_betas_scaled_linear"], rtol=1e-6)
    _close(schedules.make_betas("linear_diffusers"), G["diffusers_betas_linear"], rtol=1e-6)
    _close(schedules.make_betas("squaredcos_cap_v2"), G["diffusers_betas_squaredcos_cap_v2"], rtol=1e-5)
    ac = schedules.alphas_cumprod(schedules.make_betas("linear"))
    np.testing.assert_allclose(schedules.alphas_cumprod_from_sigmas(schedules.sigmas_from_alphas_cumprod(ac)), ac,
                               rtol=1e-12)
    assert schedules.make_betas("linear").dtype == np.float64
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'"):
        schedules.make_betas("quadratic")


def toy_inner(x_in, t):
    """Same stand-in network as make_sampler_goldens.toy_inner."""
    t = jnp.reshape(t, (-1,) + (1,) * (x_in.ndim - 1)).astype(x_in.dtype)
    return jnp.tanh(x_in) * (1 + t / 1000) + jnp.sin(t / 100)


@pytest.mark.parametrize("quantize", [False, True])
def test_discrete_wrappers_match_kdiffusion(quantize):
    tag = "q" if quantize else "c"
    ac = schedules.alphas_cumprod(schedules.make_betas("linear"))
    with jax.enable_x64(True):
        x, sig = jnp.asarray(G["wrap_x"]), jnp.asarray(G["wrap_sigma"])
        eps = denoisers.DiscreteDenoiser(toy_inner, ac, "eps", quantize)
        v = denoisers.DiscreteDenoiser(toy_inner, ac, "v", quantize)
        _close(jax.jit(eps.sigma_to_t)(sig), G[f"wrap_t_{tag}"], rtol=1e-9)
        _close(jax.jit(eps)(x, sig), G[f"wrap_eps_{tag}"])
        _close(jax.jit(v)(x, sig), G[f"wrap_v_{tag}"])
        if not quantize:  # t(σ) and σ(t) are inverse on the training range
            _close(eps.t_to_sigma(eps.sigma_to_t(sig[:-1])), np.asarray(G["wrap_sigma"][:-1]), rtol=1e-9)
        x0 = denoisers.DiscreteDenoiser(toy_inner, ac, "x0", quantize)
        np.testing.assert_allclose(jax.jit(x0)(x, sig), toy_inner(x / jnp.sqrt(sig[:, None, None, None] ** 2 + 1),
                                                         eps.sigma_to_t(sig)))
    with pytest.raises(ValueError, match="prediction must be one of"):
        denoisers.DiscreteDenoiser(toy_inner, ac, "score")


def test_edm_preconditioning():
    """Karras et al. 2022 Table 1 with an F whose ideal denoiser is known: F ≡ 0 gives c_skip·x."""
    x = jnp.ones((2, 3)) * 2.0
    sig = jnp.asarray([0.5, 2.0])
    d = denoisers.EDMDenoiser(lambda x_in, c_noise: jnp.zeros_like(x_in), sigma_data=0.5)(x, sig)
    np.testing.assert_allclose(d, 2.0 * (0.25 / (sig ** 2 + 0.25))[:, None] * jnp.ones((2, 3)), rtol=1e-6)
    seen = {}

    def f(x_in, c_noise):
        seen["x_in"], seen["c"] = x_in, c_noise
        return jnp.ones_like(x_in)

    d = denoisers.EDMDenoiser(f, sigma_data=0.5)(x, sig)
    np.testing.assert_allclose(seen["c"], np.log([0.5, 2.0]) / 4, rtol=1e-6)
    np.testing.assert_allclose(seen["x_in"][:, 0], 2.0 / np.sqrt(np.asarray(sig) ** 2 + 0.25), rtol=1e-6)
    c_out = np.asarray(sig) * 0.5 / np.sqrt(np.asarray(sig) ** 2 + 0.25)
    np.testing.assert_allclose(d[:, 0], 2.0 * 0.25 / (np.asarray(sig) ** 2 + 0.25) + c_out, rtol=1e-6)


def test_cfg_one_batched_call_and_rescale():
    key = jax.random.key(0)
    x = jax.random.normal(key, (3, 4, 4, 2))
    ctx_c, ctx_u = jnp.arange(3.0) + 1, jnp.zeros(3)
    calls = []

    def den(x, sigma, context):
        calls.append(x.shape[0])
        return x * 0.3 + context[:, None, None, None] * 0.1 + jnp.sin(x) * sigma[:, None, None, None]

    sig = jnp.full((3,), 2.0)
    cfg = denoisers.CFGDenoiser(den, {"context": ctx_c}, {"context": ctx_u}, scale=5.0)
    out = jax.jit(cfg)(x, sig)
    assert calls == [6]
    d_c, d_u = (np.asarray(jax.jit(den)(x, sig, c)) for c in (ctx_c, ctx_u))
    np.testing.assert_allclose(out, d_u + 5.0 * (d_c - d_u), rtol=1e-5, atol=1e-6)
    # guidance rescale: diffusers' rescale_noise_cfg on ε = (x − D)/σ
    out_r = denoisers.CFGDenoiser(den, {"context": ctx_c}, {"context": ctx_u}, scale=5.0, guidance_rescale=0.7)
    out_r = jax.jit(out_r)(x, sig)
    e_c, e_cfg = (np.asarray(x) - d_c) / 2.0, (np.asarray(x) - (d_u + 5.0 * (d_c - d_u))) / 2.0
    std = lambda a: np.std(np.asarray(a).reshape(3, -1), axis=1, ddof=1)[:, None, None, None]  # noqa: E731
    e = 0.7 * e_cfg * std(e_c) / std(e_cfg) + 0.3 * e_cfg
    np.testing.assert_allclose(out_r, np.asarray(x) - 2.0 * e, rtol=1e-5, atol=1e-5)
