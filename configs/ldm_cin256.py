"""Class-conditional ImageNet LDM-4 of the LDM paper (UNet preset ldm4-cin256): VQ-f4 latents 64x64x3,
a class embedder (1001 -> 512, the last row is the null class for guidance) used as cross-attention context.

Needs --config.first_stage.checkpoint (a VQ-f4 autoencoder: configs/autoencoder_*.py workdir) and ImageNet
as a tfds dataset (--config.data.data_dir with imagenet2012 prepared).
"""
import ml_collections

from ldm_jax.models.autoencoder import VAE_PRESETS
from ldm_jax.models.unet import UNET_PRESETS
from ldm_jax.training.ldm import default_ldm_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = default_ldm_config()
    c.image_size = 256
    c.global_batch_size = 1024
    c.num_steps = 500_000
    c.dtype = "bfloat16"
    c.unet = dict(UNET_PRESETS["ldm4-cin256"])
    c.first_stage.kwargs = dict(VAE_PRESETS["vq-f4"])
    c.first_stage.scale_factor = 1.0
    c.cond.type = "class"
    c.cond.class_mode = "context"
    c.cond.num_classes = 1000
    c.cond.drop_prob = 0.1
    c.diffusion.linear_start, c.diffusion.linear_end = 0.0015, 0.0195
    c.optim.lr = 1e-4
    c.optim.weight_decay = 0.0
    c.ema.decay = 0.9999
    c.checkpoint.every = 5000
    c.data.source = "tfds"
    c.data.name = "imagenet2012"
    c.data.resolution = 256
    c.data.caption_key = ""
    c.data.label_key = "label"
    c.lock()
    return c
