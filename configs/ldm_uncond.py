"""Unconditional LDMs of the paper (configs/latent-diffusion/*.yaml).

  --config=configs/ldm_uncond.py              LSUN-churches LDM-8: KL-f8, ch 192 [1,2,2,4,4], l1 loss, scale_by_std
  --config=configs/ldm_uncond.py:celebahq     CelebA-HQ LDM-4: VQ-f4, ch 224 [1,2,3,4]  (also: ffhq, bedrooms)
Needs --config.first_stage.checkpoint and the dataset (tfds name or an image folder).
"""
import ml_collections

from ldm_jax.models.autoencoder import VAE_PRESETS
from ldm_jax.models.unet import UNET_PRESETS
from ldm_jax.training.ldm import default_ldm_config

_VQ4 = {"celebahq": "ldm4-celebahq", "ffhq": "ldm4-ffhq", "bedrooms": "ldm4-lsun-bedrooms"}


def get_config(arg: str = "churches") -> ml_collections.ConfigDict:
    arg = arg or "churches"
    if arg not in ("churches", *_VQ4):
        raise ValueError(f"unknown ldm_uncond argument {arg!r}; use churches, {', '.join(_VQ4)}")
    c = default_ldm_config()
    c.image_size = 256
    c.num_steps = 500_000
    c.dtype = "bfloat16"
    c.cond.type = "none"
    c.cond.drop_prob = 0.0
    c.data.source = "folder"
    c.data.resolution = 256
    c.data.caption_key = ""
    c.data.label_key = ""
    c.checkpoint.every = 5000
    c.sample.every = 5000
    c.sample.num = 16
    c.sample.sampler, c.sample.schedule, c.sample.steps = "ddim", "ddim_uniform", 200
    if arg == "churches":
        c.unet = dict(UNET_PRESETS["ldm8-lsun-churches"])
        c.first_stage.kwargs = dict(VAE_PRESETS["kl-f8"])
        c.first_stage.scale_by_std = True
        c.diffusion.loss = "l1"
        c.diffusion.linear_start, c.diffusion.linear_end = 0.0015, 0.0155
        c.global_batch_size = 96
        c.optim.lr = 5e-5
        c.optim.scale_lr = True  # LDM main.py: lr = base_lr * accumulate * global batch
    else:
        c.unet = dict(UNET_PRESETS[_VQ4[arg]])
        c.first_stage.kwargs = dict(VAE_PRESETS["vq-f4"])
        c.first_stage.scale_factor = 1.0
        c.diffusion.linear_start, c.diffusion.linear_end = 0.0015, 0.0195
        c.global_batch_size = 48
        c.optim.lr = 2e-6
        c.optim.scale_lr = True
    c.optim.weight_decay = 0.0
    c.lock()
    return c
