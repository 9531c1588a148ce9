"""The CompVis KL-f4 first stage: LDM `autoencoder_kl_64x64x3.yaml` (256 px -> 64x64x3 latents).

ch 128, ch_mult (1,2,4), 2 res blocks, z 3; otherwise the KL-f8 recipe (configs/autoencoder_kl_f8.py):
disc_start 50001, kl_weight 1e-6, disc_weight 0.5, Adam (0.5, 0.9), lr 4.5e-6 x batch, batch 12 x 2.
"""
import importlib.util
import pathlib

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("autoencoder_kl_f8", pathlib.Path(__file__).with_name("autoencoder_kl_f8.py"))
    kl_f8 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kl_f8)
    c = kl_f8.recipe("kl-f4", arg)
    c.lock()
    return c
