"""Stable Diffusion v1 (CompVis v1-inference.yaml / v1 training recipe): a text-conditional LDM on KL-f8 latents.

  --config=configs/ldm_f8.py              train from scratch (UNet 859,520,964 params) on 512 px images
  --config=configs/ldm_f8.py:finetune     start the UNet (and VAE, CLIP) from an SD v1 checkpoint: set
                                          --config.init_from=PATH (diffusers folder or .safetensors)
Needs: --config.first_stage.checkpoint (the SD VAE: a diffusers folder or a single file),
--config.cond.text_checkpoint and --config.cond.tokenizer (CLIP ViT-L/14 text encoder and tokenizer folder; with
init_from, empty ones take it: a diffusers folder gives all three, a single file all but the tokenizer),
and data: --config.data.source=folder --config.data.path=DIR (images + captions) or a tfds dataset.
"""
import ml_collections

from ldm_jax.models.autoencoder import VAE_PRESETS
from ldm_jax.models.text import TEXT_PRESETS
from ldm_jax.models.unet import UNET_PRESETS
from ldm_jax.training.ldm import default_ldm_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "finetune"):
        raise ValueError(f"unknown ldm_f8 argument {arg!r}; use '' or 'finetune'")
    c = default_ldm_config()
    c.image_size = 512
    c.global_batch_size = 2048  # SD v1 (256 GPUs x 8 or with accumulation); lower it with grad_accum/mesh
    c.num_steps = 500_000
    c.dtype = "bfloat16"
    c.remat = "dots_no_batch"
    c.mesh = (-1, 1, 1)
    c.unet = dict(UNET_PRESETS["sd1"])
    c.first_stage.kwargs = dict(VAE_PRESETS["kl-f8"])
    c.first_stage.scale_factor = 0.18215
    c.cond.type = "text"
    c.cond.text = dict(TEXT_PRESETS["clip-vit-l-14"])
    c.cond.text_trainable = False
    c.cond.drop_prob = 0.1
    c.diffusion.schedule = "linear"  # sqrt-space linear (diffusers "scaled_linear")
    c.diffusion.linear_start, c.diffusion.linear_end = 0.00085, 0.012
    c.optim.lr = 1e-4
    c.optim.weight_decay = 0.01
    c.optim.schedule = "sd_linear"  # LambdaLinearScheduler: 10k-step warm-up from 1e-6, then constant
    c.optim.warmup_steps = 10_000
    c.optim.f_start, c.optim.f_max, c.optim.f_min = 1e-6, 1.0, 1.0
    c.ema.decay = 0.9999
    c.checkpoint.every = 5000
    c.checkpoint.keep_period = 50_000
    c.log_every = 50
    c.data.source = "folder"
    c.data.resolution = 512
    c.data.label_key = ""
    c.sample.every = 5000
    c.sample.prompts = ["a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse"]
    c.sample.sampler, c.sample.schedule, c.sample.steps, c.sample.guidance_scale = "dpmpp_2m", "karras", 25, 7.5
    if arg == "finetune":
        c.optim.lr = 1e-5
        c.optim.warmup_steps = 500
        c.global_batch_size = 64
    c.lock()
    return c
