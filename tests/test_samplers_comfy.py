"""ComfyUI-only samplers and the CFG++ samplers against ComfyUI's own code (goldens from
tests/goldens/make_comfy_sampler_goldens.py) on analytic mixture denoisers fed the same noise by
draw index: float64 within 1e-9 relative (1e-7 for er_sde) with ComfyUI's denoiser-call count, float32
within 2e-5 (once per code path).
CFG++ runs through CFGDenoiser over a cond and an uncond mixture (one batched call per step)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import denoisers, samplers_cfgpp, samplers_comfy, samplers_sa_solver, schedules
from samplers_common import bank_sampler, load, mixture_denoiser, rel_err

G = load("samplers_comfy.npz")
FNS = {n: getattr(m, f"sample_{n}") for m in (samplers_comfy, samplers_cfgpp, samplers_sa_solver)
       for n in [a[len("sample_"):] for a in m.__all__ if a.startswith("sample_")]}
SA = dict(tau_interval=tuple(G["sa_interval"]))
CASES = {  # golden case -> (sampler, options); mirrors make_comfy_sampler_goldens.CASES
    "res_multistep": ("res_multistep", {}),
    "res_multistep_ancestral": ("res_multistep_ancestral", {}),
    "res_multistep_ancestral_eta05": ("res_multistep_ancestral", dict(eta=0.5, s_noise=0.9)),
    "er_sde": ("er_sde", {}),
    "er_sde_stage2_s08": ("er_sde", dict(max_stage=2, s_noise=0.8)),
    "er_sde_ode": ("er_sde", dict(s_noise=0.0)),
    "seeds_2": ("seeds_2", {}),
    "seeds_2_phi2_r03_eta05": ("seeds_2", dict(solver_type="phi_2", r=0.3, eta=0.5)),
    "seeds_3": ("seeds_3", {}),
    "seeds_3_ode": ("seeds_3", dict(eta=0.0, r_1=0.25, r_2=0.6)),
    "exp_heun_2_x0": ("exp_heun_2_x0", {}),
    "exp_heun_2_x0_phi1": ("exp_heun_2_x0", dict(solver_type="phi_1")),
    "exp_heun_2_x0_sde": ("exp_heun_2_x0_sde", {}),
    "gradient_estimation": ("gradient_estimation", {}),
    "gradient_estimation_g25": ("gradient_estimation", dict(ge_gamma=2.5)),
    "heunpp2": ("heunpp2", {}),
    "heunpp2_churn": ("heunpp2", dict(s_churn=1.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.003)),
    "heunpp2_nonzero_end": ("heunpp2", {}),
    "ipndm_v": ("ipndm_v", {}),
    "ipndm_v_order2": ("ipndm_v", dict(max_order=2)),
    "ipndm_v_nonzero_end": ("ipndm_v", dict(max_order=3)),
    "sa_solver": ("sa_solver", SA),
    "sa_solver_pece": ("sa_solver_pece", SA),
    "sa_solver_simple2": ("sa_solver", dict(SA, predictor_order=2, corrector_order=2, simple_order_2=True)),
    "sa_solver_pece_o1_nonzero_end": ("sa_solver_pece", dict(SA, predictor_order=1, corrector_order=1)),
    "euler_cfg_pp": ("euler_cfg_pp", {}),
    "euler_ancestral_cfg_pp": ("euler_ancestral_cfg_pp", {}),
    "euler_ancestral_cfg_pp_eta05": ("euler_ancestral_cfg_pp", dict(eta=0.5, s_noise=0.9)),
    "dpmpp_2m_cfg_pp": ("dpmpp_2m_cfg_pp", {}),
    "dpmpp_2s_ancestral_cfg_pp": ("dpmpp_2s_ancestral_cfg_pp", {}),
    "dpmpp_2s_ancestral_cfg_pp_eta0": ("dpmpp_2s_ancestral_cfg_pp", dict(eta=0.0)),
    "res_multistep_cfg_pp": ("res_multistep_cfg_pp", {}),
    "res_multistep_ancestral_cfg_pp": ("res_multistep_ancestral_cfg_pp", {}),
    "gradient_estimation_cfg_pp": ("gradient_estimation_cfg_pp", {}),
}


def _mix(tag):
    return mixture_denoiser(G[f"{tag}/means"], G[f"{tag}/stds"], G[f"{tag}/weights"])


def _denoiser(cfg_pp: bool, calls: list):
    """The cond mixture, or CFG (scale G['guidance']) of cond over uncond mixture in one call."""
    cond_fn, uncond_fn = _mix("mix_c"), _mix("mix_u")

    def count():
        jax.debug.callback(lambda: calls.append(1), ordered=True)

    if not cfg_pp:
        def den(x, s):
            count()
            return cond_fn(x, s)
        return den

    def inner(x, s, which):  # `which` 1 = cond, 0 = uncond, per sample of the doubled batch
        count()
        w = which.reshape((-1,) + (1,) * (x.ndim - 1))
        return w * cond_fn(x, s) + (1 - w) * uncond_fn(x, s)

    b = G["x_init"].shape[0]
    return denoisers.CFGDenoiser(inner, {"which": jnp.ones((b,))}, {"which": jnp.zeros((b,))},
                                 scale=float(G["guidance"]))


def _run(name, opts, x, sigmas, bank):
    calls = []
    den = _denoiser(name.endswith("_cfg_pp"), calls)
    fn = FNS[name]
    run = jax.jit(lambda x, sigmas, bank: fn(den, x, sigmas, noise_sampler=bank_sampler(bank), **opts))
    out = jax.block_until_ready(run(x, sigmas, bank))
    return np.asarray(out), len(calls)


def test_cases_cover_every_new_sampler():
    assert set(G["cases"]) == set(CASES)
    assert {s for s, _ in CASES.values()} == set(FNS)


# ComfyUI builds er_sde's 200 quadrature nodes in float32 whatever x's dtype: 6e-9 apart in float64
TOL64 = {"er_sde": 1e-7, "er_sde_stage2_s08": 1e-7, "er_sde_ode": 1e-7}
# float32 once per code path (the other samplers of a path differ only in options)
FLOAT32_CASES = {"res_multistep_ancestral", "res_multistep_cfg_pp", "er_sde", "seeds_2", "seeds_3", "exp_heun_2_x0_sde",
                 "gradient_estimation_cfg_pp", "heunpp2_churn", "ipndm_v", "sa_solver_pece", "euler_ancestral_cfg_pp",
                 "dpmpp_2m_cfg_pp", "dpmpp_2s_ancestral_cfg_pp"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_comfy_parity(case):
    name, opts = CASES[case]
    sigmas, golden = G[f"{case}/sigmas"], G[f"{case}/out"]
    with jax.enable_x64(True):
        x = jnp.asarray(G["x_init"] * sigmas[0])
        out, nfe = _run(name, opts, x, jnp.asarray(sigmas), jnp.asarray(G["bank"]))
    assert nfe == int(G[f"{case}/nfe"]), "denoiser calls differ from ComfyUI"
    assert rel_err(out, golden) < TOL64.get(case, 1e-9)
    if case not in FLOAT32_CASES:
        return
    x32 = jnp.asarray(G["x_init"] * sigmas[0], jnp.float32)
    out32, _ = _run(name, opts, x32, jnp.asarray(sigmas, jnp.float32), jnp.asarray(G["bank"], jnp.float32))
    assert out32.dtype == np.float32
    assert rel_err(out32, golden) < 2e-5

def test_percent_to_sigma_matches_comfy():
    """DiscreteDenoiser.percent_to_sigma == ComfyUI's ModelSamplingDiscrete (float32 tables there);
    sa_solver's default interval is read through CFG / partial wrappers."""
    sd = denoisers.DiscreteDenoiser(lambda x, t: x, schedules.alphas_cumprod(schedules.make_betas("linear")))
    got = [sd.percent_to_sigma(p) for p in (0.0, 0.05, 0.2, 0.5, 0.8, 1.0)]
    np.testing.assert_allclose(got, G["sd_percent_to_sigma"], rtol=1e-6)
    cfg = denoisers.CFGDenoiser(sd, {}, {})
    np.testing.assert_allclose(samplers_sa_solver._default_interval(cfg, "sa_solver"), G["sa_interval"], rtol=1e-6)


def test_with_uncond_is_the_same_call():
    """CFGDenoiser: __call__ is with_uncond's guided half; the unguided half is the inner uncond
    prediction, with and without guidance_rescale; one inner call each."""
    calls = []
    cfg = _denoiser(True, calls)
    x = jnp.asarray(G["x_init"], jnp.float32)
    s = jnp.full((x.shape[0],), 1.7, jnp.float32)
    guided, uncond = jax.jit(cfg.with_uncond)(x, s)
    np.testing.assert_allclose(uncond, _mix("mix_u")(x, s), rtol=1e-5, atol=1e-6)
    cond = _mix("mix_c")(x, s)
    np.testing.assert_allclose(guided, uncond + G["guidance"] * (cond - uncond), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(cfg)(x, s), guided, rtol=1e-5, atol=1e-6)
    rescaled = denoisers.CFGDenoiser(cfg.denoiser, cfg.cond, cfg.uncond, cfg.scale, guidance_rescale=0.7)
    g2, u2 = jax.jit(rescaled.with_uncond)(x, s)
    np.testing.assert_allclose(u2, uncond, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(rescaled)(x, s), g2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(g2, guided)
    assert denoisers.has_uncond(cfg) and not denoisers.has_uncond(_mix("mix_c"))


@pytest.mark.parametrize("name", sorted(n for n in FNS if n.endswith("_cfg_pp")))
def test_cfg_pp_rejects_a_denoiser_without_uncond(name):
    x = jnp.zeros(G["x_init"].shape, jnp.float32)
    traced = []

    def plain(x, s):
        traced.append(1)
        return x

    with pytest.raises(TypeError, match=f"{name} is a CFG\\+\\+ sampler.*with_uncond"):
        FNS[name](plain, x, jnp.asarray(G["euler_cfg_pp/sigmas"], jnp.float32), key=jax.random.key(0))
    assert not traced


@pytest.mark.parametrize("name, opts, match", [
    ("er_sde", dict(max_stage=4), "max_stage"),
    ("ipndm_v", dict(max_order=5), "max_order"),
    ("seeds_2", dict(solver_type="phi_3"), "solver_type"),
    ("exp_heun_2_x0", dict(solver_type="midpoint"), "solver_type"),
    ("sa_solver", dict(SA, predictor_order=7), "predictor_order"),
    ("sa_solver_pece", dict(SA, corrector_order=-1), "corrector_order"),
    ("sa_solver", dict(key=jax.random.key(0)), "tau_interval"),  # a plain denoiser has no noise levels
    ("er_sde", {}, "key"),  # stochastic without key or noise_sampler
    ("seeds_3", {}, "key"),
    ("sa_solver", SA, "key"),
])
def test_bad_input_rejected_before_tracing(name, opts, match):
    traced = []

    def den(x, s):
        traced.append(1)
        return x

    with pytest.raises(ValueError, match=match):
        FNS[name](den, jnp.zeros((2, 3), jnp.float32), jnp.asarray([3.0, 1.0, 0.0]), **opts)
    assert not traced


@pytest.mark.parametrize("name, opts", [("sa_solver_pece", SA), ("res_multistep_ancestral_cfg_pp", {}), ("seeds_3", {})])
def test_one_program_per_schedule_length_and_noise_per_sample(name, opts):
    """A new schedule of the same length reuses the compiled program; with one key per sample a
    sample's result does not depend on the batch it is in."""
    traces = []
    den = _denoiser(name.endswith("_cfg_pp"), [])
    x = jnp.asarray(G["x_init"], jnp.float32)

    @jax.jit
    def run(x, sigmas, keys):
        traces.append(1)
        return FNS[name](den, x * sigmas[0], sigmas, key=keys, **opts)

    keys = jax.random.split(jax.random.key(3), x.shape[0])
    a = run(x, jnp.asarray(schedules.get_sigmas_karras(6, 0.03, 15.0)), keys)
    b = run(x, jnp.asarray(schedules.get_sigmas_exponential(6, 0.05, 10.0)), keys)
    assert len(traces) == 1 and np.all(np.isfinite(a)) and not np.allclose(a, b)
    if name.endswith("_cfg_pp"):
        return  # the toy CFGDenoiser's cond arrays are sized for the full batch
    half = run(x[:2], jnp.asarray(schedules.get_sigmas_karras(6, 0.03, 15.0)), keys[:2])
    np.testing.assert_allclose(half, a[:2], rtol=1e-5, atol=1e-5)


def test_masked_denoiser_keeps_cfg_pp_and_noise_levels():
    """MaskedDenoiser (plain-UNet inpainting) masks both halves of with_uncond and offers it only
    when its inner denoiser does; sa_solver still finds the model's noise levels through it."""
    x = jnp.asarray(G["x_init"], jnp.float32)
    s = jnp.full((x.shape[0],), 0.8, jnp.float32)
    m = (jnp.arange(x.shape[-1]) == 0).astype(jnp.float32)
    known = jnp.full_like(x, 0.25)
    cfg = _denoiser(True, [])
    masked = denoisers.MaskedDenoiser(cfg, m, known)
    g, u = jax.jit(masked.with_uncond)(x, s)
    g0, u0 = jax.jit(cfg.with_uncond)(x, s)
    np.testing.assert_allclose(g, m * g0 + (1 - m) * known, rtol=1e-6)
    np.testing.assert_allclose(u, m * u0 + (1 - m) * known, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(masked)(x, s), g, rtol=1e-6)
    assert denoisers.has_uncond(masked)
    assert not denoisers.has_uncond(denoisers.MaskedDenoiser(_mix("mix_c"), m, known))
    sd = denoisers.DiscreteDenoiser(lambda x, t: x, schedules.alphas_cumprod(schedules.make_betas("linear")))
    assert denoisers.inner_discrete(denoisers.MaskedDenoiser(denoisers.CFGDenoiser(sd, {}, {}), m, known)) is sd


def test_pipeline_cfg_pp_inpainting(goldens_dir):
    """Through Pipeline (tiny random SD): a CFG++ sampler inpaints with a plain UNet (MaskedDenoiser
    keeps with_uncond) and keeps the unmasked latents."""
    from ldm_jax.pipeline import load_pretrained
    pipe = load_pretrained(goldens_dir / "tiny_sd")
    size = 32
    image = np.random.default_rng(1).uniform(0, 255, (size, size, 3)).astype(np.uint8)
    mask = np.zeros((size, size), np.float32)
    mask[:, : size // 2] = 1.0
    kw = dict(schedule="karras", steps=4, height=size, width=size, seed=3, output="latent")
    out = pipe.inpaint(["a red circle"], image, mask, sampler="euler_cfg_pp", guidance_scale=1.5, **kw)
    z0 = np.asarray(pipe._encode_image(pipe.params, jnp.asarray(image[None] / 127.5 - 1, jnp.float32)))
    half = z0.shape[2] // 2
    np.testing.assert_allclose(out[:, :, half:], z0[:, :, half:], atol=1e-6)
    assert np.abs(out[:, :, :half] - z0[:, :, :half]).mean() > 0.1
