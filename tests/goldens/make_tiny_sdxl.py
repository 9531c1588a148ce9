"""Makes tests/goldens/tiny_sdxl/ and tiny_sdxl_refiner/ (random-weight SDXL base and refiner diffusers
folders) and tests/goldens/tiny_sdxl_ref.npz (what transformers/diffusers compute with them).

Needs torch + diffusers + transformers (requirements-dev.txt). Run from the repo root:
    python3 tests/goldens/make_tiny_sdxl.py [--refs-only]
The folders are what `StableDiffusionXLPipeline.save_pretrained` / `StableDiffusionXLImg2ImgPipeline`
write, in float16: the base UNet is ldm_jax's "sdxl-tiny" preset (no attention at the top level,
text_time conditioning, 4 GroupNorm groups), two 3-layer width-16 text towers (CLIPTextModel, quick_gelu,
padding with EOS; CLIPTextModelWithProjection, gelu, padding with "!"), an f8 VAE with scaling factor
0.13025, SDXL's EulerDiscrete scheduler. The refiner shares the base's VAE, text_encoder_2, tokenizer_2
and scheduler through symlinks (as the released refiner uses the same bigG tower and VAE) and has its
own UNet (attention at the middle two of four levels, depth 2, 5 micro-conditioning ids).
References are computed in float32 from the saved (float16-rounded) weights. Also writes
sdxl_param_counts.json: transformers' CLIP ViT-L/14 and OpenCLIP bigG/14 text towers (meta device).
"""
import json
import os
import pathlib
import shutil
import sys
import tempfile

import numpy as np
import torch

HERE = pathlib.Path(__file__).parent
BASE, REFINER = HERE / "tiny_sdxl", HERE / "tiny_sdxl_refiner"
sys.path.insert(0, str(HERE))
from make_tiny_sd import write_tokenizer  # noqa: E402

PROMPTS = ["a red circle on a white background", "two small blue squares"]
NEGATIVE = ["", "green"]
STEPS, GUIDANCE, SIZE = 4, 5.0, 32  # the pipeline goldens' image side (the UNet's sample_size gives 64)
SHARED = ("vae", "text_encoder_2", "tokenizer_2", "scheduler")


def _text(vocab: int, act: str, proj: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act=act, projection_dim=16,
                         bos_token_id=vocab - 2, eos_token_id=2, pad_token_id=1)
    return (CLIPTextModelWithProjection if proj else CLIPTextModel)(cfg)


def _perturb(*models) -> None:
    with torch.no_grad():  # random weights with a non-trivial scale, so that outputs depend on every tensor
        for m in models:
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))


def make_folders() -> None:
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    for d in (BASE, REFINER):
        if d.exists():
            shutil.rmtree(d)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = write_tokenizer(pathlib.Path(tmp))
        tok = CLIPTokenizer.from_pretrained(tmp)
        tok_2 = CLIPTokenizer.from_pretrained(tmp, pad_token="!")
        slow = {f.name: f.read_bytes() for f in pathlib.Path(tmp).iterdir() if f.name in ("vocab.json", "merges.txt")}
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(1, 2, 4),
        transformer_layers_per_block=(1, 1, 1), cross_attention_dim=32, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
        norm_num_groups=4,
    )
    refiner_unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 1, 2, 2), transformer_layers_per_block=2, cross_attention_dim=16,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 5 * 8, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
        sample_size=64, scaling_factor=0.13025, force_upcast=True,
    )
    text, text_2 = _text(vocab, "quick_gelu", False), _text(vocab, "gelu", True)
    _perturb(unet, refiner_unet, vae, text, text_2)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                       prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False)
    base = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok,
                                     tokenizer_2=tok_2, unet=unet, scheduler=scheduler)
    base.to(torch.float16).save_pretrained(str(BASE))
    refiner = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=text_2, tokenizer=None,
                                               tokenizer_2=tok_2, unet=refiner_unet, scheduler=scheduler,
                                               requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    refiner.to(torch.float16).save_pretrained(str(REFINER))
    for name in ("tokenizer", "tokenizer_2"):  # the slow-tokenizer files older tools read, next to tokenizer.json
        for f, data in slow.items():
            (BASE / name / f).write_bytes(data)
    for name in SHARED:
        shutil.rmtree(REFINER / name)
        os.symlink(os.path.join("..", BASE.name, name), REFINER / name)


def _ids(tok, texts):
    return tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def make_refs() -> dict:
    from diffusers import (DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline)

    base = StableDiffusionXLPipeline.from_pretrained(str(BASE), torch_dtype=torch.float32)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(REFINER), torch_dtype=torch.float32)
    for p in (base, refiner):
        p.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    out: dict = {}
    with torch.no_grad():
        # the two text towers: SDXL takes hidden_states[-2] (no final LayerNorm) and bigG's text_embeds
        ids, ids_2 = _ids(base.tokenizer, PROMPTS), _ids(base.tokenizer_2, PROMPTS)
        h1 = base.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        o2 = base.text_encoder_2(ids_2, output_hidden_states=True)
        out.update(ids=ids.numpy(), ids_2=ids_2.numpy(), hidden=h1.numpy(), hidden_2=o2.hidden_states[-2].numpy(),
                   text_embeds=o2.text_embeds.numpy())
        # the UNets on random inputs
        for name, p, ctx, n_ids in (("unet", base, 32, 6), ("refiner_unet", refiner, 16, 5)):
            x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)  # (the refiner needs a multiple of 8)
            c = rng.standard_normal((2, 7, ctx)).astype(np.float32)
            pooled = rng.standard_normal((2, 16)).astype(np.float32)
            time_ids = np.array([[64, 64, 0, 0, 64, 64], [96, 80, 8, 16, 64, 64]], np.float32)[:, :n_ids]
            if n_ids == 5:
                time_ids[:, 4] = [6.0, 2.5]
            t = np.array([10, 700], np.int64)
            y = p.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(c),
                       added_cond_kwargs={"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)}).sample
            out.update({f"{name}_x": x.transpose(0, 2, 3, 1), f"{name}_t": t, f"{name}_context": c,
                        f"{name}_pooled": pooled, f"{name}_time_ids": time_ids, f"{name}_out": y.numpy().transpose(0, 2, 3, 1)})
        # the whole pipeline: DDIM (SD settings) and the folder's Euler, default force_zeros negatives and given ones
        latents = rng.standard_normal((2, 4, SIZE // 8, SIZE // 8)).astype(np.float32)
        out["latents"] = latents.transpose(0, 2, 3, 1)
        euler = base.scheduler
        # DDIM swapped in from the folder's Euler config (which has no set_alpha_to_one: DDIM's default True)
        ddim = DDIMScheduler.from_config(base.scheduler.config, clip_sample=False)
        for sched_name, sched in (("ddim", ddim), ("euler", euler)):
            base.scheduler = sched
            for neg_name, neg in (("zeros", None), ("neg", NEGATIVE)):
                # the pipeline scales the given latents by init_noise_sigma (Euler "leading": sqrt(1 + σ_max²))
                img = base(PROMPTS, negative_prompt=neg, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                           latents=torch.from_numpy(latents), height=SIZE, width=SIZE, output_type="np").images
                out[f"images_{sched_name}_{neg_name}"] = np.asarray(img, np.float32)
        base.scheduler = EulerDiscreteScheduler.from_config(euler.config)
        # micro-conditioning that differs from the defaults
        img = base(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(latents), height=SIZE,
                   width=SIZE, original_size=(128, 96), crops_coords_top_left=(8, 16), target_size=(64, 64),
                   output_type="np").images
        out["images_euler_micro"] = np.asarray(img, np.float32)
        # base -> refiner hand-off at 0.5 of the schedule (diffusers' "ensemble of expert denoisers")
        # at 64 px: the refiner's four levels need latents divisible by 8
        noise = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
        out["handoff_noise"] = noise.transpose(0, 2, 3, 1)
        z = base(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(noise), height=64,
                 width=64, denoising_end=0.5, output_type="latent").images
        refiner.scheduler = EulerDiscreteScheduler.from_config(euler.config)
        img = refiner(PROMPTS, image=z, num_inference_steps=STEPS, guidance_scale=GUIDANCE, denoising_start=0.5,
                      output_type="np").images
        out["handoff_latents"] = z.numpy().transpose(0, 2, 3, 1)
        out["images_handoff"] = np.asarray(img, np.float32)
    out["meta"] = json.dumps(dict(prompts=PROMPTS, negative_prompts=NEGATIVE, steps=STEPS, guidance_scale=GUIDANCE,
                                  size=SIZE))
    return out


def _count(cls, cfg) -> int:
    with torch.device("meta"):
        m = cls(cfg)
    return sum(p.numel() for p in m.parameters())


def param_counts() -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # text_encoder / text_encoder_2 config.json of stabilityai/stable-diffusion-xl-base-1.0
    clip_l = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
    big_g = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
    return {"text_encoder": _count(CLIPTextModel, clip_l), "text_encoder_2": _count(CLIPTextModelWithProjection, big_g)}


def main() -> None:
    torch.set_num_threads(2)
    if "--refs-only" not in sys.argv:  # the folders are committed; --refs-only recomputes only the references
        make_folders()
    refs = make_refs()
    np.savez_compressed(HERE / "tiny_sdxl_ref.npz", **refs)
    counts = param_counts()
    (HERE / "sdxl_param_counts.json").write_text(json.dumps(counts, indent=1) + "\n")
    total = 0
    for f in sorted(list(BASE.rglob("*")) + list(REFINER.rglob("*")) + [HERE / "tiny_sdxl_ref.npz"]):
        if f.is_file() and not any(p.is_symlink() for p in [f, *f.parents]):
            total += f.stat().st_size
            print(f.relative_to(HERE), f.stat().st_size)
    print("total", total, "bytes; text param counts", counts)


if __name__ == "__main__":
    main()
