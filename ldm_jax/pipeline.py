"""Text-to-image, img2img and inpainting with a latent diffusion model: `load_pretrained(...).generate(...)`.

One jitted XLA program per (sampler, step count, image size, batch, mode): text encoding, the
`lax.scan` sampler and VAE decoding. Prompts, seeds, guidance scales, sigma schedules of the same
length and parameters are traced arguments, so changing them never recompiles. The batch is
sharded over every device of a (data, 1, 1) mesh.

Conventions (Rombach et al. 2022, arXiv 2112.10752; Karras et al. 2022, arXiv 2206.00364):
samplers work in k-diffusion's σ space, x_σ = x0 + σ·ε = x_vp / sqrt(ᾱ). LDM's own samplers
(ddim, plms, ddpm) start from VP noise (x_σ = ε·sqrt(1+σ_0²), as CompVis and diffusers do) and
k-diffusion samplers from ε·σ_0 (as k-diffusion does). A schedule that ends at σ_N > 0 (diffusers'
DDIM with `set_alpha_to_one=False` ends at ᾱ_0) returns x_vp = x_σ / sqrt(1+σ_N²), as they do.
"""
from __future__ import annotations

import functools
import logging
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from ldm_jax import conditioning, pipeline_lora, sampling, sharding
from ldm_jax import pipeline_inputs as inputs
from ldm_jax.pipeline_inputs import PREDICTION_TYPES, SchedulerConfig  # noqa: F401 - public names of this module
from ldm_jax.diffusion import denoisers
from ldm_jax.interop import pretrained
from ldm_jax.interop import workdir as workdir_io
from ldm_jax.models import autoencoder, text, unet

log = logging.getLogger(__name__)

class Pipeline(pipeline_lora.LoraMethods):
    """A latent diffusion model ready to sample: modules, (optional) params, tokenizer and schedule.

    `params` is {"unet": ..., "vae": ..., "text": ...} (plain trees). Pass `params=` to `generate`
    to sample other weights (e.g. the trainer's EMA) with the same compiled programs.
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module | None,
        tokenizer: Callable[[Sequence[str]], np.ndarray] | None,
        scheduler: SchedulerConfig | Mapping[str, Any],
        params: Mapping[str, Any] | None = None,
        *,
        mesh: Mesh | None = None,
        default_size: int | None = None,
    ):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler = scheduler if isinstance(scheduler, SchedulerConfig) else SchedulerConfig.from_dict(scheduler)
        if self.scheduler.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.scheduler.prediction_type!r} is not one of {PREDICTION_TYPES}")
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("a text encoder needs a tokenizer and vice versa")
        self.mesh = mesh if mesh is not None else sharding.make_mesh((-1, 1, 1))
        self.alphas_cumprod = self.scheduler.alphas_cumprod()
        self.model_sigmas = np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)
        self.params = None if params is None else self._place(params)
        self._programs: dict[inputs.ProgramKey, Callable] = {}
        self.trace_count = 0  # incremented each time a program is traced (tests count recompiles)
        self.loras = pipeline_lora.PipelineLoras()  # load_lora / set_lora_scale / merge_loras
        # Image side used when generate() gets no height/width (SD1: 512; our small models: their data size).
        # Not the VAE's `resolution`: that is the CompVis training value (256 for SD's VAE), not an image size.
        self.default_size = int(default_size or 512)
        # SDXL: the negative embeddings are zeros when no negative prompt is given (diffusers'
        # force_zeros_for_empty_prompt); the VAE decodes in float32 when its compute dtype is float16
        self.force_zeros_for_empty_prompt = False
        self.upcast_vae = True
        self.family = "ldm"

    # ------------------------------------------------------------------ set-up
    @classmethod
    def from_configs(
        cls,
        unet_kwargs: Mapping[str, Any],
        vae_kwargs: Mapping[str, Any],
        text_kwargs: Mapping[str, Any] | None,
        tokenizer: Callable[[Sequence[str]], np.ndarray] | None,
        scheduler: SchedulerConfig | Mapping[str, Any],
        params: Mapping[str, Any] | None = None,
        *,
        mesh: Mesh | None = None,
        default_size: int | None = None,
    ) -> "Pipeline":
        """Builds the modules from their kwargs (the trainer's sample-grid hook uses this)."""
        vae = autoencoder.build_autoencoder(dict(vae_kwargs))
        text_module = None if text_kwargs is None else text.build_text_encoder(text_kwargs)
        return cls(unet.UNet(**unet_kwargs), vae, text_module, tokenizer, scheduler, params, mesh=mesh,
                   default_size=default_size)

    def _place(self, params: Mapping[str, Any]) -> dict:
        missing = [k for k in ("unet", "vae") + (("text",) if self.text_encoder is not None else ()) if k not in params]
        if missing:
            raise ValueError(f"params lack {missing}; expected keys unet, vae{', text' if self.text_encoder else ''}")
        # Parameters already on devices (e.g. the trainer's sharded EMA) stay where they are.
        return jax.tree_util.tree_map(
            lambda a: a if isinstance(a, jax.Array) else jax.device_put(a, sharding.replicated(self.mesh)), dict(params)
        )

    @property
    def latent_channels(self) -> int:
        return int(self.vae.embed_dim)

    @property
    def downsample(self) -> int:
        """Image pixels per latent pixel."""
        return int(self.vae.downsample_factor)

    # ------------------------------------------------------------------ schedules
    def sigmas(self, schedule: str, steps: int, sampler: str = "euler") -> np.ndarray:
        """The σ schedule (steps+1 values) for `steps` sampler steps, ending at 0 (or σ(t=0) for ddim_uniform)."""
        c = self.scheduler
        levels = sampling.sampler_levels(self.model_sigmas, sampler, timestep_spacing=c.timestep_spacing,
                                         steps_offset=c.steps_offset, set_alpha_to_one=c.set_alpha_to_one)
        return sampling.schedule_sigmas(schedule, steps, levels).astype(np.float32)

    # ------------------------------------------------------------------ the program
    def _denoiser(self, params: dict, uncond_ctx, cond_ctx, guidance: jax.Array, extra: jax.Array | None,
                  uncond_y: jax.Array | None = None, cond_y: jax.Array | None = None):
        """D(x, σ) of the UNet, with classifier-free guidance when there is a context (one batched call);
        `cond_y`/`uncond_y`: SDXL's added-conditioning vectors."""
        unet = self.unet

        def model_fn(x_in: jax.Array, t: jax.Array, context=None, extra=None, y=None) -> jax.Array:
            if extra is not None:  # concat-conditioning (SD inpainting): [x, mask, masked-image latents]
                x_in = jnp.concatenate([x_in, extra.astype(x_in.dtype)], axis=-1)
            return unet.apply({"params": params["unet"]}, x_in, t, context, y)

        pred = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[self.scheduler.prediction_type]
        denoiser = denoisers.DiscreteDenoiser(model_fn, self.alphas_cumprod, pred)
        if cond_ctx is None:
            return functools.partial(denoiser, extra=extra) if extra is not None else denoiser
        extra_kw = {} if extra is None else {"extra": extra}
        cond_kw, uncond_kw = ({}, {}) if cond_y is None else ({"y": cond_y}, {"y": uncond_y})
        return denoisers.CFGDenoiser(denoiser, {"context": cond_ctx, **extra_kw, **cond_kw},
                                     {"context": uncond_ctx, **extra_kw, **uncond_kw}, scale=guidance)

    def _encode_text(self, params: dict, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.text_encoder.apply({"params": params["text"]}, ids)

    def _sdxl_cond(self, params, ids, added, batch):
        """(uncond ctx, cond ctx, uncond y, cond y): both halves' text, SDXL's zeroed negatives, micro-conditioning."""
        ctx, pooled = self._encode_text(params, ids)
        if added is None:
            return ctx[:batch], ctx[batch:], None, None
        keep = added["keep"].astype(ctx.dtype)  # 0: force_zeros_for_empty_prompt
        uncond_ctx, uncond_pooled = ctx[:batch] * keep[:, None, None], pooled[:batch] * keep[:, None]
        return (uncond_ctx, ctx[batch:], self.unet.added_cond(uncond_pooled, added["uncond"]),
                self.unet.added_cond(pooled[batch:], added["cond"]))

    def _vae(self, params: dict) -> tuple[nn.Module, Any]:
        """The VAE and its params, in float32 when it computes in float16 (SDXL's VAE overflows there)."""
        if self.upcast_vae and jnp.dtype(getattr(self.vae, "dtype", jnp.float32)) == jnp.float16:
            f32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params["vae"])
            return self.vae.clone(dtype=jnp.float32), f32
        return self.vae, params["vae"]

    def _decode(self, params: dict, z: jax.Array, scale: jax.Array | float) -> jax.Array:
        z = z / scale
        vae, vae_params = self._vae(params)
        img = vae.apply({"params": vae_params}, z, method="decode_latent")  # VQ: through the codebook
        return jnp.clip(img.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

    def _encode_image(self, params: dict, img: jax.Array, scale: jax.Array | float | None = None) -> jax.Array:
        """Latents of images in [-1, 1]: the posterior mean (KL) or pre-quantization code (VQ), times scale."""
        vae, vae_params = self._vae(params)
        z = vae.apply({"params": vae_params}, img, method="encode_latent")
        return z * (self.scheduler.scale_factor if scale is None else scale)

    def _program(self, st: inputs.ProgramKey) -> Callable:
        if st in self._programs:
            return self._programs[st]
        info = sampling.sampler_info(st.sampler)
        options = dict(st.options)
        bsh = sharding.batch_sharding(self.mesh, 4)
        h, w = st.latent_hw
        shape = (st.batch, h, w, self.latent_channels)

        # scale: the latent scale factor is an argument, so a run's scale_by_std value never goes stale.
        def program(params, cond_ids, uncond_ids, guidance, keys, latents, sigmas, image, mask, scale, added):
            self.trace_count += 1  # runs at trace time only
            params = pipeline_lora.apply(params)  # the attached LoRAs, at their (traced) scales
            keys = jax.random.wrap_key_data(keys)
            cond_ctx = uncond_ctx = cond_y = uncond_y = None
            if self.text_encoder is not None:
                ids = jnp.concatenate([uncond_ids, cond_ids], axis=0)
                uncond_ctx, cond_ctx, uncond_y, cond_y = self._sdxl_cond(params, ids, added, st.batch)
            # One key per image: its noise does not depend on the batch it lands in.
            if st.has_latents:
                noise = latents
            else:
                noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape[1:]))(keys)
            noise = jax.lax.with_sharding_constraint(noise, bsh)
            extra = init = m = None
            if st.mode in ("img2img", "inpaint"):
                init = self._encode_image(params, image, scale)
            if st.mode == "inpaint":
                m = jax.image.resize(mask[..., None], (st.batch, h, w, 1), "nearest")
                if self._concat_inpainting:
                    # SD-inpainting UNets take [x, mask, masked-image latents] (9 channels for SD).
                    extra = jnp.concatenate([m, self._encode_image(params, image * (mask[..., None] < 0.5), scale)], -1)
            denoise = self._denoiser(params, uncond_ctx, cond_ctx, guidance, extra, uncond_y, cond_y)
            if st.mode == "inpaint" and extra is None:
                # Plain UNets: the known region's x0 is the image's (denoiser-level masking), so any sampler works
                # (CFG++ included: the mask keeps with_uncond).
                denoise = denoisers.MaskedDenoiser(denoise, m, init)
            s0 = sigmas[0]
            if st.continues:  # a previous stage's VP-scale output at σ_0 (base -> refiner hand-off)
                x = latents * jnp.sqrt(1 + s0**2)
            elif st.from_image:
                x = init + noise * s0
            else:
                x = noise * (jnp.sqrt(1 + s0**2) if info.space == "vp" else s0)
            if info.noise == "sde":
                noise_kw = {"key": jax.random.fold_in(keys[0], 1)}  # their Brownian-tree default
            else:
                def noise_sampler(i, sigma, sigma_next):
                    draw = lambda k: jax.random.normal(jax.random.fold_in(jax.random.fold_in(k, 1), i), shape[1:])  # noqa: E731
                    return jax.lax.with_sharding_constraint(jax.vmap(draw)(keys), bsh)

                noise_kw = {"noise_sampler": noise_sampler}
            x = info.fn(denoise, x, sigmas, **noise_kw, **options)
            x = x / jnp.sqrt(1 + sigmas[-1] ** 2)  # back to VP scale when the schedule ends above σ = 0
            if st.mode == "inpaint" and extra is None:
                x = m * x + (1 - m) * init
            if st.output == "latent":
                return x
            return self._decode(params, x, scale)

        compiled = jax.jit(program)
        self._programs[st] = compiled
        return compiled

    @property
    def _concat_inpainting(self) -> bool:
        """SD-inpainting UNets see 2·C+1 input channels: x, the mask and the masked image's latents."""
        return int(self.unet.in_channels) == 2 * self.latent_channels + 1

    # ------------------------------------------------------------------ LoRAs (ldm_jax/pipeline_lora.py)
    # ------------------------------------------------------------------ public API
    def generate(
        self,
        prompts: str | Sequence[str] | int,
        *,
        negative_prompts: str | Sequence[str] | None = None,
        sampler: str = "dpmpp_2m",
        schedule: str = "karras",
        steps: int = 25,
        guidance_scale: float = 7.5,
        seed: int | jax.Array = 0,
        latents: np.ndarray | jax.Array | None = None,
        height: int | None = None,
        width: int | None = None,
        batch_size: int | None = None,
        sampler_options: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        output: str = "uint8",
        progress: bool = False,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        _image: np.ndarray | None = None,
        _mask: np.ndarray | None = None,
        _strength: float = 1.0,
        **micro: Any,
    ) -> np.ndarray:
        """Samples images: (N, H, W, 3) uint8 (`output="float"`: float32 in [0, 1]; "latent": latents).

        `prompts` is a list of strings (text models) or a number of images (unconditional models).
        `seed` is an int or a PRNG key; image j draws its noise from fold_in(key, j), so it does not
        depend on `batch_size` (except with the SDE samplers' Brownian tree). `latents` (N, h, w, C)
        replaces the initial unit Gaussian noise (for parity with other implementations).

        SDXL models take diffusers' micro-conditioning keywords (`original_size`, `crops_coords_top_left`,
        `target_size`, `aesthetic_score` and their `negative_` forms; see `conditioning.micro_ids`) and
        zero the negative embeddings when `negative_prompts` is None and the model says so
        (force_zeros_for_empty_prompt). Hand-off (diffusers' "ensemble of experts"): `denoising_end=f`
        stops where the timestep falls below T·(1−f) (use output="latent"); `denoising_start=f` with
        `latents=` that output runs the rest of the same schedule (e.g. on the refiner).
        """
        if micro and self.unet.adm_in_channels is None:
            raise ValueError(f"{sorted(micro)}: micro-conditioning is for SDXL-style UNets (adm_in_channels set)")
        if output not in ("uint8", "float", "latent"):
            raise ValueError(f"output must be 'uint8', 'float' or 'latent', got {output!r}")
        sampling.sampler_info(sampler)  # unknown names fail here, with the list
        params = self._place(params) if params is not None else self.params
        if params is None:
            raise ValueError("this pipeline has no params: pass params= to generate or load weights")
        params = self.loras.attach(params)
        if isinstance(prompts, int):
            if self.text_encoder is not None:
                raise ValueError("this model is text-conditional: pass a list of prompts, not a count")
            n, prompt_list = prompts, None
        else:
            prompt_list = inputs.to_list(prompts, None, "prompts")
            if self.text_encoder is None:
                raise ValueError("this model has no text encoder: pass the number of images instead of prompts")
            n = len(prompt_list)
        if n < 1:
            raise ValueError("nothing to generate: no prompts / zero images")
        negs = inputs.to_list(negative_prompts if negative_prompts is not None else "", n, "negative_prompts")
        height = height or self.default_size
        width = width or self.default_size
        f = self.downsample
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} (the autoencoder's factor), got {height}x{width}")
        hw = (height // f, width // f)

        sigmas = self.sigmas(schedule, steps, sampler)
        if denoising_start is not None or denoising_end is not None:
            if _image is not None:
                raise ValueError("denoising_start/denoising_end hand off latents: not with img2img/inpaint images")
            if denoising_start is not None and latents is None:
                raise ValueError("denoising_start needs latents= (the previous stage's output='latent' result)")
            first, last = conditioning.handoff_steps(self._timesteps(sigmas[:-1]), self.scheduler.num_train_timesteps,
                                                     denoising_start=denoising_start, denoising_end=denoising_end)
            sigmas = sigmas[first:last + 1]
        mode = "txt2img" if _image is None else ("inpaint" if _mask is not None else "img2img")
        from_image = mode != "txt2img" and _strength < 1.0
        if mode != "txt2img":
            if not 0.0 < _strength <= 1.0:
                raise ValueError(f"strength must be in (0, 1], got {_strength}")
            # diffusers' convention: run the last int(steps * strength) steps of the schedule.
            run = min(int(steps * _strength), steps)
            if run < 1:
                raise ValueError(f"strength {_strength} with {steps} steps runs no step; raise one of them")
            sigmas = sigmas[steps - run :]

        n_dev = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        bs = batch_size or n
        bs = -(-bs // n_dev) * n_dev  # every device gets the same share
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            want = (n, *hw, self.latent_channels)
            if latents.shape != want:
                raise ValueError(f"latents have shape {latents.shape}, expected {want}")
        images = inputs.prepare_images(_image, _mask, n, height, width)
        zero = negative_prompts is None and self.force_zeros_for_empty_prompt
        added = conditioning.added_inputs(self.unet, self.text_encoder, micro, height, width, zero=zero)

        st = inputs.ProgramKey(sampler, tuple(sorted((sampler_options or {}).items())), len(sigmas), bs, hw, mode,
                     from_image, latents is not None, output, continues=denoising_start is not None)
        program = self._program(st)
        key = jax.random.key(seed) if isinstance(seed, int) else seed
        bsh = lambda nd: sharding.batch_sharding(self.mesh, nd)  # noqa: E731
        out = []
        chunks = range(0, n, bs)
        if progress:
            from tqdm import tqdm

            chunks = tqdm(chunks, desc=f"{sampler} {len(sigmas) - 1} steps", unit="batch")
        for i, start in enumerate(chunks):
            idx = np.arange(start, start + bs) % n  # the last batch is padded by wrapping around
            cond = self._ids([prompt_list[j] for j in idx]) if prompt_list is not None else None
            unc = self._ids([negs[j] for j in idx]) if prompt_list is not None else None
            args = [
                params,
                None if cond is None else inputs.global_array(cond, bsh(cond.ndim)),
                None if unc is None else inputs.global_array(unc, bsh(unc.ndim)),
                jnp.float32(guidance_scale),
                inputs.global_keys(key, idx, self.mesh),
                None if latents is None else inputs.global_array(latents[idx], bsh(4)),
                jnp.asarray(sigmas),
                None if images[0] is None else inputs.global_array(images[0][idx], bsh(4)),
                None if images[1] is None else inputs.global_array(images[1][idx], bsh(3)),
                jnp.float32(self.scheduler.scale_factor),
                None if added is None else {k: inputs.global_array(np.broadcast_to(v, (bs, *v.shape[1:])), bsh(v.ndim))
                                            for k, v in added.items()},
            ]
            res = inputs.fetch(program(*args))
            out.append(res[: min(bs, n - start)])
        res = np.concatenate(out, axis=0)
        if output == "uint8":
            res = np.round(res * 255).astype(np.uint8)
        return res

    def img2img(self, prompts: str | Sequence[str], image: np.ndarray, *, strength: float = 0.8, **kwargs) -> np.ndarray:
        """SDEdit (Meng et al. 2021, arXiv 2108.01073): noise the image's latents to the σ of step
        steps·(1-strength) and denoise from there. `image` (H,W,3) or (N,H,W,3) uint8 / float in [0,1]."""
        image = np.asarray(image)
        kwargs.setdefault("height", image.shape[-3])
        kwargs.setdefault("width", image.shape[-2])
        return self.generate(prompts, _image=image, _strength=strength, **kwargs)

    def inpaint(self, prompts: str | Sequence[str], image: np.ndarray, mask: np.ndarray, *, strength: float = 1.0,
                **kwargs) -> np.ndarray:
        """Repaints where `mask` (H,W) or (N,H,W) is 1 / white (diffusers' convention), keeping the rest.

        SD-inpainting UNets (in_channels = 2·latent + 1) get [x, mask, masked-image latents]; other UNets
        keep the known region by replacing the denoiser's x0 there at every step.
        """
        image = np.asarray(image)
        kwargs.setdefault("height", image.shape[-3])
        kwargs.setdefault("width", image.shape[-2])
        return self.generate(prompts, _image=image, _mask=np.asarray(mask), _strength=strength, **kwargs)

    # ------------------------------------------------------------------ helpers
    def _ids(self, texts: Sequence[str]) -> np.ndarray:
        return inputs.as_host_ids(self.tokenizer, texts)

    def _timesteps(self, sigmas: np.ndarray) -> np.ndarray:
        """The (fractional) training timestep of each σ > 0 (interpolated in log σ, as k-diffusion's sigma_to_t)."""
        return np.interp(np.log(sigmas), np.log(self.model_sigmas), np.arange(len(self.model_sigmas)))



# ---------------------------------------------------------------------- loading
def from_pretrained_struct(p: Any, *, tokenizer: Any = None, mesh: Mesh | None = None) -> Pipeline:
    """A Pipeline from `ldm_jax.interop.pretrained.Pretrained` (kwargs + params + schedule + tokenizer dir)."""
    towers = (p.text_kwargs or {}).get("encoders")
    tok = conditioning.resolve_tokenizer(p.text_kwargs, p.tokenizer_dir, tokenizer)
    pipe = Pipeline.from_configs(p.unet_kwargs, p.vae_kwargs, p.text_kwargs, tok, p.scheduler, p.params, mesh=mesh)
    f = pipe.downsample
    pipe.default_size = int(p.sample_size * f) if p.sample_size else pipe.default_size
    pipe.force_zeros_for_empty_prompt = bool(p.options.get("force_zeros_for_empty_prompt", False))
    pipe.family = p.family
    log.info("loaded a %s model (%s)", p.family, "text towers " + ", ".join(towers) if towers else "UNet + VAE")
    return pipe


def load_pretrained(path: str | os.PathLike, *, tokenizer: Any = None, prediction_type: str | None = None,
                    use_ema: bool = False, mesh: Mesh | None = None) -> Pipeline:
    """A diffusers folder, a single-file SD checkpoint (.safetensors/.ckpt) or one of our workdirs -> Pipeline.

    `tokenizer`: a tokenizer folder / object for single files (they carry no tokenizer).
    `prediction_type` and `use_ema` are passed to `load_single_file` / `load_diffusers`.
    """
    path = pathlib.Path(path).expanduser()
    if path.is_dir() and (path / "model_index.json").is_file():
        return from_pretrained_struct(pretrained.load_diffusers(path, prediction_type=prediction_type),
                                      tokenizer=tokenizer, mesh=mesh)
    if path.is_file():
        p = pretrained.load_single_file(path, prediction_type=prediction_type, use_ema=use_ema)
        return from_pretrained_struct(p, tokenizer=tokenizer, mesh=mesh)
    if path.is_dir() and workdir_io.is_workdir(path):
        return load_workdir(path, mesh=mesh)
    raise FileNotFoundError(
        f"{path} is neither a diffusers folder (model_index.json), a checkpoint file (.safetensors/.ckpt) "
        "nor a training workdir of ours"
    )


def load_workdir(workdir: str | os.PathLike, *, step: int | None = None, use_ema: bool = True,
                 mesh: Mesh | None = None) -> Pipeline:
    """A Pipeline from one of our LDM training workdirs: the sampling spec and (EMA) weights of its checkpoint
    (`ldm_jax.interop.workdir`, no training code); `.step` and `.config` (the training config) are set on it.
    A LoRA / DreamBooth-LoRA run gives its base with the run's adapters loaded as the LoRA named after the folder."""
    p, meta = workdir_io.load_workdir(workdir, step=step, use_ema=use_ema)
    pipe = from_pretrained_struct(p, mesh=mesh)
    if "lora" in meta:  # a LoRA run: its base, with the run's adapters attached (set_lora_scale / merge_loras)
        pipe.add_lora(meta.pop("lora"), name=pathlib.Path(workdir).name)
    pipe.step = int(meta["step"])
    pipe.config = ml_collections.ConfigDict(meta["config"])
    return pipe
