"""Makes tests/goldens/pipeline_ddim.npz: diffusers' StableDiffusionPipeline + DDIMScheduler on tiny_sd/.

Needs torch + diffusers (requirements-dev.txt). Run from the repo root after tests/goldens/tiny_sd/
exists (a random-weight diffusers SD folder, made by make_pretrained_goldens.py):
    python3 tests/goldens/make_pipeline_goldens.py
The scheduler is DDIM with Stable Diffusion's settings (scaled_linear 0.00085..0.012, steps_offset 1,
set_alpha_to_one False, "leading" spacing, eta 0). The file holds the prompts, the initial latents
(unit Gaussian, what diffusers scales by init_noise_sigma = 1), and the float images in [0, 1].
pipeline_ddim_steps.npz: the final latents of DDIM with the folder's scheduler config for 7, 15, 30
and 50 steps (counts that do not all divide 1000), and diffusers' timesteps for each.
"""
import json
import pathlib

import numpy as np
import torch

OUT = pathlib.Path(__file__).parent
TINY = OUT / "tiny_sd"

PROMPTS = ["a red circle on a white background", "two small blue squares"]
NEGATIVE = ["", "green"]
STEPS, GUIDANCE = 4, 7.5
STEP_COUNTS = (7, 15, 30, 50)


def main() -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(TINY), safety_checker=None, requires_safety_checker=False,
                                                   dtype=torch.float32)
    pipe.scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
    )
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    c = pipe.unet.config.in_channels
    latents = np.random.default_rng(0).standard_normal((len(PROMPTS), c, size // pipe.vae_scale_factor,
                                                        size // pipe.vae_scale_factor)).astype(np.float32)
    with torch.no_grad():
        images = pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      eta=0.0, latents=torch.from_numpy(latents), height=size, width=size, output_type="np").images
    meta = dict(prompts=PROMPTS, negative_prompts=NEGATIVE, steps=STEPS, guidance_scale=GUIDANCE, size=size)
    np.savez_compressed(OUT / "pipeline_ddim.npz", latents=latents.transpose(0, 2, 3, 1),
                        images=np.asarray(images, np.float32), meta=json.dumps(meta))
    print(OUT / "pipeline_ddim.npz", (OUT / "pipeline_ddim.npz").stat().st_size, "bytes;", meta)
    # the step counts that do not divide 1000 (issue 18): the scheduler built from the folder's own
    # config ("leading", steps_offset 1, set_alpha_to_one False), one prompt, latents only
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    out = {"latents": latents[:1].transpose(0, 2, 3, 1)}
    for steps in STEP_COUNTS:
        with torch.no_grad():
            res = pipe(PROMPTS[:1], negative_prompt=NEGATIVE[:1], num_inference_steps=steps, guidance_scale=GUIDANCE,
                       eta=0.0, latents=torch.from_numpy(latents[:1]), height=size, width=size, output_type="latent")
        out[f"latents_{steps}"] = res.images.numpy().transpose(0, 2, 3, 1)
        out[f"timesteps_{steps}"] = pipe.scheduler.timesteps.numpy()
    np.savez_compressed(OUT / "pipeline_ddim_steps.npz", **out)
    print(OUT / "pipeline_ddim_steps.npz", (OUT / "pipeline_ddim_steps.npz").stat().st_size, "bytes")


if __name__ == "__main__":
    main()
