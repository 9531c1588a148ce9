"""A tiny text-conditional LDM that trains on a CPU (tests, smoke runs, the built-in shapes data).

  --config=configs/ldm_tiny.py            tiny UNet + tiny KL first stage + jointly trained tiny text encoder
  --config=configs/ldm_tiny.py:test       a few-thousand-parameter variant used by the tests (16x16 images)
  --config=configs/ldm_tiny.py:class      class-conditional instead of text (labels of the data)
  --config=configs/ldm_tiny.py:none       unconditional
Arguments combine with commas: `:test,class`.
"""
import ml_collections

from ldm_jax.training.ldm import default_ldm_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = set(a for a in arg.split(",") if a)
    unknown = args - {"test", "class", "none"}
    if unknown:
        raise ValueError(f"unknown ldm_tiny arguments {sorted(unknown)}; use test, class, none")
    c = default_ldm_config()
    c.image_size = 32
    c.global_batch_size = 8
    c.num_steps = 2000
    c.log_every = 50
    c.unet = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(2,), num_heads=-1, num_head_channels=32, transformer_depth=1,
                  context_dim=64, use_linear_in_transformer=True)
    c.first_stage.kwargs = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), resolution=32,
                                z_channels=4, embed_dim=4)
    c.first_stage.scale_by_std = True
    c.cond.text = dict(vocab_size=1000, width=64, layers=2, heads=4, mlp_dim=128, max_length=16, act="gelu",
                       causal=False)
    c.cond.text_trainable = True  # LDM-KL-8-G style: the text encoder is trained jointly from scratch
    c.cond.tokenizer = "train"  # a BPE learned from the captions, kept as WORKDIR/tokenizer.json
    c.optim.lr = 2e-4
    c.optim.weight_decay = 0.0
    c.ema.decay = 0.999
    c.checkpoint.every = 500
    if "test" in args:
        c.image_size = c.data.resolution = 8
        c.global_batch_size = 16
        # every optional piece of the objective on, so that the tests exercise them
        c.optim.grad_accum = 2
        c.cond.drop_prob = 0.25
        c.diffusion.min_snr_gamma = 5.0
        c.diffusion.offset_noise = 0.05
        c.diffusion.learn_logvar = True
        c.unet.channel_mult = (1,)
        c.unet.attention_resolutions = (1,)
        c.unet.context_dim = 32
        c.first_stage.kwargs.ch_mult = (1,)  # no downsampling: 8x8 images -> 8x8x4 latents
        c.first_stage.kwargs.resolution = 8
        c.first_stage.kwargs.mid_attn = False
        c.first_stage.checkpoint = "random"
        c.cond.tokenizer = ""  # the tests feed token ids directly
        c.cond.text = dict(vocab_size=64, width=32, layers=1, heads=2, mlp_dim=32, max_length=8, act="gelu",
                           causal=False)
        c.progress = False
        c.log_every = 1
        c.checkpoint.every = 2
    if "class" in args:
        c.cond.type = "class"
        c.cond.num_classes = 10
    if "none" in args:
        c.cond.type = "none"
        c.cond.drop_prob = 0.0
        c.unet.context_dim = None
        c.unet.use_spatial_transformer = False
    c.lock()
    return c
