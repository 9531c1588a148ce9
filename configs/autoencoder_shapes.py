"""A small KL autoencoder for the built-in `shapes` dataset at 32x32 (f4: 8x8x4 latents), trains on a CPU.

  --config=configs/autoencoder_shapes.py         the preset (~1M parameters, 4k steps)
  --config=configs/autoencoder_shapes.py:test    the CI variant: tiny dataset and model, no discriminator

The perceptual (LPIPS) weight is 0 because LPIPS weights cannot be downloaded here (a warning says so at start);
give them with --config.loss.perceptual_weight=1 --config.loss.lpips_weights=VGG16.pth,HEADS.pth.
"""
import ml_collections

from ldm_jax.training.autoencoder import default_autoencoder_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = set(a for a in arg.split(",") if a)
    if args - {"test"}:
        raise ValueError(f"unknown autoencoder_shapes arguments {sorted(args - {'test'})}; use test")
    c = default_autoencoder_config("tiny")
    c.global_batch_size = 16
    c.num_steps = 4000
    c.log_every = 100
    c.checkpoint.every = 1000
    c.data.resolution = 32
    c.loss.perceptual_weight = 0.0
    c.loss.disc_start = 2001
    c.loss.disc_ndf = 32
    c.optim.lr = 1e-3
    c.eval.update(every=500, split="test", batch_size=16, num_batches=4, grid_images=8)
    if "test" in args:
        c.data.shapes.num_train = 256
        c.data.shapes.num_test = 32
        c.data.shapes.num_heldout = 16
        c.data.num_threads = 1
        c.global_batch_size = 8
        c.num_steps = 200
        c.model.overrides = dict(ch=16, norm_groups=8)  # a quarter of the preset's compute
        c.loss.disc_factor = 0.0  # the GAN path is checked by a separate one-step test
        c.eval.update(every=0, batch_size=16, num_batches=2, grid_images=4)
        c.checkpoint.update(every=1000, async_save=False)
        c.progress = False
        c.log_every = 50
    c.lock()
    return c
