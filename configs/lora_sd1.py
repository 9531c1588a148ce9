"""LoRA fine-tuning of Stable Diffusion v1/v2 (objective "lora", ldm_jax/training/lora.py).

  python -m ldm_jax.train --config=configs/lora_sd1.py --workdir=runs/my_lora \
      --config.init_from=PATH/TO/sd15 --config.data.path=PATH/TO/images

PATH/TO/sd15: a diffusers folder (its tokenizer/ is used) or an SD .safetensors single file (then also
--config.cond.tokenizer=CLIP_TOKENIZER_FOLDER). The images folder holds captions in <image>.txt or a
metadata.jsonl. The models, the noise schedule and the VAE scale come from the base; only the adapters
(rank 8, alpha 8, the UNet's attention projections by default) are trained and checkpointed with
their EMA and AdamW state. Arguments: "" (512 px) or "test" (tiny settings for tests/test_configs).
  --config.lora.rank=16 --config.lora.unet_targets=attn,ff,proj,conv   (LoCon: conv)
  --config.lora.text_targets=attn,mlp                                   (also the text encoder)
  --config.lora.base_dtype=bfloat16                                     (hold the frozen base in bf16)
"""
import ml_collections

from ldm_jax.training.lora import default_lora_block, sibling_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "test"):
        raise ValueError(f"unknown lora_sd1 argument {arg!r}; use '' or 'test'")
    c = sibling_config(__file__, "ldm_f8").get_config("finetune")
    with c.unlocked():
        c.objective = "lora"
        c.lora = default_lora_block()
        c.first_stage.checkpoint = ""  # "" = init_from
        c.cond.text_checkpoint = ""
        c.cond.tokenizer = ""
        c.cond.drop_prob = 0.0  # LoRA recipes (diffusers train_text_to_image_lora) do not drop captions
        c.global_batch_size = 4
        c.num_steps = 2000
        c.dtype = "float32"
        c.optim.lr = 1e-4  # diffusers' LoRA default
        c.optim.schedule = "constant"
        c.optim.warmup_steps = 0
        c.optim.weight_decay = 1e-2
        c.ema.decay = 0.999
        c.checkpoint.every = 500
        c.checkpoint.keep_period = 0
        c.sample.every = 0
        c.data.source = "folder"
        if arg == "test":
            c.image_size = 32
            c.data.resolution = 32
            c.global_batch_size = 2
            c.num_steps = 2
            c.remat = "none"
            c.mesh = (1, 1, 1)
    c.lock()
    return c
