"""The README's main job: both stages on the built-in `shapes` dataset from one command, on a 2-core CPU.

  python -m ldm_jax.train --config=configs/shapes.py --workdir=/tmp/shapes

Stage 1 trains a KL-f4 autoencoder (32x32 images -> 8x8x4 latents) into WORKDIR/first_stage; stage 2
trains a text-conditional LDM on its latents, with a text encoder trained jointly from scratch on a BPE
tokenizer learned from the captions (WORKDIR/tokenizer.json). The run ends by sampling captions of
held-out (color, shape) pairs, pairs never shown in training, and scoring the samples with the dataset's
classifier (WORKDIR/eval.json, printed, TensorBoard eval/...): the accuracy of every caption attribute
(color, shape, size, position, background) on held-out pairs and on fresh captions of trained pairs. A sample grid
of held-out prompts lands in WORKDIR/samples/ and TensorBoard logs in WORKDIR (and WORKDIR/first_stage).

  --config=configs/shapes.py:smoke    a few steps of each stage (the CI smoke run, tiny models)
"""
import importlib.util
import pathlib

import ml_collections

from ldm_jax.data.shapes import ShapesSpec, heldout_prompts
from ldm_jax.training.ldm import default_ldm_config


def _autoencoder_config(arg: str) -> ml_collections.ConfigDict:
    path = pathlib.Path(__file__).with_name("autoencoder_shapes.py")
    spec = importlib.util.spec_from_file_location("autoencoder_shapes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = set(a for a in arg.split(",") if a)
    if args - {"smoke"}:
        raise ValueError(f"unknown shapes arguments {sorted(args - {'smoke'})}; use smoke")
    smoke = "smoke" in args

    # ---- stage 1: the autoencoder (configs/autoencoder_shapes.py, shortened: flat colors are easy)
    ae = _autoencoder_config("test" if smoke else "")
    with ae.unlocked():
        ae.data.flip = False
        ae.num_steps = 4 if smoke else 3200
        # A space-to-depth stem (model.patch_size=4, ch_mult=(1,)): the encoder folds each 4x4 pixel patch into 48
        # channels and the decoder predicts 4x4 pixels per latent cell, so the whole trunk runs at 8x8 with 64
        # channels instead of at 32/16/8 px with 16/32/32 (LDM's trunk): 42 vs 97 ms per step, and it keeps as much
        # at equal steps (step 800: shape kept 62 vs 58%, PSNR 26.1 vs 26.1 dB; README)
        ae.model.overrides = dict(ch=16 if smoke else 64, ch_mult=(1,), num_res_blocks=1, patch_size=4, norm_groups=8,
                                  z_channels=4 if smoke else 8, embed_dim=4 if smoke else 8)
        if not smoke:
            # 8 latent channels, not 4: the UNet's cost at 8x8 barely changes, and the first stage keeps the small
            # shapes sooner (measured at step 400: color kept 17% vs 0%; README)
            # Decode the posterior mean, not a sample: a sample's noise (std ~1 at init) drowned the shapes for the
            # first ~1000 steps. Measured at step 1600: shape kept 91% vs 77%, color 100% vs 98% (README); stage 2
            # reads the mean too (first_stage.sample_posterior=False).
            ae.loss.sample_posterior = False
        ae.loss.disc_start = 10**9  # no GAN, no LPIPS: flat colors need neither, and the stage stays short
        ae.loss.disc_factor = 0.0
        # L2, not LDM's L1: L1's optimum for an uncertain pixel is the median, i.e. the background, so a small
        # model trained for minutes drops the 6-10 px shapes (0% of reconstructions kept the shape's color
        # after 800 steps); L2 with Adam b1=0.9 keeps ~100% by 1200 steps (measured, see the closing note).
        ae.loss.pixel_loss = "l2"
        ae.optim.b1 = 0.9
        # 3200 steps at a peak lr of 2e-3 with a cosine decay (was 1600 at a constant 1e-3): the first stage limits the
        # LDM's shape accuracy. Kept on 128 test / held-out images: shape 85 / 81% (1600 constant: 79 / 78%); stage 2
        # on it: in-distribution shape 67.7-71.9% (on a 1600-step first stage: 58.3%; README)
        ae.optim.update(lr=2e-3, schedule="ldm_cosine", warmup_steps=1 if smoke else 50, decay_steps=ae.num_steps,
                        f_start=0.01, f_min=0.02)
        # PSNR + attributes kept, at the end, on the test split and on the held-out pairs' images
        ae.eval.update(every=ae.num_steps, batch_size=16, num_batches=8, extra_splits=("heldout",))
        # Every image in a random RGB channel order: the train split has no red triangle, green square or blue circle
        # (the LDM's held-out pairs), and without this the first stage kept the shape of only 50% of those images'
        # reconstructions (84% of the trained pairs'); with it 82% (80%). Stage 2 still never sees those pairs.
        ae.augment.permute_channels = True
        ae.checkpoint.update(every=ae.num_steps, async_save=False)
        ae.progress = not smoke
        ae.log_every = 2 if smoke else 100
    ae_kwargs = _ae_kwargs(ae)

    # ---- stage 2: the text-conditional LDM
    c = default_ldm_config()
    c.first_stage_train = ae
    c.image_size = 32
    c.data.resolution = 32
    c.data.flip = False  # a flip would turn "at the left" into a shape on the right
    c.data.crop = "center"
    c.data.label_key = ""
    c.global_batch_size = 32
    c.num_steps = 1800
    # Two CPU devices and a data-parallel mesh (each device's half batch on its own core): on a 2-core machine the
    # stage-1 step ran 39.7 vs 50.8 ms (alternating runs) and the LDM step 209 vs 250 ms (AMD EPYC family 25 model 17,
    # avx512f; README); 4 devices on 2 cores were slower than 2.
    # Both stages run in this process, so both get it; ignored on GPUs / TPUs.
    c.cpu_devices = 2
    c.log_every = 100
    c.first_stage.kwargs = ae_kwargs
    c.first_stage.scale_by_std = True
    c.first_stage.sample_posterior = False
    # channel_mult (1, 1), not (1, 2): 64 channels at 4x4 too, ~35% less per step (bench: 260-304 vs 393-473 ms on
    # an AMD EPYC) and equal scores within noise on one first stage (in-distribution shape 67.7 vs 71.9%; README)
    c.unet = dict(in_channels=ae_kwargs["embed_dim"], out_channels=ae_kwargs["embed_dim"], model_channels=64,
                  channel_mult=(1, 1), num_res_blocks=1, attention_resolutions=(1, 2), num_heads=-1,
                  num_head_channels=32, transformer_depth=1, context_dim=64, use_linear_in_transformer=True,
                  coordinate_frequencies=4)  # absolute position for the position words (see below)
    c.cond.type = "text"
    c.cond.tokenizer = "train"  # a byte-level BPE trained on the captions, kept as WORKDIR/tokenizer.json
    c.cond.text = dict(vocab_size=640, width=64, layers=2, heads=4, mlp_dim=128, max_length=16, act="gelu",
                       causal=False)
    c.cond.text_trainable = True
    # The pooled caption (the text encoder's output at EOS) projected and added to the time embedding, beside the
    # cross-attention: every res block then sees the whole caption (GLIDE / Imagen add their pooled text the same
    # way; `adm_in_channels` = the pooled width: no SDXL micro-conditioning ids). Paired on one first stage, 3
    # sampling seeds each (session 15, README): held-out shape 66.0 vs 36.8%, in-distribution shape 76.4 vs 65.3%;
    # large circles, drawn as squares without it, came out right in 86 / 77% of the samples (14 / 38% without).
    c.unet.adm_in_channels = c.cond.text.width
    # 8 GroupNorm groups in the UNet (8 channels each), not SD's 32 (2 each at 64 channels): a ResBlock adds the time
    # embedding (timestep + pooled caption) per channel right before a GroupNorm, which removes each group's mean, so
    # with 2 channels per group only the difference of each pair got through. With the pooled caption, paired on one
    # first stage, 3 sampling seeds each (session 15, README): in-distribution shape 82.6 vs 76.4%, held-out shape
    # 73.6 vs 66.0% (without either: 65.3 / 36.8%).
    c.unet.norm_num_groups = 8
    c.cond.drop_prob = 0.1  # for classifier-free guidance
    # Position ("at the top left") is decided at the highest noise levels, where the noisy latent shows nothing and
    # only the text can say where the shape goes; measured (closing note, session 5), each of these was needed for
    # the samples to follow the position words at all (before: position at chance, 11%):
    #  - v-prediction on a zero-terminal-SNR schedule (Lin et al. 2023): at t = T the model must draw the image from
    #    the text alone (with SD's schedule the last step still leaks the layout of the training image);
    #  - no min-SNR weighting (with v it weights t -> T by SNR/(SNR+1) -> 0) and logit-normal timesteps centred at
    #    high noise (SD3's sampling; loc 1.5: 41% of the batch at t > 850, uniform 15%). Session 6, 1200-step runs on
    #    one first stage: loc 0.5 / 1.0 / 1.5 / 2.0 gave in-distribution position 18 / 94 / 100 / 98%, shape
    #    31 / 40 / 53 / 51%, color 85 / 93 / 90 / 83% (README);
    #  - coordinate features in the UNet (unet.coordinate_frequencies) and a peak lr of 5e-4: the text -> place map
    #    at t = T learned within 400 steps at 5e-4, not at all at 2e-3 (last round's lr) and slower at 1e-3.
    # The cosine ends at half the peak (f_min 0.5, was 0.05): shape is still being learned at the end. Paired seeds on one
    # first stage (192 + 48 samples each): in-distribution shape 69.8 / 64.6% vs 66.7 / 52.6%, held-out 68.8 / 60.4%
    # vs 56.2 / 50.0% (README, session 8; the seed-to-seed spread of one recipe is about +-7 points).
    c.optim.update(lr=5e-4, schedule="ldm_cosine", warmup_steps=100, decay_steps=c.num_steps, f_start=0.01,
                   f_min=0.5)
    c.optim.weight_decay = 0.0
    c.diffusion.update(prediction="v", zero_terminal_snr=True, min_snr_gamma=0.0, timestep_sampling="logit_normal",
                       timestep_loc=1.5, timestep_scale=1.0)
    c.ema.decay = 0.999
    c.checkpoint.update(every=1000, async_save=True)
    spec = ShapesSpec()
    # One sampler program for the sample grid, the FID/KID hook and the final eval: the same sampler, step count and
    # batch (`sampler_batch` images per call), so it is compiled once per run and then loaded from the persistent
    # compilation cache (ldm_jax/compile_cache.py; each of the three builds its own pipeline). Measured: each
    # distinct sampler program cost 50-65 s of compiling under load.
    # Guidance 2 (was 4): re-scoring one trained run at 1 / 1.5 / 2 / 3 / 4 gave in-distribution shape
    # 55 / 62.5 / 61.5 / 46 / 50% and held-out color 94 / 94 / 94 / 94 / 87.5% (README).
    sampler_batch, sampling = 48, dict(sampler="dpmpp_2m", schedule="karras", steps=20, guidance_scale=2.0)
    per_pair = sampler_batch // len(spec.heldout)
    c.sample.update(every=c.num_steps, prompts=heldout_prompts(spec, per_pair=per_pair, seed=99), seed=0,
                    **sampling)
    # A sample-quality curve in TensorBoard (eval/fid_first_stage, WORKDIR/metrics.jsonl): FID/KID of EMA samples
    # of test captions vs the test split, in the feature space of the run's own first-stage encoder (offline; NOT
    # comparable with Inception-FID). With the FID Inception weights: eval.metrics=fid,kid, eval.inception=PATH.
    c.eval.update(every=c.num_steps // 2, num_samples=sampler_batch, metrics="fid_first_stage,kid_first_stage",
                  prompts_from="data:test", split="test", batch_size=sampler_batch, **sampling)
    # scored at the end of the run (ldm_jax.evaluation): every caption attribute on per_pair samples of each
    # held-out pair and on `in_distribution` fresh captions of trained pairs (16 * 3 + 96 = 3 batches)
    c.final_eval = dict(kind="shapes", per_pair=16, in_distribution=96, seed=0, batch_size=sampler_batch, **sampling)
    if smoke:
        c.global_batch_size = 8
        c.num_steps = 4
        c.optim.update(warmup_steps=1, decay_steps=4)
        c.log_every = 2
        c.progress = False
        c.unet.update(model_channels=32, attention_resolutions=(2,))
        c.cond.text.update(width=32, layers=1, heads=2, mlp_dim=32)
        c.unet.context_dim = 32
        c.unet.adm_in_channels = c.cond.text.width
        c.data.shapes.num_train = 256
        c.data.shapes.num_test = 32
        c.data.shapes.num_heldout = 16
        c.data.num_threads = 1
        c.checkpoint.update(every=4, async_save=False)
        # one sampler program of batch 6 for all three (see above)
        c.sample.update(every=4, prompts=heldout_prompts(spec, per_pair=2), steps=2)
        c.final_eval.update(per_pair=2, in_distribution=6, steps=2, batch_size=6)
        c.eval.update(every=4, num_samples=6, steps=2, batch_size=6)
    c.lock()
    return c


def _ae_kwargs(ae: ml_collections.ConfigDict) -> dict:
    """The autoencoder kwargs stage 1 trains (its preset + overrides), which stage 2 must build the same way."""
    from ldm_jax.models.autoencoder import VAE_PRESETS

    kwargs = {**VAE_PRESETS[ae.model.preset], **dict(ae.model.overrides)}
    kwargs["resolution"] = int(ae.data.resolution)
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in kwargs.items()}
