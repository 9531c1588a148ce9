"""The first-stage objective: KL / VQ autoencoders with LDM's perceptual + adversarial loss.

Reproduces LDM's `LPIPSWithDiscriminator` (ldm/modules/losses/contperceptual.py) for KL models and taming's
`VQLPIPSWithDiscriminator` for VQ models (Esser et al. 2021, arXiv 2012.09841, eq. 5-7; Rombach et al. 2022):
  rec   = pixel_weight |x - x̂| + perceptual_weight LPIPS(x, x̂)        (LPIPS broadcast over every pixel)
          (`loss.pixel_loss="l2"` uses (x - x̂)² instead of |x - x̂|: not in the reference; for tiny models trained
          for minutes, where L1's median pulls small objects into the background — see configs/shapes.py)
  KL:  nll = sum(rec / exp(logvar) + logvar) / B,   reg = kl_weight * sum(KL) / B
  VQ:  nll = mean(rec),                              reg = codebook_weight * codebook_loss
  g    = -mean D(x̂)
  λ    = clamp(‖∇_L nll‖ / (‖∇_L g‖ + 1e-4), 0, 1e4) * disc_weight    (L = decoder's last conv weight)
  loss_ae = nll + reg + λ * disc_factor * g,  disc_factor = 0 before `disc_start`
  loss_d  = disc_factor * hinge|vanilla(D(x), D(x̂))
One train step updates the autoencoder with its Adam, then recomputes x̂ with the new weights and updates the
discriminator with its own Adam, as Lightning's two-optimizer loop does in the reference. The logvar is a
scalar that LDM's `configure_optimizers` never hands to an optimizer (it stays at `logvar_init`); set
`loss.learn_logvar=True` to train it (its own parameter group, as in SD's later `generative-models`).
Before `disc_start` the GAN branch is skipped with `lax.cond` (its contribution is multiplied by 0 anyway);
the discriminator's Adam still steps on zero gradients, exactly as the reference's does.
"""
from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ldm_jax import metrics
from ldm_jax.data.config import default_data_config, shapes_spec
from ldm_jax.data.pipeline import make_dataset
from ldm_jax.data.shapes import attributes_kept, describe, shape_breakdown
from ldm_jax.interop.lpips import load_lpips_params
from ldm_jax.models.autoencoder import VAE_PRESETS, VQModel, autoencoder_class, round_trip
from ldm_jax.models.discriminator import D_LOSSES, NLayerDiscriminator
from ldm_jax.models.lpips import LPIPS
from ldm_jax.sharding import put_like
from ldm_jax.training.objective import ConfigError, Hook, Objective, default_loop_config
from ldm_jax.training.optim import default_optim_config, make_optimizer
from ldm_jax.training.state import apply_gradients

log = logging.getLogger("ldm_jax.train")

LAST_LAYER = ("decoder", "conv_out", "kernel")


# ------------------------------------------------------------------------------------------- formulas
def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, disc_weight: float) -> jax.Array:
    """λ = clamp(‖∇nll‖ / (‖∇g‖ + 1e-4), 0, 1e4) * disc_weight, gradients at the decoder's last layer (taming)."""
    norm = lambda a: jnp.sqrt(jnp.sum(jnp.square(a.astype(jnp.float32))))  # noqa: E731
    w = norm(nll_grad) / (norm(g_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, 1e4) * disc_weight)


PIXEL_LOSSES = ("l1", "l2")


def reconstruction_nll(
    x: jax.Array, recon: jax.Array, logvar: jax.Array, p_loss: jax.Array | None, *, kind: str,
    pixel_weight: float = 1.0, perceptual_weight: float = 1.0, pixel_loss: str = "l1",
) -> tuple[jax.Array, jax.Array]:
    """(nll, mean rec) of the KL loss (sum over pixels / B, with logvar) or the VQ loss (mean, no logvar)."""
    if pixel_loss not in PIXEL_LOSSES:
        raise ValueError(f"pixel_loss={pixel_loss!r} is unknown; choose one of {PIXEL_LOSSES}")
    diff = x.astype(jnp.float32) - recon.astype(jnp.float32)
    rec = pixel_weight * (jnp.abs(diff) if pixel_loss == "l1" else jnp.square(diff))
    if p_loss is not None:
        rec = rec + perceptual_weight * p_loss.reshape(-1, 1, 1, 1)
    if kind == "vq":
        return jnp.mean(rec), jnp.mean(rec)
    nll = rec / jnp.exp(logvar) + logvar
    return jnp.sum(nll) / x.shape[0], jnp.mean(rec)


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


# ------------------------------------------------------------------------------------------- config
def default_loss_config() -> ml_collections.ConfigDict:
    """The `loss` block: LDM's `LPIPSWithDiscriminator` / taming's `VQLPIPSWithDiscriminator` arguments."""
    return ml_collections.ConfigDict(
        dict(
            disc_start=50001,
            disc_factor=1.0,
            disc_weight=0.5,
            disc_loss="hinge",
            disc_layers=3,
            disc_ndf=64,
            pixel_weight=1.0,
            pixel_loss="l1",  # "l1" (LDM/taming) or "l2"
            perceptual_weight=1.0,
            lpips_weights="",  # file(s), comma-separated: see ldm_jax.interop.lpips
            kl_weight=1e-6,
            codebook_weight=1.0,
            logvar_init=0.0,
            learn_logvar=False,
            # KL: decode a posterior sample (LDM) or, False, its mean (a deterministic autoencoder; the KL term
            # then only bounds the latents' scale)
            sample_posterior=True,
        )
    )


def default_autoencoder_config(preset: str) -> ml_collections.ConfigDict:
    """A whole first-stage training config (loop + data + model + loss + two Adams (0.5, 0.9) + eval) for `preset`."""
    c = default_loop_config()
    c.objective = "autoencoder"
    c.data = default_data_config()
    c.data.caption_key = ""
    c.data.label_key = ""
    c.model = ml_collections.ConfigDict(dict(preset=preset, overrides={}, dtype="float32"))
    c.loss = default_loss_config()
    c.optim = default_optim_config()
    # LDM's configure_optimizers: Adam(lr, betas=(0.5, 0.9)) for the autoencoder and the discriminator, no clipping.
    c.optim.update(name="adam", b1=0.5, b2=0.9, weight_decay=0.0, clip_norm=0.0)
    # Reconstructions grid + PSNR/SSIM every `every` steps on `batch_size * num_batches` images of `split`.
    # eval.extra_splits: more splits scored the same way (e.g. the shapes data's "heldout": the pairs the LDM is
    # tested on), written as their own metrics.jsonl lines and TensorBoard eval/<split>/... scalars.
    c.eval = ml_collections.ConfigDict(dict(every=1000, split="test", batch_size=8, num_batches=4, grid_images=8,
                                            extra_splits=()))
    # augment.permute_channels: each training image's RGB channels in a random order (one of the 6 permutations),
    # so the first stage sees every shape in every color: on the built-in shapes data, whose train split leaves
    # some (color, shape) pairs out for the LDM's held-out test, a first stage without it reconstructs those pairs'
    # shapes far worse than the trained ones (README). It changes only what the autoencoder learns from.
    c.augment = ml_collections.ConfigDict(dict(permute_channels=False))
    return c


_RGB_PERMUTATIONS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


def permute_channels(x: jax.Array, key: jax.Array) -> jax.Array:
    """(B, H, W, 3) images with each image's channels in one of the 6 orders, drawn uniformly per image."""
    if x.shape[-1] != 3:
        raise ValueError(f"augment.permute_channels needs 3-channel images, got shape {x.shape}")
    order = jnp.asarray(_RGB_PERMUTATIONS, jnp.int32)[jax.random.randint(key, (x.shape[0],), 0, 6)]
    return jnp.take_along_axis(x, order[:, None, None, :], axis=-1)


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Autoencoder kwargs: the `model.preset` from `VAE_PRESETS`, `model.overrides`, resolution = data.resolution."""
    model_cfg = config.model
    if model_cfg.preset not in VAE_PRESETS:
        raise ConfigError(f"model.preset={model_cfg.preset!r} is unknown; choose one of {sorted(VAE_PRESETS)}")
    kwargs = {**VAE_PRESETS[model_cfg.preset], **model_cfg.get("overrides", {})}
    if "data" in config:
        kwargs["resolution"] = int(config.data.resolution)
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in kwargs.items()}


# ------------------------------------------------------------------------------------------- objective
class AutoencoderObjective(Objective):
    """First-stage training (see the module docstring); implements `ldm_jax.training.objective.Objective`."""

    name = "autoencoder"

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.loss_cfg = config.loss
        self.kwargs = model_kwargs(config)
        dtype = jnp.dtype(config.model.get("dtype", "float32"))
        self.model = autoencoder_class(self.kwargs)(**self.kwargs, dtype=dtype)
        self.kind = "vq" if isinstance(self.model, VQModel) else "kl"
        lc = self.loss_cfg
        if lc.pixel_loss not in PIXEL_LOSSES:
            raise ConfigError(f"loss.pixel_loss={lc.pixel_loss!r} is unknown; choose one of {list(PIXEL_LOSSES)}")
        if lc.disc_loss not in D_LOSSES:
            raise ConfigError(f"loss.disc_loss={lc.disc_loss!r} is unknown; choose one of {sorted(D_LOSSES)}")
        self.disc = NLayerDiscriminator(in_channels=self.kwargs.get("out_ch", 3), ndf=lc.disc_ndf, n_layers=lc.disc_layers)
        self.gan = lc.disc_factor > 0
        self.lpips = LPIPS() if lc.perceptual_weight > 0 else None
        self.ema_groups = tuple(config.get("ema_groups", ()))
        self._opt = {}
        for g in self._groups():
            self._opt[g] = make_optimizer(config.optim, config.global_batch_size)
        self._eval_fn = None

    def _groups(self) -> tuple[str, ...]:
        # No discriminator at all when disc_factor is 0 (no parameters, optimizer state or compile time for it).
        return ("ae",) + (("disc",) if self.gan else ()) + (("logvar",) if self.loss_cfg.learn_logvar else ())

    # --- interface ----------------------------------------------------------------------------------
    def init(self, key: jax.Array) -> dict[str, Any]:
        """Random AE / discriminator / LPIPS weights (LPIPS is replaced from disk in `load_pretrained`)."""
        k_ae, _, k_d, k_p = jax.random.split(key, 4)  # (the second key is unused; kept so k_d, k_p stay the same)
        x = jnp.zeros((1, 32, 32, self.kwargs.get("in_channels", 3)), jnp.float32)
        ae = self.model.init({"params": k_ae}, x, method=round_trip)
        logvar = jnp.full((), self.loss_cfg.logvar_init, jnp.float32)
        params, extra = {"ae": ae["params"]}, {}
        if self.gan:
            d = self.disc.init(k_d, jnp.zeros((1, 32, 32, self.disc.in_channels)), train=False)
            params["disc"], extra["disc_batch_stats"] = d["params"], d["batch_stats"]
        if self.loss_cfg.learn_logvar:
            params["logvar"] = logvar
        else:
            extra["logvar"] = logvar
        frozen = {"lpips": self.lpips.init(k_p, x[..., :3], x[..., :3])["params"]} if self.lpips else {}
        return {"params": params, "frozen": frozen, "extra": extra}

    def optimizers(self) -> dict[str, optax.GradientTransformation]:
        return {g: tx for g, (tx, _) in self._opt.items()}

    def schedules(self) -> dict[str, optax.Schedule]:
        return {g: s for g, (_, s) in self._opt.items()}

    def validate(self, mesh) -> None:
        """Fails early on missing LPIPS weights; warns when the perceptual term is off."""
        lc = self.loss_cfg
        if int(self.config.optim.grad_accum) != 1:
            raise ConfigError(
                "the autoencoder objective does not accumulate gradients (the adaptive GAN weight and BatchNorm are "
                "per batch): set --config.optim.grad_accum=1 and put the accumulated batch in global_batch_size"
            )
        if lc.perceptual_weight > 0:
            if not lc.lpips_weights:
                raise ConfigError(
                    "loss.perceptual_weight > 0 needs LPIPS weights, which cannot be downloaded here: set "
                    "--config.loss.lpips_weights=VGG16.pth,LPIPS_HEADS.pth (torchvision's vgg16-397923af.pth and the "
                    "lpips package's lpips/weights/v0.1/vgg.pth, or one file made by `python -m ldm_jax.interop.lpips "
                    "OUT.safetensors VGG16.pth HEADS.pth`), or train without it: --config.loss.perceptual_weight=0"
                )
            for p in str(lc.lpips_weights).split(","):
                if p and not pathlib.Path(p).exists():
                    raise ConfigError(f"loss.lpips_weights: no file at {p}")
        else:
            log.warning(
                "loss.perceptual_weight=0: training the autoencoder WITHOUT the LPIPS perceptual loss; "
                "reconstructions will be blurrier than the reference recipe's"
            )
        if self.gan and lc.disc_start > self.config.num_steps:
            log.warning("loss.disc_start=%d is after num_steps=%d: the discriminator never acts",
                        lc.disc_start, self.config.num_steps)

    def load_pretrained(self, state, mesh):
        """Loads the LPIPS weights named by `loss.lpips_weights` into `frozen`."""
        if self.lpips is None:
            return state
        lp = put_like(load_lpips_params(self.loss_cfg.lpips_weights), state.frozen["lpips"])
        return state.replace(frozen={**state.frozen, "lpips": lp})

    def export(self, state) -> dict[str, Any]:
        return {"first_stage": {"kind": self.kind, "kwargs": self.kwargs}}

    # --- the step ------------------------------------------------------------------------------------
    def _reconstruct(self, ae_params, x, key):
        """(x̂, regulariser) with gradients; reg = sum(KL)/B or the codebook loss."""
        if self.kind == "kl":
            recon, post = self.model.apply({"params": ae_params}, x, key=key,
                                           sample_posterior=bool(self.loss_cfg.sample_posterior))
            return recon, jnp.sum(post.kl()) / x.shape[0]
        recon, qloss, _ = self.model.apply({"params": ae_params}, x)
        return recon, jnp.mean(qloss)

    def _disc(self, params, stats, x):
        logits, upd = self.disc.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        return logits, upd["batch_stats"]

    def train_step(self, state, batch, key):
        """AE update (nll + reg + adaptive-weighted GAN term), then discriminator update; pure and jittable."""
        lc = self.loss_cfg
        x = batch["image"].astype(jnp.float32)
        if self.config.get("augment") is not None and self.config.augment.permute_channels:
            x = permute_channels(x, jax.random.fold_in(key, 0x5EED))  # k_ae, k_d below stay what they were
        k_ae, k_d = jax.random.split(key)
        gan_on = jnp.logical_and(state.step >= lc.disc_start, self.gan)
        disc_factor = jnp.where(gan_on, lc.disc_factor, 0.0)
        learn_lv = lc.learn_logvar
        logvar = state.params["logvar"] if learn_lv else state.extra["logvar"]
        dp, stats = (state.params["disc"], state.extra["disc_batch_stats"]) if self.gan else (None, None)
        reg_weight = lc.kl_weight if self.kind == "kl" else lc.codebook_weight

        (recon, reg), vjp = jax.vjp(lambda p: self._reconstruct(p, x, k_ae), state.params["ae"])

        def nll_fn(r, lv):
            p_loss = self.lpips.apply({"params": state.frozen["lpips"]}, x, r) if self.lpips else None
            nll, rec = reconstruction_nll(x, r, lv, p_loss, kind=self.kind, pixel_weight=lc.pixel_weight,
                                          perceptual_weight=lc.perceptual_weight, pixel_loss=lc.pixel_loss)
            return nll, (rec, jnp.mean(p_loss) if p_loss is not None else jnp.zeros(()))

        (nll, (rec, p_mean)), (g_rec_nll, g_logvar) = jax.value_and_grad(nll_fn, (0, 1), has_aux=True)(recon, logvar)
        (grads_base,) = vjp((g_rec_nll, jnp.asarray(reg_weight, reg.dtype)))

        def with_gan(_):
            def g_fn(r):
                return -jnp.mean(self._disc(dp, stats, r)[0])

            g_loss, g_rec = jax.value_and_grad(g_fn)(recon)
            (grads_g,) = vjp((g_rec, jnp.zeros_like(reg)))
            d_weight = adaptive_weight(_get(grads_base, LAST_LAYER), _get(grads_g, LAST_LAYER), lc.disc_weight)
            scale = d_weight * disc_factor
            grads = jax.tree_util.tree_map(lambda a, b: a + scale * b, grads_base, grads_g)
            return grads, g_loss, d_weight

        def without_gan(_):
            return grads_base, jnp.zeros(()), jnp.zeros(())

        if self.gan:
            grads, g_loss, d_weight = jax.lax.cond(gan_on, with_gan, without_gan, None)
        else:
            grads, g_loss, d_weight = without_gan(None)
        loss = nll + reg_weight * reg + d_weight * disc_factor * g_loss
        state, gn_ae = apply_gradients(state, "ae", grads, self._opt["ae"][0])
        if learn_lv:
            state, _ = apply_gradients(state, "logvar", g_logvar, self._opt["logvar"][0])

        # Discriminator: a fresh forward with the updated autoencoder (Lightning runs training_step per optimizer).
        def disc_active(_):
            recon2, _ = self._reconstruct(state.params["ae"], x, k_d)
            recon2 = jax.lax.stop_gradient(recon2)

            def d_fn(p):
                real, s1 = self._disc(p, stats, x)
                fake, s2 = self._disc(p, s1, recon2)
                return disc_factor * D_LOSSES[lc.disc_loss](real, fake), (s2, jnp.mean(real), jnp.mean(fake))

            (d_loss, (s2, lr_, lf_)), g = jax.value_and_grad(d_fn, has_aux=True)(dp)
            return g, s2, d_loss, lr_, lf_

        def disc_idle(_):
            z = jnp.zeros(())
            return jax.tree_util.tree_map(jnp.zeros_like, dp), stats, z, z, z

        z = jnp.zeros(())
        d_loss = l_real = l_fake = gn_d = z
        if self.gan:
            d_grads, new_stats, d_loss, l_real, l_fake = jax.lax.cond(gan_on, disc_active, disc_idle, None)
            state, gn_d = apply_gradients(state, "disc", d_grads, self._opt["disc"][0])
            state = state.replace(extra={**state.extra, "disc_batch_stats": new_stats})
        metrics_out = {
            "loss": loss, "nll": nll, "rec_loss": rec, "p_loss": p_mean, ("kl" if self.kind == "kl" else "codebook"): reg,
            "g_loss": g_loss, "d_weight": d_weight, "disc_factor": disc_factor, "d_loss": d_loss,
            "logits_real": l_real, "logits_fake": l_fake, "logvar": logvar, "grad_norm_ae": gn_ae, "grad_norm_disc": gn_d,
        }  # fmt: skip
        return state, metrics_out

    # --- data and evaluation -------------------------------------------------------------------------
    def make_dataset(self, mesh, split: str = "train", batch_size: int | None = None):
        """The training (or evaluation) iterator from `config.data` (ldm_jax.data.make_dataset)."""
        return make_dataset(self.config.data, mesh=mesh, global_batch_size=batch_size or self.config.global_batch_size,
                            seed=self.config.seed, split=split)

    def reconstruct_fn(self):
        """jit(params, x) -> (x̂ from the posterior mode, per-image PSNR, per-image SSIM) on [0, 1] images."""
        if self._eval_fn is None:

            def fn(ae_params, x):
                recon = self.model.apply({"params": ae_params}, x, method=round_trip)
                a, b = metrics.to_unit(x), metrics.to_unit(recon)
                return recon, metrics.psnr(a, b), metrics.ssim(a, b)

            self._eval_fn = jax.jit(fn)
        return self._eval_fn

    def evaluate(self, ae_params, batches) -> dict[str, float]:
        """Mean PSNR / SSIM of the reconstructions of `batches` (an iterable of {"image": ...}).

        On the built-in shapes dataset also `<attribute>_kept` (color, shape, size, position, background):
        the fraction of reconstructions in which the dataset's classifier reads the same value as in the
        original image (what the LDM stage needs from its first stage; a blurry one returns the background),
        and `shape_kept/<size>_<shape>` per kind of shape in the originals (e.g. shape_kept/small_circle).
        """
        fn = self.reconstruct_fn()
        ps, ss, kept, pairs = [], [], [], []
        spec = None
        if self.config.get("data") is not None and self.config.data.source == "shapes":
            spec = shapes_spec(self.config.data)
        for b in batches:
            recon, p, s = fn(ae_params, b["image"])
            ps.append(_host(p))
            ss.append(_host(s))
            if spec is not None:
                kept.extend(_classified_alike(_host(b["image"]), _host(recon), spec))
                pairs.append((_to_u8(_host(b["image"])), _to_u8(_host(recon))))
        out = {"psnr": float(np.mean(np.concatenate(ps))), "ssim": float(np.mean(np.concatenate(ss)))}
        for k in kept[0] if kept else ():
            out[f"{k}_kept"] = float(np.mean([d[k] for d in kept]))
        if pairs:
            originals = np.concatenate([a for a, _ in pairs])
            recons = np.concatenate([r for _, r in pairs])
            # the kind of each original as the classifier reads it (clean images: always right)
            kinds = shape_breakdown(list(recons), [describe(o, spec) for o in originals], spec)
            for kind, b in kinds.items():
                out[f"shape_kept/{kind.replace(' ', '_')}"] = b["accuracy"]
        return out

    def hooks(self) -> list[Hook]:
        ev = self.config.eval
        return [Hook(every=int(ev.every), fn=self._eval_hook, name="reconstructions")] if ev.every > 0 else []

    def _eval_hook(self, ctx) -> None:
        ev = self.config.eval
        params = ctx.eval_params("ae")
        splits = [ev.split, *[x for x in ev.get("extra_splits", ()) if x != ev.split]]
        for split in splits:
            it = self.make_dataset(ctx.mesh, split=split, batch_size=ev.batch_size)
            batches = [next(it) for _ in range(ev.num_batches)]
            scores = self.evaluate(params, batches)
            main = split == ev.split
            if jax.process_index() == 0:
                out = pathlib.Path(ctx.workdir) / "reconstructions"
                out.mkdir(parents=True, exist_ok=True)
                if main:
                    from PIL import Image

                    recon, _, _ = self.reconstruct_fn()(params, batches[0]["image"])
                    grid = recon_grid(_host(batches[0]["image"])[: ev.grid_images], _host(recon)[: ev.grid_images])
                    Image.fromarray(grid).save(out / f"step_{ctx.step:08d}.png")
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": ctx.step, "split": split, **scores}) + "\n")
                if ctx.writer is not None:
                    if main:
                        ctx.writer.add_image("eval/reconstructions", grid, ctx.step, dataformats="HWC")
                    for k, v in scores.items():
                        ctx.writer.add_scalar(f"eval/{k}" if main else f"eval/{split}/{k}", v, ctx.step)
                    ctx.writer.flush()
            kept = ""
            if "color_kept" in scores:
                kept = ", kept: " + ", ".join(f"{k[:-5]} {v:.0%}" for k, v in scores.items() if k.endswith("_kept"))
                kept += "; shape kept by kind: " + ", ".join(f"{k.split('/', 1)[1].replace('_', ' ')} {v:.0%}"
                                                            for k, v in scores.items() if k.startswith("shape_kept/"))
            log.info("step %d: %s split: reconstruction PSNR %.2f dB, SSIM %.4f%s", ctx.step, split, scores["psnr"],
                     scores["ssim"], kept)


def _host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def recon_grid(images: np.ndarray, recons: np.ndarray) -> np.ndarray:
    """uint8 grid: one row per image, (input | reconstruction), from NHWC arrays in [-1, 1]."""
    to8 = lambda a: np.round(np.clip((np.asarray(a, np.float32) + 1) * 127.5, 0, 255)).astype(np.uint8)  # noqa: E731
    rows = [np.concatenate([to8(a), to8(b)], axis=1) for a, b in zip(images, recons)]
    return np.concatenate(rows, axis=0)


def build(config: ml_collections.ConfigDict, workdir: Any = None) -> AutoencoderObjective:
    """The objective for `config.objective == "autoencoder"` (`workdir` is not needed)."""
    return AutoencoderObjective(config)


def _to_u8(a: np.ndarray) -> np.ndarray:
    return np.clip((np.asarray(a, np.float32) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)


def _classified_alike(x: np.ndarray, recon: np.ndarray, spec) -> list[dict[str, bool]]:
    """Per image: {attribute: same value} read by the shapes classifier from x and its reconstruction ([-1, 1])."""
    return attributes_kept(_to_u8(x), _to_u8(recon), spec)
