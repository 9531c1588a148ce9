"""Every sampler against k-diffusion 0.1.1 / diffusers goldens on an analytic mixture denoiser,
fed the same noise by draw index: float64 within 1e-6 relative, float32 within 1e-4, and the
same number of denoiser calls."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import sampling
from ldm_jax.diffusion import schedules
from samplers_common import bank_sampler, load, mixture_denoiser, rel_err

G = load("samplers_kdiffusion.npz")
CASES = {  # golden case -> (sampler, options); mirrors make_sampler_goldens.CASES
    "euler": ("euler", {}),
    "euler_churn": ("euler", dict(s_churn=2.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.003)),
    "euler_ancestral": ("euler_ancestral", {}),
    "euler_ancestral_eta05": ("euler_ancestral", dict(eta=0.5, s_noise=0.9)),
    "heun": ("heun", {}),
    "heun_churn": ("heun", dict(s_churn=1.0)),
    "dpm_2": ("dpm_2", {}),
    "dpm_2_churn": ("dpm_2", dict(s_churn=1.5, s_tmax=5.0)),
    "dpm_2_ancestral": ("dpm_2_ancestral", {}),
    "lms": ("lms", {}),
    "lms_order2": ("lms", dict(order=2)),
    "dpm_fast": ("dpm_fast", {}),
    "dpm_fast_9_eta": ("dpm_fast", dict(eta=0.5)),
    "dpm_adaptive": ("dpm_adaptive", {}),
    "dpm_adaptive_o2_eta": ("dpm_adaptive", dict(order=2, eta=0.5, rtol=0.1)),
    "dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", {}),
    "dpmpp_sde": ("dpmpp_sde", {}),
    "dpmpp_sde_r03_eta05": ("dpmpp_sde", dict(r=0.3, eta=0.5)),
    "dpmpp_2m": ("dpmpp_2m", {}),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}),
    "dpmpp_2m_sde_heun": ("dpmpp_2m_sde_heun", dict(eta=0.7)),  # the registered variant: solver_type="heun"
    "dpmpp_3m_sde": ("dpmpp_3m_sde", {}),
    "dpmpp_3m_sde_eta0": ("dpmpp_3m_sde", dict(eta=0.0)),
}
LDM_CASES = {"ddim": ("ddim", {}, "alpha0"), "ddim_eta05": ("ddim", dict(eta=0.5), "alpha0"),
             "plms": ("plms", {}, "alpha0"), "ddpm": ("ddpm", {}, "zero")}


KDIFFUSION_AND_LDM = {"euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast",
                      "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde",
                      "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "ddim", "plms", "ddpm"}


def test_cases_cover_every_sampler():
    """Every k-diffusion / LDM sampler has a case here (test_sampler_registry checks that every
    registered sampler has a golden case in some parity test)."""
    assert set(G["cases"]) == set(CASES)
    covered = {s for s, _ in CASES.values()} | {s for s, _, _ in LDM_CASES.values()}
    assert covered == KDIFFUSION_AND_LDM and covered <= set(sampling.SAMPLERS)


def _run(name, opts, x, sigmas, bank, count=False):
    den = mixture_denoiser(G["means"], G["stds"], G["weights"])
    calls = []
    if count:
        inner = den

        def den(x, s):  # noqa: F811 - counts calls that actually execute (lax.cond branches)
            jax.debug.callback(lambda: calls.append(1), ordered=True)
            return inner(x, s)

    fn = sampling.SAMPLERS[name]
    run = jax.jit(lambda x, sigmas, bank: fn(den, x, sigmas, noise_sampler=bank_sampler(bank), **opts))
    out = jax.block_until_ready(run(x, sigmas, bank))
    return np.asarray(out), len(calls)


@pytest.mark.parametrize("case", sorted(CASES))
def test_kdiffusion_parity(case):
    name, opts = CASES[case]
    sigmas, golden = G[f"{case}/sigmas"], G[f"{case}/out"]
    with jax.enable_x64(True):
        x = jnp.asarray(G["x_init"] * sigmas[0])
        out, nfe = _run(name, opts, x, jnp.asarray(sigmas), jnp.asarray(G["bank"]), count=True)
    assert nfe == int(G[f"{case}/nfe"]), "denoiser calls differ from k-diffusion"
    assert rel_err(out, golden) < 1e-6
    x32 = jnp.asarray(G["x_init"] * sigmas[0], jnp.float32)
    out32, _ = _run(name, opts, x32, jnp.asarray(sigmas, jnp.float32), jnp.asarray(G["bank"], jnp.float32))
    assert out32.dtype == np.float32
    assert rel_err(out32, golden) < 1e-4


@pytest.mark.parametrize("case", sorted(LDM_CASES))
def test_ldm_parity(case):
    """CompVis-style DDIM/PLMS/DDPM in σ form == diffusers' schedulers (SD settings) in VP form."""
    name, opts, final = LDM_CASES[case]
    with jax.enable_x64(True):
        train = schedules.training_sigmas("linear", 1000, 0.00085, 0.012)
        sigmas = schedules.get_sigmas_ddim_uniform(10, train, final=final)
        assert sigmas.shape == (11,)
        # diffusers' PNDM lists the second timestep twice (its Heun-like first step)
        np.testing.assert_array_equal(schedules.ddim_timesteps(10), np.unique(G[f"{case}/timesteps"])[::-1])
        x = jnp.asarray(G["x_init"] * np.sqrt(1 + sigmas[0] ** 2))
        out, nfe = _run(name, opts, x, jnp.asarray(sigmas), jnp.asarray(G["bank"]), count=True)
    out_vp = out / np.sqrt(1 + sigmas[-1] ** 2)
    assert nfe == int(G[f"{case}/nfe"])
    assert rel_err(out_vp, G[f"{case}/out"]) < 1e-6
