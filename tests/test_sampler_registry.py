"""The sampler / schedule registry: complete, consistent metadata, and the contracts built on it."""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import numpy as np
import pytest

import ldm_jax.diffusion
from ldm_jax import sampling
from ldm_jax.diffusion import registry, schedules

TRAIN = schedules.training_sigmas("linear", 1000, 0.00085, 0.012)


def test_every_sampler_module_is_in_the_catalog():
    """Each diffusion/samplers*.py module is imported by ldm_jax.sampling and registers every
    public sample_* function it defines (so no sampler can exist unregistered)."""
    registered = {id(fn) for fn in sampling.SAMPLERS.values()}
    mods = [m.name for m in pkgutil.iter_modules(ldm_jax.diffusion.__path__) if m.name.startswith("samplers")]
    assert {"samplers", "samplers_dpm_solver", "samplers_ldm"} <= set(mods)
    for name in mods:
        mod = importlib.import_module(f"ldm_jax.diffusion.{name}")
        fns = [v for k, v in vars(mod).items() if k.startswith("sample_") and callable(v)
               and getattr(v, "__module__", mod.__name__) == mod.__name__]
        assert fns, name
        for fn in fns:
            assert id(fn) in registered, f"{mod.__name__}.{fn} is not registered"


def test_every_registered_sampler_has_a_golden_parity_case():
    import test_samplers_comfy
    import test_samplers_diffusers
    import test_samplers_parity
    covered = ({n for n, _ in test_samplers_parity.CASES.values()} | {n for n, *_ in test_samplers_parity.LDM_CASES.values()}
               | {n for n, _ in test_samplers_comfy.CASES.values()} | {n for n, _ in test_samplers_diffusers.CASES.values()})
    assert set(sampling.SAMPLERS) - covered == set()


def test_public_names_and_contract():
    assert sampling.SAMPLERS is registry.SAMPLERS
    for name, info in sampling.SAMPLER_INFO.items():
        assert info.name == name and sampling.SAMPLERS[name] is info.fn
        assert getattr(sampling, f"sample_{name}") is info.fn
        assert f"sample_{name}" in sampling.__all__
        params = inspect.signature(info.fn).parameters
        assert list(params)[:3] == ["denoiser", "x", "sigmas"], name
        assert params["key"].kind is inspect.Parameter.KEYWORD_ONLY and params["key"].default is None
        assert params["noise_sampler"].default is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        sampling.SAMPLER_INFO["euler"].space = "vp"


def test_metadata_the_pipeline_relies_on():
    info = sampling.SAMPLER_INFO
    assert {n for n, i in info.items() if i.space == "vp"} == {"ddim", "plms", "ddpm"}
    assert {n for n, i in info.items() if i.noise == "sde"} >= {"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde",
                                                              "dpmpp_2m_sde_heun"}
    assert {"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "ddpm"} <= {
        n for n, i in info.items() if i.noise == "ancestral"}
    assert info["euler"].noise == "none" and not info["euler"].needs_uncond
    assert info["euler_ancestral"].a1111 == "Euler a" and info["dpmpp_2m"].a1111 == "DPM++ 2M"
    assert info["plms"].comfy is None and info["dpmpp_2m_sde_heun"].comfy == "dpmpp_2m_sde_heun"
    # a variant is its base with preset options
    v = info["dpmpp_2m_sde_heun"]
    assert v.options == (("solver_type", "heun"),) and v.fn.func is info["dpmpp_2m_sde"].fn
    assert v.noise == "sde"


def test_registration_errors():
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_sampler("euler")(lambda denoiser, x, sigmas, *, key=None, noise_sampler=None: x)
    with pytest.raises(ValueError, match="space must be one of"):
        registry.register_sampler("__bad_space", space="ve")(lambda *a, **k: None)
    with pytest.raises(ValueError, match="noise must be one of"):
        registry.register_sampler("__bad_noise", noise="brownian")(lambda *a, **k: None)
    assert "__bad_space" not in registry.SAMPLERS and "__bad_noise" not in registry.SAMPLERS
    with pytest.raises(ValueError, match="unknown sampler 'eulr'; available: .*euler_ancestral"):
        sampling.sampler_info("eulr")


def test_one_schedule_list():
    assert sampling.SCHEDULES.keys() == registry.SCHEDULE_INFO.keys()
    assert {"karras", "exponential", "polyexponential", "vp", "normal", "simple", "ddim_uniform"} <= set(
        sampling.SCHEDULES)
    levels = registry.NoiseLevels(TRAIN)
    with pytest.raises(ValueError, match="unknown schedule 'quad'; choose one of karras"):
        sampling.schedule_sigmas("quad", 10, levels)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="steps must be >= 1"):
            sampling.schedule_sigmas("karras", bad, levels)


def test_schedules_through_the_registry_equal_the_formulas():
    levels = registry.NoiseLevels(TRAIN)
    lo, hi = float(TRAIN[0]), float(TRAIN[-1])
    import jax
    with jax.enable_x64(True):
        want = {"karras": sampling.get_sigmas_karras(12, lo, hi), "exponential": sampling.get_sigmas_exponential(12, lo, hi),
                "polyexponential": sampling.get_sigmas_polyexponential(12, lo, hi), "vp": sampling.get_sigmas_vp(12),
                "normal": schedules.get_sigmas_normal(12, TRAIN), "simple": schedules.get_sigmas_simple(12, TRAIN)}
    for name, w in want.items():
        got = sampling.schedule_sigmas(name, 12, levels)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, np.asarray(w), rtol=1e-12, err_msg=name)
    np.testing.assert_allclose(sampling.schedule_sigmas("karras", 12, levels, rho=3.0),
                               np.asarray(sampling.get_sigmas_karras(12, lo, hi, rho=3.0)), rtol=1e-6)


def test_sampler_levels_end_where_the_references_do():
    """LDM's samplers end discrete-timestep schedules at ᾱ_0 (CompVis, diffusers set_alpha_to_one=False)."""
    assert sampling.sampler_levels(TRAIN, "ddim").final_sigma == TRAIN[0]
    assert sampling.sampler_levels(TRAIN, "ddim", set_alpha_to_one=True).final_sigma == 0.0
    assert sampling.sampler_levels(TRAIN, "euler").final_sigma == 0.0
    ddim = sampling.schedule_sigmas("ddim_uniform", 10, sampling.sampler_levels(TRAIN, "ddim"))
    euler = sampling.schedule_sigmas("ddim_uniform", 10, sampling.sampler_levels(TRAIN, "euler"))
    np.testing.assert_array_equal(ddim[:-1], euler[:-1])
    assert ddim[-1] == TRAIN[0] and euler[-1] == 0.0


def test_front_end_names():
    assert sampling.display_names("dpmpp_2m_sde_heun", "ays_sdxl") == {
        "a1111_sampler": "DPM++ 2M SDE Heun", "a1111_schedule": "Align Your Steps",
        "comfy_sampler": "dpmpp_2m_sde_heun", "comfy_scheduler": None}
    assert sampling.display_names("uni_pc_bh2", "sgm_uniform")["a1111_sampler"] == "uni_pc_bh2"  # none in A1111
    text = sampling.a1111_infotext(prompt="a cat", negative_prompt="dog", steps=30, sampler="euler_ancestral",
                                   schedule="karras", guidance_scale=7.0, seed=5, width=512, height=768, model="sd15")
    assert text == ("a cat\nNegative prompt: dog\nSteps: 30, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, "
                    "Seed: 5, Size: 512x768, Model: sd15")
    with pytest.raises(ValueError, match="unknown schedule 'kar'"):
        sampling.display_names("euler", "kar")
