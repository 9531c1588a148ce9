"""DreamBooth on Stable Diffusion v1/v2 (ldm_jax/training/dreambooth.py): full UNet fine-tune or LoRA.

  python -m ldm_jax.train --config=configs/dreambooth_sd1.py:lora --workdir=runs/sks_dog \
      --config.init_from=PATH/TO/sd15 --config.dreambooth.instance_dir=PATH/TO/dog_photos \
      --config.dreambooth.instance_prompt="a photo of sks dog" --config.dreambooth.class_prompt="a photo of dog"

With a class prompt, `num_class_images` class images are generated once from the base into
WORKDIR/class_images (a restart makes only the missing ones) and half of each batch is prior
preservation, weighted by `prior_loss_weight`. Arguments: "" (full fine-tune, diffusers' lr 5e-6),
"lora" (rank-8 attention LoRA, lr 1e-4), and "test" / "lora_test" (tiny settings for tests).
"""
import ml_collections

from ldm_jax.training.dreambooth import default_dreambooth_block
from ldm_jax.training.lora import sibling_config

ARGS = ("", "lora", "test", "lora_test")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ARGS:
        raise ValueError(f"unknown dreambooth_sd1 argument {arg!r}; use one of {ARGS}")
    lora = arg.startswith("lora")
    c = sibling_config(__file__, "lora_sd1").get_config("test" if arg.endswith("test") else "")
    with c.unlocked():
        c.objective = "dreambooth_lora" if lora else "dreambooth"
        c.dreambooth = default_dreambooth_block()
        c.dreambooth.lora = lora
        c.global_batch_size = 2  # diffusers' train_batch_size=1 instance + 1 class image
        c.num_steps = 400 if not arg.endswith("test") else 2
        c.optim.lr = 1e-4 if lora else 5e-6
        c.checkpoint.every = 200
        c.data.source = "dreambooth"  # the batches come from training/dreambooth.py, not the data package
        if arg.endswith("test"):
            c.dreambooth.num_class_images = 2
            c.dreambooth.class_sampler.steps = 2
            c.dreambooth.class_sampler.batch_size = 2
    c.lock()
    return c
