"""The CompVis VQ-f4 first stage (the LDM paper's CelebA-HQ/FFHQ/LSUN/ImageNet LDM-4 models):
`models/first_stage_models/vq-f4/config.yaml` (256 px -> 64x64x3 latents, codebook 8192).

ch 128, ch_mult (1,2,4), 2 res blocks, z 3, n_embed 8192; taming's VQLPIPSWithDiscriminator with
disc_start 0 (the discriminator acts from the first step), disc_weight 0.75, codebook_weight 1.0, mean L1 +
LPIPS (no logvar); Adam (0.5, 0.9), base_lr 4.5e-6 x batch. The released config has no data section; the
batch (12) follows the KL first stages.
"""
import importlib.util
import pathlib

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("autoencoder_kl_f8", pathlib.Path(__file__).with_name("autoencoder_kl_f8.py"))
    kl_f8 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kl_f8)
    c = kl_f8.recipe("vq-f4", arg)
    if "small" not in arg:
        c.global_batch_size = 12
    c.loss.update(disc_start=0, disc_weight=0.75, codebook_weight=1.0)
    c.lock()
    return c
