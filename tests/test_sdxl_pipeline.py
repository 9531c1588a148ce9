"""SDXL sampling: the whole pipeline on the tiny random SDXL against diffusers' StableDiffusionXLPipeline
(tests/goldens/make_tiny_sdxl.py: DDIM and Euler, zeroed and given negatives, micro-conditioning, the
base -> refiner hand-off), one program per shape, the fp16 VAE upcast."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import conditioning, sharding
from ldm_jax.pipeline import load_pretrained


@pytest.fixture(scope="module")
def ref(goldens_dir):
    return dict(np.load(goldens_dir / "tiny_sdxl_ref.npz"))


def _one_device():
    """One device: the 8 fake test devices would pad each batch of 2 to 8 (sharding is tested for SD1)."""
    return sharding.make_mesh((1, 1, 1), jax.devices()[:1])


_SIGMA0 = 4.1166964  # σ(t = 751), the first of SDXL's 4 "leading" steps (checked in test_matches_diffusers)


@pytest.fixture(scope="module")
def base(goldens_dir):
    return load_pretrained(goldens_dir / "tiny_sdxl", mesh=_one_device())


@pytest.fixture(scope="module")
def refiner(goldens_dir):
    return load_pretrained(goldens_dir / "tiny_sdxl_refiner", mesh=_one_device())


def _kw(ref, **over):
    """generate() arguments of the goldens. diffusers starts Euler ("leading") from latents·sqrt(1 + σ_0²),
    a VP start; our k-diffusion samplers start from noise·σ_0, so the given noise is rescaled for them."""
    m = json.loads(str(ref["meta"]))
    kw = dict(steps=m["steps"], guidance_scale=m["guidance_scale"], height=m["size"], width=m["size"],
              latents=ref["latents"], schedule="ddim_uniform", sampler="euler", output="float")
    kw = {**kw, **over}
    if kw["sampler"] == "euler" and kw["latents"] is not None:
        s0 = _SIGMA0
        kw["latents"] = kw["latents"] * np.sqrt(1 + s0**2) / s0
    return m, kw


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_matches_diffusers(base, ref, sampler):
    m, kw = _kw(ref, sampler=sampler)
    assert base.family == "sdxl-base" and base.force_zeros_for_empty_prompt and base.default_size == 64
    assert base.sigmas("ddim_uniform", 4, "euler")[0] == pytest.approx(_SIGMA0, rel=1e-6)
    zeros = base.generate(m["prompts"], **kw)  # no negative prompt: zeroed negative embeddings
    np.testing.assert_allclose(zeros, ref[f"images_{sampler}_zeros"], atol=1e-3)
    neg = base.generate(m["prompts"], negative_prompts=m["negative_prompts"], **kw)
    np.testing.assert_allclose(neg, ref[f"images_{sampler}_neg"], atol=1e-3)
    assert np.abs(neg - zeros).max() > 1e-2  # "" is not the zero embedding


def test_micro_conditioning_and_no_recompile(base, ref):
    m, kw = _kw(ref)
    micro = dict(original_size=(128, 96), crops_coords_top_left=(8, 16), target_size=(64, 64))
    before = base.trace_count
    out = base.generate(m["prompts"], **kw, **micro)
    np.testing.assert_allclose(out, ref["images_euler_micro"], atol=1e-3)
    assert np.abs(out - ref["images_euler_zeros"]).max() > 1e-2
    # new prompts, seeds, guidance and micro-conditioning values: the same program
    base.generate(["a big green star", "a tiny cat"], **{**kw, "guidance_scale": 3.0}, original_size=(512, 512))
    base.generate(m["prompts"], **{**kw, "latents": None}, seed=5, crops_coords_top_left=(0, 32))
    traced = base.trace_count - before
    assert traced <= 2  # given latents vs drawn noise
    with pytest.raises(TypeError, match="original_sizes"):
        base.generate(m["prompts"], **kw, original_sizes=(1, 2))
    with pytest.raises(ValueError, match="crops_coords_top_left"):
        base.generate(m["prompts"], **kw, crops_coords_top_left=(1, 2, 3))


def test_base_to_refiner_handoff_matches_diffusers(base, refiner, ref):
    m, kw = _kw(ref, latents=ref["handoff_noise"], height=64, width=64)
    assert refiner.family == "sdxl-refiner" and not refiner.force_zeros_for_empty_prompt
    z = base.generate(m["prompts"], **{**kw, "output": "latent"}, denoising_end=0.5)
    sigma = base.sigmas("ddim_uniform", m["steps"], "euler")[2]  # t = 251: two of the four steps ran
    # diffusers hands over Euler's σ-space latents; ours are VP-scale (x / sqrt(1 + σ²))
    np.testing.assert_allclose(z * np.sqrt(1 + sigma**2), ref["handoff_latents"], atol=1e-3)
    out = refiner.generate(m["prompts"], **{**kw, "latents": z}, denoising_start=0.5)
    np.testing.assert_allclose(out, ref["images_handoff"], atol=1e-3)
    with pytest.raises(ValueError, match="needs latents"):
        refiner.generate(m["prompts"], **{**kw, "latents": None}, denoising_start=0.5)


def test_handoff_steps_follow_diffusers():
    t = np.array([751, 501, 251, 1])
    assert conditioning.handoff_steps(t, 1000, denoising_end=0.5) == (0, 2)
    assert conditioning.handoff_steps(t, 1000, denoising_start=0.5) == (2, 4)
    assert conditioning.handoff_steps(t, 1000, denoising_end=0.8) == (0, 3)  # t >= 200
    with pytest.raises(ValueError, match="leave no step"):
        conditioning.handoff_steps(t, 1000, denoising_end=0.1)
    cond, uncond = conditioning.micro_ids(5, 64, 48, aesthetic_score=7.0)
    assert cond.tolist() == [64, 48, 0, 0, 7.0] and uncond.tolist() == [64, 48, 0, 0, 2.5]


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde", "res_multistep_cfg_pp"])
def test_other_samplers_run_with_added_conditioning(base, ref, sampler):
    """Ancestral noise, Brownian-tree noise and CFG++ (unguided prediction) through the SDXL conditioning."""
    m, kw = _kw(ref, sampler=sampler, schedule="karras", steps=3, latents=None, guidance_scale=1.5)
    a = base.generate(m["prompts"], **kw, seed=1)
    b = base.generate(m["prompts"], **kw, seed=1, original_size=(1024, 1024))
    assert np.isfinite(a).all() and a.shape == (2, 32, 32, 3)
    assert np.abs(a - b).max() > 1e-4  # the micro-conditioning reaches the UNet


def test_img2img_and_inpaint(base, ref):
    m, kw = _kw(ref, latents=None)
    img = (ref["images_euler_zeros"][0] * 255).astype(np.uint8)
    out = base.img2img(m["prompts"][:1], img, strength=0.5, **{k: v for k, v in kw.items() if k not in ("height", "width")})
    assert out.shape == (1, 32, 32, 3) and np.abs(out - img / 255.0).max() > 1e-3
    mask = np.zeros((32, 32), np.float32)
    mask[:, 16:] = 1
    z = base.inpaint(m["prompts"][:1], img, mask, **{**kw, "output": "latent"})
    known = base.vae.apply({"params": base.params["vae"]}, img[None] / 127.5 - 1, method="encode").mode()
    np.testing.assert_allclose(z[:, :, :2], np.asarray(known)[:, :, :2] * base.scheduler.scale_factor, atol=1e-5)


def test_fp16_vae_overflows_and_is_upcast(base):
    """A decoder whose activations leave fp16's range (as the released SDXL VAE's do: diffusers' force_upcast)
    gives inf/nan in fp16; the pipeline decodes a float16 VAE in float32 and gets the float32 result."""
    vae = jax.tree_util.tree_map(lambda a: a, base.params["vae"])
    vae["decoder"]["conv_in"] = {**vae["decoder"]["conv_in"], "kernel": vae["decoder"]["conv_in"]["kernel"] * 3e4}
    params = {**base.params, "vae": vae}
    z = 4.0 * np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
    ref32 = np.asarray(base._decode(params, z, 1.0))
    assert np.isfinite(ref32).all()
    vae16 = base.vae.clone(dtype=jnp.float16)
    raw = vae16.apply({"params": vae}, jnp.asarray(z), method="decode")
    assert not np.isfinite(np.asarray(raw, np.float32)).all()  # the fp16 overflow
    base.vae, keep = vae16, base.vae
    try:
        up = np.asarray(base._decode(params, z, 1.0))
        base.upcast_vae = False
        down = np.asarray(base._decode(params, z, 1.0))
    finally:
        base.vae, base.upcast_vae = keep, True
    np.testing.assert_allclose(up, ref32, atol=1e-6)
    assert not np.allclose(down, ref32, atol=1e-2)  # clipped nan/inf: garbage without the upcast
