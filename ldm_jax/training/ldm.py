"""The latent-diffusion objective (Rombach et al. 2022, arXiv 2112.10752; LDM `ddpm.py` LatentDiffusion).

A frozen first stage maps images to latents z = scale_factor · E(x) (`scale_by_std`: scale_factor =
1/std of the first batch's latents, stored in the state); a UNet learns to predict eps / v / x0 from
z_t = sqrt(ᾱ_t)·z + sqrt(1−ᾱ_t)·ε. Conditioning: text (frozen CLIP or a jointly trained encoder; SDXL's two
towers with the pooled text + micro-conditioning vector `y`: training/text_conditioning.py), class labels
(LDM's class embedder as cross-attention context, or ADM-style `y`), or none; with probability `cond.drop_prob`
the condition is replaced by the empty prompt (or zeroed: `cond.drop_mode`) / the null class inside the jitted
step, so one model serves classifier-free guidance.

Parameter groups: {"model": {"unet", ["text"], ["class_embed"], ["logvar"]}} with one AdamW (SDXL: "text" is
{tower: params}); frozen: {"first_stage", ["text"]}; extra: {"scale_factor", "uncond_ids"}.

Random draws: timesteps, noise and dropout masks come from `jax.random` inside the jitted step. JAX's
partitionable threefry (the default) makes each device generate only its own shard of a batch-sharded
draw with no cross-device traffic, and the values do not depend on the mesh, so a (data 4 × fsdp 2) run
equals a one-device run and a checkpoint resumes exactly on another mesh. Per-device draws in a
`shard_map` (fold_in(axis_index)) would also avoid communication but would tie the noise to the
device count; see tests/test_training.py::test_noise_draw_has_no_collectives.

Gradient reduction: with grad_accum = 1 it is left to XLA's partitioner, which all-reduces (DP) or
reduce-scatters (FSDP) the gradients itself. With grad_accum > 1 under the partitioner, the compiled
`lax.scan` all-reduces the gradients inside the loop body, once per micro-batch. So when a mesh with
data > 1 is in context while tracing (trainer.Trainer.jit_step traces the step under
`jax.sharding.use_abstract_mesh`; `jax.set_mesh` works too) `optim.accumulate` runs a `jax.shard_map`
manual over `data` (fsdp/tensor stay automatic inside): each data replica accumulates the gradients of
its own micro-batch blocks and one `psum` over `data` follows the loop (`optim.accumulate_shard_map`).
Its draws use `sharding.block_key`, whose per-sample draws are exactly the replica's rows of the global
draw, so the step still equals the one-device step on any mesh (every draw in `loss` is per-sample; a
draw of another shape raises). `optim.accum_shard_map=False` keeps the scan path. The compiled HLO of
both is checked in tests/test_accumulate_shard_map.py; bench/bench_accum.py times them.
"""
from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from ldm_jax.data.config import default_data_config
from ldm_jax.data.pipeline import make_dataset
from ldm_jax.diffusion import losses, schedules
from ldm_jax.evaluation.evaluator import default_eval_config
from ldm_jax.interop import workdir as workdir_io
from ldm_jax.models import layers
from ldm_jax.models.autoencoder import autoencoder_class, downsample_factor, round_trip
from ldm_jax.models.unet import UNet
from ldm_jax.training import ldm_io, optim, sample_grid
from ldm_jax.training import text_conditioning as text_cond
from ldm_jax.training.latent_cache import cached_dataset
from ldm_jax.training.objective import ConfigError, Hook, Objective, default_loop_config
from ldm_jax.training.state import TrainState, apply_gradients

log = logging.getLogger("ldm_jax.train")

COND_TYPES = ("text", "class", "none")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ClassEmbedder(nn.Module):
    """LDM's `ClassEmbedder`: label -> (B, 1, dim) cross-attention context; row `num_classes` is the null class."""

    num_classes: int
    dim: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, labels: jax.Array) -> jax.Array:
        table = self.param(
            "embedding", layers.partitioned(nn.initializers.normal(1.0), ("vocab", "table")),
            (self.num_classes + 1, self.dim), self.param_dtype,
        )
        return jnp.take(table, labels, axis=0)[:, None, :]


def _kwargs(block: Any) -> dict[str, Any]:
    d = block.to_dict() if hasattr(block, "to_dict") else dict(block)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


class LDMObjective(Objective):
    """The LDM objective for the shared loop (see `ldm_jax.training.objective`)."""

    name = "ldm"
    ema_groups = ("model",)

    def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any = None):
        self.config = c = config
        if c.dtype not in DTYPES:
            raise ConfigError(f"dtype={c.dtype!r} is unknown; use one of {sorted(DTYPES)}")
        if c.cond.type not in COND_TYPES:
            raise ConfigError(f"cond.type={c.cond.type!r} is unknown; use one of {COND_TYPES}")
        dtype = DTYPES[c.dtype]
        self.unet_kwargs = _kwargs(c.unet)
        if c.cond.type == "class" and c.cond.class_mode == "y":
            self.unet_kwargs["num_classes"] = int(c.cond.num_classes) + 1  # + the null class for guidance
        self.unet = UNet(**self.unet_kwargs, dtype=dtype, remat_policy=c.remat)
        self.vae_kwargs = _kwargs(c.first_stage.kwargs)
        self.first_stage = autoencoder_class(self.vae_kwargs)(**self.vae_kwargs, dtype=dtype)
        self.tokenizer = tokenizer
        # text: one CLIP tower (SD 1/2) or several (SDXL), with SDXL's added conditioning (training/text_conditioning.py)
        self.cond = None
        if c.cond.type == "text":
            self.cond = text_cond.TextConditioner(c.cond, self.unet_kwargs, int(c.image_size), dtype, c.remat, tokenizer)
        self.text_kwargs = None if self.cond is None else self.cond.kwargs
        self.text = None if self.cond is None else self.cond.module
        self.class_embed = None
        if c.cond.type == "class" and c.cond.class_mode == "context":
            self.class_embed = ClassEmbedder(int(c.cond.num_classes), int(self.unet_kwargs["context_dim"]))
        d = c.diffusion
        if d.zero_terminal_snr and d.prediction == "eps":
            raise ConfigError("diffusion.zero_terminal_snr=True needs diffusion.prediction='v' (or 'x0'): at zero "
                              "SNR the eps target carries no information about the image (Lin et al. 2023, sec. 3.2)")
        if d.timestep_sampling not in losses.TIMESTEP_SAMPLING or not d.timestep_scale > 0:
            raise ConfigError(f"diffusion.timestep_sampling={d.timestep_sampling!r} must be one of "
                              f"{losses.TIMESTEP_SAMPLING} and diffusion.timestep_scale ({d.timestep_scale}) > 0")
        betas = schedules.make_betas(d.schedule, d.num_timesteps, linear_start=d.linear_start,
                                     linear_end=d.linear_end, cosine_s=d.cosine_s, zero_terminal_snr=d.zero_terminal_snr)
        self.alphas_cumprod_np = schedules.alphas_cumprod(betas)
        self.tx, self.schedule = optim.make_optimizer(c.optim, int(c.global_batch_size))
        f = downsample_factor(dict(self.vae_kwargs))
        if c.image_size % f:
            raise ConfigError(f"image_size={c.image_size} is not divisible by the first stage's downsampling {f}")
        self.latent_shape = (c.image_size // f, c.image_size // f, int(self.vae_kwargs["embed_dim"]))
        if self.unet_kwargs["in_channels"] != self.latent_shape[-1]:
            raise ConfigError(
                f"unet.in_channels={self.unet_kwargs['in_channels']} != first-stage latent channels "
                f"{self.latent_shape[-1]}; set --config.unet.in_channels/out_channels to {self.latent_shape[-1]}"
            )

    # ---------------------------------------------------------------- objective interface
    def optimizers(self):
        return {"model": self.tx}

    def schedules(self):
        return {"model": self.schedule}

    @property
    def text_trainable(self) -> bool:
        return self.text is not None and bool(self.config.cond.text_trainable)

    def _uncond_ids(self) -> np.ndarray:
        return self.cond.uncond_ids()

    def loaded_parts(self) -> set[str]:
        """The parts `load_pretrained` overwrites on a fresh run (and a resume restores): "unet" with `init_from`,
        "first_stage" with a first-stage checkpoint, "text" with `cond.text_checkpoint`."""
        c, out = self.config, set()
        if c.init_from:
            out.add("unet")
        if str(c.first_stage.checkpoint) not in ("", "random"):
            out.add("first_stage")
        if self.text is not None and c.cond.text_checkpoint:
            out.add("text")
        return out

    def _init_part(self, name: str, init: Any) -> Any:
        """`init()`, or zeros of its shapes (logical names kept) for a part that is loaded anyway: XLA then compiles
        no random-init program for it (for a tiny SDXL that program took as long to compile as the train step)."""
        if name not in self.loaded_parts():
            return init()
        return jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(init))

    def init(self, key: jax.Array) -> dict[str, Any]:
        c = self.config
        k_unet, k_text, k_fs, k_cls = jax.random.split(key, 4)
        x = jnp.zeros((1, *self.latent_shape), jnp.float32)
        context, y = self._dummy_cond()
        model: dict[str, Any] = {"unet": self._init_part(
            "unet", lambda: self.unet.init(k_unet, x, jnp.zeros((1,), jnp.int32), context, y)["params"])}
        frozen: dict[str, Any] = {}
        extra: dict[str, Any] = {"scale_factor": jnp.asarray(c.first_stage.scale_factor, jnp.float32)}
        if self.text is not None:
            text_params = self._init_part("text", lambda: self.cond.init(k_text))
            (model if self.text_trainable else frozen)["text"] = text_params
            extra["uncond_ids"] = jnp.asarray(self._uncond_ids())
        if self.class_embed is not None:
            model["class_embed"] = self.class_embed.init(k_cls, jnp.zeros((1,), jnp.int32))["params"]
        if c.diffusion.learn_logvar:
            model["logvar"] = jnp.full((c.diffusion.num_timesteps,), c.diffusion.logvar_init, jnp.float32)
        img = jnp.zeros((1, c.image_size, c.image_size, 3), jnp.float32)
        frozen["first_stage"] = self._init_part(
            "first_stage", lambda: self.first_stage.init(k_fs, img, method=round_trip)["params"])
        return {"params": {"model": model}, "frozen": frozen, "extra": extra}

    def _dummy_cond(self):
        context = y = None
        if self.text is not None:
            context = jnp.zeros((1, self.cond.max_length, self.unet_kwargs["context_dim"]))
            y = self.cond.dummy_y()
        elif self.class_embed is not None:
            context = jnp.zeros((1, 1, self.unet_kwargs["context_dim"]))
        elif self.config.cond.type == "class":
            y = jnp.zeros((1,), jnp.int32)
        return context, y

    # ---------------------------------------------------------------- pieces of the step
    def encode(self, fs_params: Any, images: jax.Array, key: jax.Array) -> jax.Array:
        """Unscaled first-stage latents (`encode_latent`): a posterior sample (KL, as LDM; its mode when
        `first_stage.sample_posterior=False`) or the pre-quantization latents (VQ, LDM's VQModelInterface)."""
        key = key if self.config.first_stage.sample_posterior else None
        return jax.lax.stop_gradient(self.first_stage.apply({"params": fs_params}, images, key, method="encode_latent"))

    def latents(self, fs_params: Any, batch: dict, key: jax.Array) -> jax.Array:
        """Unscaled latents of the batch: from the cached posterior mean/std when the batch has them
        (`data.cache`; the same draw mean + std·ε as `encode`), else encoded from its images."""
        if "latent_mean" not in batch:
            return self.encode(fs_params, batch["image"], key)
        mean = batch["latent_mean"]
        if not self.config.first_stage.sample_posterior:
            return mean
        return mean + batch["latent_std"] * jax.random.normal(key, mean.shape, mean.dtype)

    def conditioning(self, model: Any, state: TrainState, batch: dict, key: jax.Array):
        """(context, y) for the UNet, with the condition dropped to the null one with prob `cond.drop_prob`."""
        c = self.config.cond
        n = (batch["latent_mean"] if "latent_mean" in batch else batch["image"]).shape[0]
        drop = jax.random.bernoulli(key, c.drop_prob, (n,)) if c.drop_prob > 0 else jnp.zeros((n,), bool)
        if self.text is not None:
            params = model["text"] if self.text_trainable else state.frozen["text"]
            return self.cond(params, self.unet, batch, drop, state.extra["uncond_ids"], self.text_trainable)
        if c.type == "class":
            labels = jnp.where(drop, int(c.num_classes), batch["label"])
            if self.class_embed is not None:
                return self.class_embed.apply({"params": model["class_embed"]}, labels), None
            return None, labels
        return None, None

    def loss(self, model: Any, state: TrainState, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
        """LDM's p_losses on one (micro-)batch for the trainable `model` group."""
        d = self.config.diffusion
        k_enc, k_t, k_noise, k_drop, k_dropout = jax.random.split(key, 5)
        ab = jnp.asarray(self.alphas_cumprod_np, jnp.float32)
        z0 = self.latents(state.frozen["first_stage"], batch, k_enc) * state.extra["scale_factor"]
        context, y = self.conditioning(model, state, batch, k_drop)
        t = losses.sample_timesteps(k_t, z0.shape[0], d.num_timesteps, d.timestep_sampling, d.timestep_loc,
                                    d.timestep_scale)
        noise = losses.sample_noise(k_noise, z0.shape, d.offset_noise)
        zt = losses.q_sample(z0, noise, t, ab)
        out = self.unet.apply({"params": model["unet"]}, zt, t, context, y, train=True, rngs={"dropout": k_dropout})
        target = losses.prediction_target(d.prediction, z0, noise, t, ab)
        weights = None
        if d.min_snr_gamma > 0:
            snr = jnp.asarray(losses.snr_table(self.alphas_cumprod_np), jnp.float32)[t]
            weights = losses.min_snr_weight(snr, d.min_snr_gamma, d.prediction)
        if "loss_weight" in batch:  # per-example weights from the data (DreamBooth's prior preservation)
            weights = batch["loss_weight"] if weights is None else weights * batch["loss_weight"]
        return losses.diffusion_loss(out, target, t, loss_type=d.loss, logvar=model.get("logvar"), weights=weights)

    def train_step(self, state: TrainState, batch: dict, key: jax.Array) -> tuple[TrainState, dict]:
        loss_fn = lambda p, b, k: self.loss(p, state, b, k)  # noqa: E731
        # shard_map'd accumulation (one gradient reduction per step) when a data-parallel mesh is in context
        # (jax.set_mesh); `optim.accum_shard_map=False` keeps the lax.scan under the partitioner
        o = self.config.optim
        loss, metrics, grads = optim.accumulate(loss_fn, state.params["model"], batch, key, o.grad_accum,
                                                shard_map=bool(o.get("accum_shard_map", True)))
        state, gnorm = apply_gradients(state, "model", grads, self.tx)
        return state, {"loss": loss, "grad_norm": gnorm, **metrics}

    def prepare(self, state: TrainState, batch: dict) -> TrainState:
        """scale_by_std: scale_factor = 1 / std of the first batch's latents (LDM on_train_batch_start)."""
        if not self.config.first_stage.scale_by_std:
            return state
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 2**32 - 1)  # never a step index
        z = self.latents(state.frozen["first_stage"], batch, key)
        return state.replace(extra={**state.extra, "scale_factor": 1.0 / jnp.std(z)})

    def export(self, state: TrainState) -> dict:
        """Facts a sampler needs besides the weights (saved in each checkpoint's meta; "sampling": the spec)."""
        scale = float(jax.device_get(state.extra["scale_factor"]))
        return {"scale_factor": scale, **self.scheduler_dict(), "sampling": self.sampling_spec(scale)}

    # ---------------------------------------------------------------- what sampling needs
    def sampling_spec(self, scale_factor: float = 1.0) -> dict:
        """Modules, schedule, tokenizer and the state paths of the sampled weights, JSON-able: what the sample-grid
        hook builds its Pipeline from and what `ldm_jax.interop.workdir` reads back from a checkpoint."""
        weights = {"unet": ["params", "model", "unet"], "vae": ["frozen", "first_stage"]}
        if self.text is not None:
            weights["text"] = ["params", "model", "text"] if self.text_trainable else ["frozen", "text"]
        tok = str(self.config.cond.get("tokenizer") or "")
        tokenizer = None if self.text is None or not tok else (
            "tokenizer.json" if tok == "train" else str(pathlib.Path(tok).expanduser().absolute()))
        if tokenizer is not None and self.cond.towers is not None:  # SDXL: {tower: its tokenizer folder}
            tokenizer = ldm_io.tower_tokenizer_dirs(tokenizer, self.cond.towers)
        return dict(unet=self.unet_kwargs, vae=self.vae_kwargs, text=self.text_kwargs,
                    scheduler={**self.scheduler_dict(), "scale_factor": float(scale_factor)},
                    image_size=int(self.config.image_size), conditioning=str(self.config.cond.type), tokenizer=tokenizer,
                    weights=weights, ema_groups=list(self.ema_groups),
                    options={} if self.cond is None else self.cond.sampling_options())

    def sampling_params(self, state: TrainState, use_ema: bool = True) -> dict:
        """{"unet", "vae", ["text"]} of a live state, with the EMA copies of the trained weights."""
        paths = workdir_io.resolve(self.sampling_spec()["weights"], tuple(state.ema), use_ema)
        return workdir_io.select(state, paths)

    def scheduler_dict(self) -> dict:
        """The training noise schedule in diffusers' scheduler names (`ldm_jax.pipeline.SchedulerConfig`)."""
        d = self.config.diffusion
        return dict(num_train_timesteps=int(d.num_timesteps), beta_start=float(d.linear_start),
                    beta_end=float(d.linear_end), beta_schedule={"linear": "scaled_linear"}.get(d.schedule, d.schedule),
                    prediction_type={"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[d.prediction],
                    **(dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=0)
                       if d.zero_terminal_snr else {}))

    # ---------------------------------------------------------------- host side
    def validate(self, mesh) -> None:
        """Checks paths before anything is compiled."""
        problems = []
        for check in (ldm_io.check_first_stage, ldm_io.check_data, ldm_io.check_text):
            try:
                check(self.config)
            except ConfigError as e:
                problems.append(str(e))
        problems += text_cond.config_errors(self.config, self.cond)
        size, resolution = int(self.config.image_size), int(self.config.data.resolution)
        if size != resolution:  # neither wins: the latents would not fit the model, or the model not the data
            problems.append(f"image_size={size} and data.resolution={resolution} differ: the model is built for "
                            f"{size}x{size} images, the data pipeline delivers {resolution}x{resolution}; set both "
                            "to the same value")
        if problems:
            raise ConfigError("\n  - ".join(["the config cannot run:"] + problems))

    def load_pretrained(self, state: TrainState, mesh) -> TrainState:
        return ldm_io.load_pretrained(self, state, mesh)

    def make_dataset(self, mesh):
        if self.config.data.get("cache"):  # first-stage latents encoded once (training/latent_cache.py)
            return cached_dataset(self, mesh)
        return make_dataset(self.config.data, mesh=mesh, global_batch_size=int(self.config.global_batch_size),
                            tokenizer=self.tokenizer, seed=int(self.config.seed))

    def hooks(self) -> list[Hook]:
        return sample_grid.ldm_hooks(self)


def build(config: ml_collections.ConfigDict, tokenizer: Any = None, workdir: Any = None) -> LDMObjective:
    """The LDM objective of `config` (the tokenizer comes from `cond.tokenizer` when not given); an empty
    first-stage / text-encoder / tokenizer path takes `init_from` (`ldm_io.with_init_from`)."""
    config = ldm_io.with_init_from(config)
    trained_without_workdir = str(config.cond.get("tokenizer")) == "train" and workdir is None  # shape-only builds
    if tokenizer is None and config.cond.type == "text" and config.cond.get("tokenizer") and not trained_without_workdir:
        tokenizer = ldm_io.load_tokenizer(config, workdir)
    return LDMObjective(config, tokenizer)


def default_ldm_config() -> ml_collections.ConfigDict:
    """The LDM-specific blocks of a training config (configs/ldm_*.py fill in the models)."""
    c = default_loop_config()
    c.objective = "ldm"
    c.image_size = 256
    c.dtype = "float32"  # compute dtype; parameters stay float32 (bf16 compute, fp32 master weights)
    c.remat = "none"
    c.unet = ml_collections.ConfigDict()
    c.first_stage = dict(kwargs={}, checkpoint="", scale_factor=0.18215, scale_by_std=False, sample_posterior=True)
    # drop_mode, micro_conditioning, aesthetic_score: see training/text_conditioning.py (SDXL)
    c.cond = dict(type="text", text={}, text_trainable=False, text_checkpoint="", tokenizer="", drop_prob=0.1,
                  drop_mode="empty", micro_conditioning="batch", aesthetic_score=6.0, num_classes=1000,
                  class_mode="context")
    # a diffusers folder / single-file SD or SDXL checkpoint whose UNet starts the run; an empty
    # first_stage.checkpoint / cond.text_checkpoint / cond.tokenizer take it too (`ldm_io.with_init_from`)
    c.init_from = ""
    c.diffusion = dict(schedule="linear", num_timesteps=1000, linear_start=0.00085, linear_end=0.012, cosine_s=8e-3,
                       prediction="eps", loss="l2", min_snr_gamma=0.0, offset_noise=0.0, learn_logvar=False,
                       logvar_init=0.0, zero_terminal_snr=False,
                       # "uniform" (LDM) or "logit_normal" (SD3): t = T sigmoid(loc + scale n) (diffusion/losses.py)
                       timestep_sampling="uniform", timestep_loc=0.0, timestep_scale=1.0)
    c.optim = optim.default_optim_config()
    c.sample = dict(every=0, prompts=[], num=8, seed=0, sampler="euler", schedule="karras", steps=20,
                    guidance_scale=3.0)
    c.data = default_data_config()
    c.eval = default_eval_config()  # FID/KID/CLIP score every eval.every steps (training/eval_hook.py)
    return c
