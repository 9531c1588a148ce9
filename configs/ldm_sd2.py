"""Stable Diffusion 2.x: OpenCLIP ViT-H/14 text (penultimate layer), 64-channel heads, linear proj in/out.

  --config=configs/ldm_sd2.py          SD 2 base: 512 px, eps-prediction
  --config=configs/ldm_sd2.py:v        SD 2 768-v: 768 px, v-prediction
Same requirements as configs/ldm_f8.py (first stage, text encoder, tokenizer and data paths).
"""
import ml_collections

from ldm_jax.models.autoencoder import VAE_PRESETS
from ldm_jax.models.text import TEXT_PRESETS
from ldm_jax.models.unet import UNET_PRESETS
from ldm_jax.training.ldm import default_ldm_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "v"):
        raise ValueError(f"unknown ldm_sd2 argument {arg!r}; use '' (512 base, eps) or 'v' (768, v-prediction)")
    c = default_ldm_config()
    c.image_size = 768 if arg == "v" else 512
    c.global_batch_size = 2048
    c.num_steps = 500_000
    c.dtype = "bfloat16"
    c.remat = "dots_no_batch"
    c.unet = dict(UNET_PRESETS["sd2"])
    c.first_stage.kwargs = dict(VAE_PRESETS["kl-f8"])
    c.first_stage.scale_factor = 0.18215
    c.cond.type = "text"
    c.cond.text = dict(TEXT_PRESETS["openclip-vit-h-14"])
    c.cond.drop_prob = 0.1
    c.diffusion.prediction = "v" if arg == "v" else "eps"
    c.optim.lr = 1e-4
    c.optim.schedule = "sd_linear"
    c.optim.warmup_steps = 10_000
    c.checkpoint.every = 5000
    c.data.source = "folder"
    c.data.resolution = c.image_size
    c.data.label_key = ""
    c.sample.every = 5000
    c.sample.prompts = ["a photograph of an astronaut riding a horse"]
    c.sample.sampler, c.sample.steps, c.sample.guidance_scale = "dpmpp_2m", 25, 7.5
    c.lock()
    return c
