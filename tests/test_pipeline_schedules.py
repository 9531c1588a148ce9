"""Pipeline schedules: DDIM for step counts that do not divide 1000 equals diffusers' pipeline, and
every registered schedule / sampler name is accepted by generate()."""
import numpy as np
import pytest

from ldm_jax import sampling
from ldm_jax.diffusion import schedules
from ldm_jax.pipeline import load_pretrained

PROMPT, NEGATIVE, GUIDANCE, SIZE = "a red circle on a white background", "", 7.5, 32


@pytest.fixture(scope="module")
def pipe(goldens_dir):
    return load_pretrained(goldens_dir / "tiny_sd")


@pytest.fixture(scope="module")
def golden(goldens_dir):
    with np.load(goldens_dir / "pipeline_ddim_steps.npz") as g:
        return {k: g[k] for k in g.files}


def test_scheduler_config_is_read(pipe):
    c = pipe.scheduler
    assert (c.timestep_spacing, c.steps_offset, c.set_alpha_to_one) == ("leading", 1, False)


@pytest.mark.parametrize("steps", [7, 15, 30, 50])
def test_ddim_any_step_count_matches_diffusers(pipe, golden, steps):
    """diffusers' StableDiffusionPipeline + DDIMScheduler.from_config(the folder's config)."""
    t = schedules.discrete_timesteps(steps, 1000, pipe.scheduler.timestep_spacing, pipe.scheduler.steps_offset)
    np.testing.assert_array_equal(t, golden[f"timesteps_{steps}"])
    sig = pipe.sigmas("ddim_uniform", steps, "ddim")
    assert sig.shape == (steps + 1,)
    np.testing.assert_allclose(sig[:-1], pipe.model_sigmas[t], rtol=1e-6)
    assert sig[-1] == np.float32(pipe.model_sigmas[0])  # set_alpha_to_one=False: the last target is ᾱ_0
    out = pipe.generate([PROMPT], negative_prompts=[NEGATIVE], sampler="ddim", schedule="ddim_uniform", steps=steps,
                        guidance_scale=GUIDANCE, latents=golden["latents"], height=SIZE, width=SIZE, output="latent")
    want = golden[f"latents_{steps}"]
    err = np.abs(out - want).max() / np.abs(want).max()
    print(steps, "steps: max rel err", err)
    assert err < 1e-4


def test_compvis_spacing_is_explicit(pipe):
    """CompVis' range(0, T, T // n) + 1 on request; it has 31 timesteps for 30 steps, said so."""
    levels = sampling.sampler_levels(pipe.model_sigmas, "ddim")
    for n in (10, 50, 250):  # counts where CompVis' spacing has n entries: the same as diffusers' leading + 1
        np.testing.assert_array_equal(sampling.schedule_sigmas("ddim_uniform", n, levels, timestep_spacing="compvis"),
                                      sampling.schedule_sigmas("ddim_uniform", n, levels))
    with pytest.raises(ValueError, match="CompVis spacing has 31 timesteps for steps=30"):
        sampling.schedule_sigmas("ddim_uniform", 30, levels, timestep_spacing="compvis")


def test_every_registered_name_is_accepted(pipe, golden):
    """Every schedule gives the pipeline steps + 1 sigmas for every sampler (no compile), and a new
    sampler + schedule pair runs end to end: UniPC on Align Your Steps lands near DPM++ 2M on the
    same schedule (the same ODE), not on it."""
    for schedule in sampling.SCHEDULES:
        for sampler in sampling.SAMPLERS:
            s = pipe.sigmas(schedule, 12, sampler)
            assert s.shape == (13,) and np.all(np.diff(s) < 0), (schedule, sampler)
    kw = dict(negative_prompts=[NEGATIVE], steps=12, guidance_scale=GUIDANCE, latents=golden["latents"],
              height=SIZE, width=SIZE, output="latent")
    a = pipe.generate([PROMPT], sampler="uni_pc", schedule="ays_sd1", **kw)
    b = pipe.generate([PROMPT], sampler="dpmpp_2m", schedule="ays_sd1", **kw)
    assert np.all(np.isfinite(a)) and 1e-4 < np.abs(a - b).max() / np.abs(b).max() < 0.5  # close, not equal
    with pytest.raises(ValueError, match="unknown schedule 'ays'"):
        pipe.generate([PROMPT], sampler="uni_pc", schedule="ays", **kw)
