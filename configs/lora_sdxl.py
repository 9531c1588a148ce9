"""LoRA fine-tuning of SDXL base / refiner (objective "lora", ldm_jax/training/lora.py).

  python -m ldm_jax.train --config=configs/lora_sdxl.py --workdir=runs/my_sdxl_lora \
      --config.init_from=PATH/TO/sdxl-base --config.data.path=PATH/TO/images

PATH/TO/sdxl-base: a diffusers SDXL folder (unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/) or
a Stability single file (then also --config.cond.tokenizer=AN_SDXL_FOLDER). The UNet, VAE, both text towers, the
noise schedule and the VAE scale come from the base; the images folder holds captions (<image>.txt or
metadata.jsonl) and each image's size is recorded for SDXL's micro-conditioning (configs/ldm_sdxl.py). Only the
UNet's adapters are trained (rank 8, alpha 8, attention projections by default; the text towers stay frozen, as
in diffusers' train_text_to_image_lora_sdxl.py), checkpointed with their EMA and AdamW state; export with
`LoraLDMObjective.export_lora` (diffusers/peft or kohya: `lora_unet_…`).
Arguments: "" (1024 px), "refiner" (the refiner's base), "tiny" (tests/goldens/tiny_sdxl at 32 px, for tests).
  --config.lora.rank=16 --config.lora.unet_targets=attn,ff,proj,conv   (the base is held in bf16: lora.base_dtype)
"""
import ml_collections

from ldm_jax.training.lora import default_lora_block, sibling_config

ARGS = ("refiner", "tiny")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = set(a for a in arg.split(",") if a)
    if args - set(ARGS):
        raise ValueError(f"unknown lora_sdxl arguments {sorted(args - set(ARGS))}; use a comma-separated subset of {ARGS}")
    c = sibling_config(__file__, "ldm_sdxl").get_config(",".join(["finetune", *sorted(args)]))
    with c.unlocked():
        c.objective = "lora"
        c.lora = default_lora_block()
        if "tiny" not in args:
            c.lora.base_dtype = "bfloat16"  # the frozen 2.6B UNet in bf16 (it computes in bf16); adapters + AdamW fp32
        c.first_stage.checkpoint = ""  # "" = init_from
        c.cond.text_checkpoint = ""
        c.cond.tokenizer = ""
        c.cond.drop_prob = 0.0  # diffusers' LoRA recipe drops no captions
        c.global_batch_size = 4 if "tiny" not in args else 2
        c.num_steps = 2000 if "tiny" not in args else 2
        c.optim.lr = 1e-4  # diffusers' LoRA default
        c.optim.schedule = "constant"
        c.optim.warmup_steps = 0
        c.optim.weight_decay = 1e-2
        c.ema.decay = 0.999
        c.checkpoint.every = 500 if "tiny" not in args else 1
        c.checkpoint.keep_period = 0
        c.sample.every = 0
    c.lock()
    return c
