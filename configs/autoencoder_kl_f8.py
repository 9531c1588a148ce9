"""The CompVis KL-f8 first stage (Stable Diffusion's VAE): LDM `autoencoder_kl_32x32x4.yaml`.

  python -m ldm_jax.train --config=configs/autoencoder_kl_f8.py --workdir=DIR \\
      --config.data.path=IMAGES --config.loss.lpips_weights=vgg16-397923af.pth,lpips_vgg_v0.1.pth

Recipe: ch 128, ch_mult (1,2,4,4), 2 res blocks, z 4 (256 px -> 32x32x4); LPIPSWithDiscriminator with
disc_start 50001, kl_weight 1e-6, disc_weight 0.5; Adam (0.5, 0.9), base_lr 4.5e-6 scaled by the batch
(LDM's scale_lr); batch 12 with 2 accumulated batches there -> one global batch of 24 here (the objective
does not accumulate). The reference trained on OpenImages; point data.path at an image folder (or set
data.source="tfds", data.name=...). 1% of the training split is held out for PSNR/SSIM.
`:small` shrinks it for a smoke run at 64 px.
"""
import ml_collections

from ldm_jax.training.autoencoder import default_autoencoder_config


def recipe(preset: str, arg: str) -> ml_collections.ConfigDict:
    """The shared LDM first-stage recipe (KL or VQ by preset); `arg` may be "small"."""
    args = set(a for a in arg.split(",") if a)
    if args - {"small"}:
        raise ValueError(f"unknown arguments {sorted(args - {'small'})}; use small")
    c = default_autoencoder_config(preset)
    c.data.source = "folder"
    c.data.resolution = 256
    c.data.train_split = "train[:99%]"
    c.eval.update(every=1000, split="train[99%:]", batch_size=8, num_batches=8, grid_images=8)
    c.global_batch_size = 24
    c.num_steps = 500_000
    c.log_every = 100
    c.checkpoint.update(every=5000, keep=3, keep_period=50_000)
    c.optim.update(lr=4.5e-6, scale_lr=True)  # lr = 4.5e-6 * global batch
    c.loss.update(disc_start=50001, kl_weight=1e-6, disc_weight=0.5, perceptual_weight=1.0)
    if "small" in args:
        c.data.resolution = 64
        c.global_batch_size = 8
        c.model.overrides = dict(ch=32)
        c.eval.update(every=200, batch_size=8, num_batches=1)
    return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = recipe("kl-f8", arg)
    c.lock()
    return c
