"""SDXL (Podell et al. 2023, arXiv 2307.01952): the LDM objective with two text towers and micro-conditioning.

  --config=configs/ldm_sdxl.py              SDXL base (UNet 2,567,463,684 params) at 1024 px from scratch
  --config=configs/ldm_sdxl.py:finetune     start from SDXL base weights: --config.init_from=PATH, a diffusers SDXL
                                            folder (unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/)
                                            or a Stability single file (sd_xl_base_1.0.safetensors; single files
                                            carry no tokenizer: add --config.cond.tokenizer=AN_SDXL_FOLDER)
  --config=configs/ldm_sdxl.py:refiner      the refiner (OpenCLIP bigG only; micro-conditioning with the aesthetic
                                            score); combine: `:finetune,refiner`
  --config=configs/ldm_sdxl.py:tiny         the same structure in miniature (the architecture of
                                            tests/goldens/tiny_sdxl[_refiner]), 32 px (refiner 64), trains on a CPU; `:finetune,tiny`
The VAE and both text towers are frozen (--config.cond.text_trainable=True trains the towers too); data is an image
folder with captions (--config.data.path=DIR) whose sizes are recorded per image for the micro-conditioning
(data.record_sizes; --config.data.buckets=True adds aspect-ratio buckets). Caption dropout zeroes both towers'
outputs together (cond.drop_mode="zeros", SGM's ucg; see ldm_jax/training/text_conditioning.py).
Parameters and optimizer state per device for a mesh, before launching (shape-only, no weights read):
  python -m ldm_jax.memory --config=configs/ldm_sdxl.py:finetune --config.mesh=1,8,1
"""
import ml_collections

from ldm_jax.interop.sdxl import SCALE_FACTOR
from ldm_jax.models.autoencoder import VAE_PRESETS
from ldm_jax.models.text import SDXL_TEXT
from ldm_jax.models.unet import UNET_PRESETS
from ldm_jax.training.ldm import default_ldm_config

ARGS = ("finetune", "refiner", "tiny")


def _tiny_tower(act: str, projection: int | None) -> dict:
    """A 3-layer width-16 CLIP tower as SDXL uses it (penultimate layer, no final LayerNorm)."""
    return dict(vocab_size=668, width=16, layers=3, heads=2, mlp_dim=32, act=act, projection_dim=projection,
                output_layer=-2, final_norm=False)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = set(a for a in arg.split(",") if a)
    if args - set(ARGS):
        raise ValueError(f"unknown ldm_sdxl arguments {sorted(args - set(ARGS))}; use a comma-separated subset of {ARGS}")
    refiner = "refiner" in args
    c = default_ldm_config()
    c.image_size = 1024
    c.global_batch_size = 2048
    c.num_steps = 200_000
    c.dtype = "bfloat16"
    c.remat = "dots_no_batch"
    c.mesh = (1, -1, 1)  # FSDP over every device: 2.6B UNet params + AdamW moments + EMA do not fit replicated
    c.unet = dict(UNET_PRESETS["sdxl-refiner" if refiner else "sdxl-base"])
    c.first_stage.kwargs = dict(VAE_PRESETS["kl-f8"])
    c.first_stage.scale_factor = SCALE_FACTOR
    c.cond.type = "text"
    c.cond.text = {"encoders": {k: dict(v) for k, v in SDXL_TEXT["sdxl-refiner" if refiner else "sdxl-base"].items()}}
    c.cond.text_trainable = False
    c.cond.drop_prob = 0.1
    c.cond.drop_mode = "zeros"
    c.cond.micro_conditioning = "batch"
    c.cond.aesthetic_score = 6.0
    c.diffusion.schedule = "linear"  # sqrt-space linear 0.00085 -> 0.012 (diffusers "scaled_linear"), eps
    c.diffusion.linear_start, c.diffusion.linear_end = 0.00085, 0.012
    c.optim.lr = 1e-4
    c.optim.weight_decay = 0.01
    c.optim.schedule = "sd_linear"
    c.optim.warmup_steps = 10_000
    c.ema.decay = 0.9999
    c.checkpoint.every = 2000
    c.checkpoint.keep_period = 20_000
    c.data.source = "folder"
    c.data.resolution = c.image_size
    c.data.label_key = ""
    c.data.record_sizes = True
    c.sample.every = 2000
    c.sample.prompts = ["a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse"]
    c.sample.sampler, c.sample.schedule, c.sample.steps, c.sample.guidance_scale = "euler", "karras", 30, 5.0
    if "finetune" in args:
        c.global_batch_size = 64
        c.optim.lr = 1e-5
        c.optim.warmup_steps = 500
        c.num_steps = 20_000
    if "tiny" in args:
        c.image_size = c.data.resolution = 32
        c.global_batch_size = 2
        c.num_steps = 100
        c.dtype = "float32"
        c.remat = "none"
        c.mesh = (-1, 1, 1)
        tiny = dict(UNET_PRESETS["sdxl-tiny"])
        if refiner:  # tests/goldens/tiny_sdxl_refiner: four levels, attention in the middle two, bigG only
            c.image_size = c.data.resolution = 64  # 8x8 latents through three downsamplings
            tiny.update(model_channels=8, channel_mult=(1, 1, 2, 2), attention_resolutions=(2, 4), transformer_depth=2,
                        num_head_channels=8, context_dim=16, adm_in_channels=16 + 5 * 8)
        c.unet = tiny
        c.first_stage.kwargs = dict(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(), resolution=256,
                                    z_channels=4, embed_dim=4, norm_groups=8)
        towers = {"text_encoder": _tiny_tower("quick_gelu", None), "text_encoder_2": _tiny_tower("gelu", 16)}
        c.cond.text = {"encoders": {k: v for k, v in towers.items() if not refiner or k == "text_encoder_2"}}
        c.optim.warmup_steps = 0
        c.ema.decay = 0.999
        c.checkpoint.every = 50
        c.log_every = 10
        c.data.num_threads = 1
        c.sample.every = 0
        c.sample.steps = 4
    c.lock()
    return c
