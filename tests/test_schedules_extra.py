"""Discrete timesteps vs diffusers, ComfyUI's schedules, Align Your Steps and zero-terminal SNR against
the goldens of tests/goldens/make_schedule_goldens.py; every step count 1..1000 gives steps + 1 sigmas."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import sampling
from ldm_jax.diffusion import denoisers, registry, schedules
from ldm_jax.pipeline import SchedulerConfig
from samplers_common import load

G = load("schedules_references.npz")
TRAIN = schedules.training_sigmas("linear", 1000, 0.00085, 0.012)
SD = sampling.sampler_levels(TRAIN, "euler")  # leading, steps_offset 1, ends at 0


def _close(a, b, rtol=1e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=rtol * np.abs(b).max())


def test_timesteps_equal_diffusers_ddim():
    keys = [k for k in G if k.startswith("ts/")]
    assert len(keys) > 130
    extra = 0
    for k in keys:
        _, tag, n = k.split("/")
        spacing, offset, n = tag[:-1], int(tag[-1]), int(n)
        want = G[k].astype(np.int64)
        if len(want) == n + 1:  # diffusers' trailing np.arange picks up a spurious timestep -1
            assert spacing == "trailing" and want[-1] == -1, k
            want, extra = want[:n], extra + 1
        np.testing.assert_array_equal(schedules.discrete_timesteps(n, 1000, spacing, offset), want, err_msg=k)
    assert extra == 3  # 61, 103 and 499 are among the stored counts


@pytest.mark.parametrize("offset", [0, 1])
def test_every_step_count_gives_steps_plus_one_sigmas(offset):
    """ddim_uniform (all three spacings), normal, simple, sgm_uniform: steps + 1 strictly decreasing
    sigmas, the last 0, for every steps in 1..1000 (leading + steps_offset 1 reaches t = 1000 at 1000
    steps, which is refused with a message, as diffusers cannot run it either)."""
    for spacing in ("leading", "trailing", "linspace"):
        levels = registry.NoiseLevels(TRAIN, spacing, offset)
        for n in range(1, 1001):
            if spacing == "leading" and offset == 1 and n == 1000:
                with pytest.raises(ValueError, match="outside 0..999.*steps_offset 0"):
                    sampling.schedule_sigmas("ddim_uniform", n, levels)
                continue
            s = sampling.schedule_sigmas("ddim_uniform", n, levels)
            assert s.shape == (n + 1,) and s[-1] == 0 and np.all(np.diff(s) < 0), (spacing, n)
    if offset:
        return
    for name in ("normal", "simple", "sgm_uniform"):
        for n in range(1, 1001):
            s = sampling.schedule_sigmas(name, n, SD)
            assert s.shape == (n + 1,) and s[-1] == 0 and np.all(np.diff(s) < 0), (name, n)
            assert s[0] == pytest.approx(TRAIN[-1], rel=1e-12)


COMFY = sorted(k for k in G if k.startswith("comfy/"))


@pytest.mark.parametrize("key", COMFY)
def test_comfy_schedules(key):
    _, name, n = key.split("/")
    n, want = int(n), G[key]
    if name == "ddim_uniform":  # ComfyUI's ddim_uniform is CompVis' spacing (31 steps for 30), ending at 0
        got = schedules.get_sigmas_ddim_uniform(n, TRAIN)
        if len(want) == n + 1:
            _close(sampling.schedule_sigmas("ddim_uniform", n, SD, timestep_spacing="compvis"), want)
    elif name == "beta" and len(want) != n + 1:  # ComfyUI drops a repeated timestep and runs fewer steps
        with pytest.raises(ValueError, match=f"of {n} on the same timestep"):
            sampling.schedule_sigmas("beta", n, SD)
        return
    else:
        got = sampling.schedule_sigmas(name, n, SD)
    _close(got, want)  # ComfyUI returns float32 (kl_optimal is computed in float32: 6e-7)


def test_kl_optimal_one_step():
    np.testing.assert_allclose(sampling.schedule_sigmas("kl_optimal", 1, SD), [TRAIN[-1], 0.0])


@pytest.mark.parametrize("model", ["SD1", "SDXL"])
def test_align_your_steps(model):
    for k in sorted(k for k in G if k.startswith(f"ays/{model}/")):
        n = int(k.rsplit("/", 1)[1])
        _close(sampling.schedule_sigmas(f"ays_{model.lower()}", n, SD), G[k], rtol=1e-9)


def test_zero_terminal_snr_betas():
    betas = schedules.make_betas("scaled_linear", zero_terminal_snr=True)
    _close(betas, G["zsnr/betas"], rtol=1e-12)
    ac = schedules.alphas_cumprod(betas)
    assert ac[-1] == 0.0 and betas[-1] == 1.0
    np.testing.assert_allclose(ac[0], schedules.alphas_cumprod(schedules.make_betas("scaled_linear"))[0], rtol=1e-12)


@pytest.mark.parametrize("n", [10, 30])
def test_zero_terminal_snr_trailing_sigmas_match_diffusers_euler(n):
    """diffusers' σ-space schedulers with rescale_betas_zero_snr start at ᾱ = 2^-24 (σ = 4096)."""
    cfg = SchedulerConfig(rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=0,
                          prediction_type="v_prediction")
    ac = cfg.alphas_cumprod()
    assert ac[-1] == 2.0 ** -24
    sig = schedules.sigmas_from_alphas_cumprod(ac)
    levels = sampling.sampler_levels(sig, "euler", timestep_spacing="trailing", steps_offset=0)
    got = sampling.schedule_sigmas("ddim_uniform", n, levels)
    np.testing.assert_array_equal(schedules.discrete_timesteps(n, 1000, "trailing"), G[f"zsnr/euler_timesteps/{n}"])
    _close(got, G[f"zsnr/euler_sigmas/{n}"], rtol=2e-5)  # diffusers builds its tables in float32
    assert got[0] == pytest.approx(4096.0, rel=1e-6)
    # the first step of a v model at σ = 4096 is finite: D = c_skip·x + c_out·v ≈ −v
    den = denoisers.DiscreteDenoiser(lambda x_in, t: jnp.ones_like(x_in) * 0.5, ac, "v")
    x = jnp.full((2, 3), float(got[0]))
    with jax.enable_x64(True):
        d = np.asarray(den(x, jnp.full((2,), got[0])))
    assert np.all(np.isfinite(d)) and np.abs(d + 0.5).max() < 1e-3


def test_zero_terminal_snr_in_training_config():
    from ldm_jax.training.objective import ConfigError
    from training_utils import tiny_config

    from ldm_jax.training import ldm

    with pytest.raises(ConfigError, match="zero_terminal_snr=True needs diffusion.prediction='v'"):
        ldm.build(tiny_config(**{"diffusion.zero_terminal_snr": True}))
    obj = ldm.build(tiny_config(**{"diffusion.zero_terminal_snr": True, "diffusion.prediction": "v"}))
    assert obj.alphas_cumprod_np[-1] == 0.0
    _close(obj.alphas_cumprod_np, schedules.alphas_cumprod(schedules.make_betas(
        "linear", zero_terminal_snr=True)), rtol=1e-12)
    sched = SchedulerConfig.from_dict(obj.scheduler_dict())
    assert sched.rescale_betas_zero_snr and sched.timestep_spacing == "trailing" and sched.steps_offset == 0
