"""Whole Stable Diffusion pipelines in and out: diffusers folders and CompVis/SD single files.

SD 1/2 and SDXL base/refiner (two text towers; see `ldm_jax.interop.sdxl`) take the same paths;
`Pretrained.family` says which one the tensors showed.

`load_diffusers(folder)` / `load_single_file(file)` -> `Pretrained` (kwargs + params of the UNet, the
autoencoder and the text encoder, the tokenizer folder, the training noise schedule), and
`save_diffusers(p, folder)` / `save_single_file(p, file)` write one back out. Every load is
all-or-nothing: a missing, unexpected or wrongly shaped tensor raises `CheckpointError` naming it.

Single files do not record everything: head counts and v- vs eps-prediction are not visible in the
tensors. Our own exports carry the exact configs as safetensors metadata (key "ldm_jax"); for foreign
files the configs are inferred from shapes (SD1: OpenAI CLIP text encoder; SD2: OpenCLIP) and SD2
base-channel models are taken as v-prediction, as diffusers does, with a warning: pass
`prediction_type=` when you know better (SD 2.x 512-base models are "epsilon").
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import warnings
from typing import Any, Mapping

import numpy as np

from ldm_jax.interop import clip, sdxl
from ldm_jax.interop import unet as unet_io
from ldm_jax.interop import vae as vae_io
from ldm_jax.interop.common import CheckpointError, StrictStateDict, load_state_dict, load_safetensors, save_safetensors

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# LatentDiffusion registers its schedule as buffers, so training checkpoints carry them.
_LDM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                "logvar", "lvlb_weights", "scale_factor")
_SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="epsilon", scale_factor=0.18215)
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "model.fp16.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin")
_DIFFUSERS_VERSION = "0.30.0"  # recorded in the configs we write (diffusers does not check it)


@dataclasses.dataclass
class Pretrained:
    """A latent diffusion model's weights and configs; `params` has keys "unet", "vae" and (with text) "text"."""

    unet_kwargs: dict[str, Any]
    vae_kwargs: dict[str, Any]
    text_kwargs: dict[str, Any] | None
    params: dict[str, Any]
    scheduler: dict[str, Any]  # num_train_timesteps, beta_start, beta_end, beta_schedule, prediction_type, scale_factor
    tokenizer_dir: str | dict[str, str] | None = None  # SDXL: {tower name: tokenizer folder}
    sample_size: int | None = None  # latent side the UNet was trained at (diffusers' unet sample_size)
    # SDXL pipeline options (diffusers model_index.json): force_zeros_for_empty_prompt, requires_aesthetics_score
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def family(self) -> str:
        """"sd1", "sd2", "sdxl-base", "sdxl-refiner" or "ldm", from the loaded tensors' configs."""
        return sdxl.family(self.unet_kwargs, self.text_kwargs)

    @property
    def unet_params(self) -> Any:
        """`params["unet"]`."""
        return self.params["unet"]

    @property
    def vae_params(self) -> Any:
        """`params["vae"]`."""
        return self.params["vae"]

    @property
    def text_params(self) -> Any:
        """`params["text"]`, or None without a text encoder."""
        return self.params.get("text")


# ------------------------------------------------------------------------------------------------ diffusers
def _read_json(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _read_weights(folder: pathlib.Path) -> dict[str, np.ndarray]:
    """The tensors of one diffusers component folder (single or sharded safetensors; .bin needs torch)."""
    for index in ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json"):
        if (folder / index).is_file():
            shards = sorted(set(_read_json(folder / index)["weight_map"].values()))
            return {k: v for s in shards for k, v in load_safetensors(folder / s).items()}
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return load_state_dict(folder / name)
    raise FileNotFoundError(f"no weights in {folder} (looked for {', '.join(_WEIGHT_NAMES)})")


def _component(root: pathlib.Path, name: str) -> tuple[dict[str, Any], StrictStateDict]:
    folder = root / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{root} has no {name}/ folder")
    return _read_json(folder / "config.json"), StrictStateDict(_read_weights(folder), what=f"{folder}")


def load_diffusers(path: str | os.PathLike, *, prediction_type: str | None = None) -> Pretrained:
    """Loads a diffusers Stable Diffusion folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    root = pathlib.Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no diffusers folder at {root}")
    index = _read_json(root / "model_index.json")
    cfg, sd = _component(root, "unet")
    unet_kwargs = unet_io.config_from_diffusers(cfg)
    unet_params = unet_io.from_diffusers(sd, unet_kwargs)
    sd.finish()
    sample_size = cfg.get("sample_size")
    vae_name = "vae" if (root / "vae").is_dir() or "vae" in index else "vqvae"
    vcfg, sd = _component(root, vae_name)
    vae_kwargs = vae_io.config_from_diffusers(vcfg)
    params = {"unet": unet_params, "vae": vae_io.from_diffusers(sd, vae_kwargs)}
    sd.finish()
    text_kwargs, tokenizer_dir, options = None, None, {}
    towers = [n for n in sdxl.TOWERS if (index.get(n) or [None])[0] is not None or (root / n).is_dir()]
    if "text_encoder_2" in towers:  # SDXL: both towers (base) or bigG alone (refiner)
        encoders, params["text"], tokenizer_dir = {}, {}, {}
        for name in towers:
            tcfg, sd = _component(root, name)
            encoders[name] = sdxl.tower_kwargs(tcfg)
            params["text"][name] = clip.from_diffusers(sd, encoders[name])
            tokenizer_dir[name] = str(root / sdxl.TOKENIZERS[name])
        text_kwargs = {"encoders": encoders}
        options = {k: bool(index[k]) for k in ("force_zeros_for_empty_prompt", "requires_aesthetics_score") if k in index}
    elif towers:
        tcfg, sd = _component(root, "text_encoder")
        text_kwargs = clip.config_from_diffusers(tcfg)
        params["text"] = clip.from_diffusers(sd, text_kwargs)
        tok = root / "tokenizer"
        tokenizer_dir = str(tok) if tok.is_dir() and any(tok.iterdir()) else None
    scfg = _read_json(root / "scheduler" / "scheduler_config.json")
    scheduler = dict(  # diffusers' defaults where a config omits a field
        num_train_timesteps=scfg.get("num_train_timesteps", 1000), beta_start=scfg.get("beta_start", 0.0001),
        beta_end=scfg.get("beta_end", 0.02), beta_schedule=scfg.get("beta_schedule", "linear"),
        prediction_type=scfg.get("prediction_type", "epsilon"), scale_factor=float(vcfg.get("scaling_factor", 0.18215)),
        timestep_spacing=scfg.get("timestep_spacing", "leading"), steps_offset=int(scfg.get("steps_offset", 0)),
        set_alpha_to_one=bool(scfg.get("set_alpha_to_one", True)),
        rescale_betas_zero_snr=bool(scfg.get("rescale_betas_zero_snr", False)),
    )
    scheduler["class_name"] = scfg.get("_class_name", "PNDMScheduler")
    if scfg.get("trained_betas") is not None:
        scheduler["trained_betas"] = list(scfg["trained_betas"])
    if prediction_type is not None:
        scheduler["prediction_type"] = _check_prediction(prediction_type)
    return Pretrained(unet_kwargs, vae_kwargs, text_kwargs, params, scheduler, tokenizer_dir=tokenizer_dir,
                      sample_size=sample_size, options=options)


def load_text_encoder(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(kwargs, params) of a transformers CLIPTextModel folder (config.json + model.safetensors) or a
    diffusers root (its text_encoder/)."""
    root = pathlib.Path(path)
    folder = root / "text_encoder" if (root / "text_encoder").is_dir() else root
    if not folder.is_dir():
        raise FileNotFoundError(f"no text encoder folder at {root}")
    cfg, sd = _component(folder.parent, folder.name)
    kwargs = clip.config_from_diffusers(cfg)
    return kwargs, clip.from_diffusers(sd, kwargs)


def _check_prediction(p: str) -> str:
    if p not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {p!r}")
    return p


def save_diffusers(p: Pretrained, path: str | os.PathLike) -> None:
    """Writes `p` as a diffusers folder that `StableDiffusionPipeline.from_pretrained` (and `load_diffusers`) open."""
    root = pathlib.Path(path)
    root.mkdir(parents=True, exist_ok=True)
    fmt = {"format": "pt"}  # transformers refuses safetensors files without it
    ucfg = {"_class_name": "UNet2DConditionModel", "_diffusers_version": _DIFFUSERS_VERSION,
            **unet_io.config_to_diffusers(p.unet_kwargs)}
    if p.sample_size is not None:
        ucfg["sample_size"] = int(p.sample_size)
    _write_json(root / "unet" / "config.json", ucfg)
    save_safetensors(unet_io.to_diffusers(p.params["unet"], p.unet_kwargs),
                     root / "unet" / "diffusion_pytorch_model.safetensors", fmt)
    vcfg = {"_diffusers_version": _DIFFUSERS_VERSION,
            **vae_io.config_to_diffusers(p.vae_kwargs, scaling_factor=p.scheduler.get("scale_factor"))}
    _write_json(root / "vae" / "config.json", vcfg)
    save_safetensors(vae_io.to_diffusers(p.params["vae"], p.vae_kwargs), root / "vae" / "diffusion_pytorch_model.safetensors", fmt)
    towers = _towers(p)
    for name, kw in towers.items():
        _write_json(root / name / "config.json", clip.config_to_diffusers(kw))
        save_safetensors(clip.to_diffusers(_tower_params(p, name), kw), root / name / "model.safetensors", fmt)
    tok_dirs = _tokenizer_dirs(p)
    for name, src in tok_dirs.items():
        dst = root / (sdxl.TOKENIZERS[name] if sdxl.is_sdxl_text(p.text_kwargs) else "tokenizer")
        if pathlib.Path(src).resolve() != dst.resolve():
            shutil.copytree(src, dst, dirs_exist_ok=True)
    s = p.scheduler
    scfg = {"_class_name": s.get("class_name", "PNDMScheduler"), "_diffusers_version": _DIFFUSERS_VERSION,
            **{k: s[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")},
            "trained_betas": s.get("trained_betas"), "set_alpha_to_one": s.get("set_alpha_to_one", False),
            "steps_offset": s.get("steps_offset", 1), "skip_prk_steps": True, "clip_sample": False,
            "timestep_spacing": s.get("timestep_spacing", "leading"),
            "rescale_betas_zero_snr": s.get("rescale_betas_zero_snr", False)}
    _write_json(root / "scheduler" / "scheduler_config.json", scfg)
    index = {
        "_diffusers_version": _DIFFUSERS_VERSION, "unet": ["diffusers", ucfg["_class_name"]],
        "vae": ["diffusers", vcfg.get("_class_name", "AutoencoderKL")], "scheduler": ["diffusers", scfg["_class_name"]],
        "feature_extractor": [None, None],
    }
    names = sdxl.TOWERS if sdxl.is_sdxl_text(p.text_kwargs) else ("text_encoder",)
    for name in names:
        tok = sdxl.TOKENIZERS[name] if sdxl.is_sdxl_text(p.text_kwargs) else "tokenizer"
        index[name] = (["transformers", clip.config_to_diffusers(towers[name])["architectures"][0]] if name in towers
                       else [None, None])
        index[tok] = ["transformers", "CLIPTokenizer"] if name in tok_dirs else [None, None]
    if sdxl.is_sdxl_text(p.text_kwargs):
        refiner = "text_encoder" not in towers
        index.update(_class_name="StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
                     image_encoder=[None, None],
                     force_zeros_for_empty_prompt=p.options.get("force_zeros_for_empty_prompt", not refiner))
        if refiner:
            index["requires_aesthetics_score"] = p.options.get("requires_aesthetics_score", True)
    else:
        index.update(_class_name="StableDiffusionPipeline", safety_checker=[None, None], requires_safety_checker=False)
    _write_json(root / "model_index.json", index)


def _towers(p: Pretrained) -> dict[str, dict[str, Any]]:
    """{folder name: kwargs as transformers stores the tower} of `p`'s text towers."""
    if p.text_kwargs is None:
        return {}
    if sdxl.is_sdxl_text(p.text_kwargs):
        return {n: sdxl.plain(kw) for n, kw in p.text_kwargs["encoders"].items()}
    return {"text_encoder": p.text_kwargs}


def _tower_params(p: Pretrained, name: str) -> Any:
    return p.params["text"][name] if sdxl.is_sdxl_text(p.text_kwargs) else p.params["text"]


def _tokenizer_dirs(p: Pretrained) -> dict[str, str]:
    if p.tokenizer_dir is None:
        return {}
    if isinstance(p.tokenizer_dir, Mapping):
        return dict(p.tokenizer_dir)
    return {"text_encoder": str(p.tokenizer_dir)}


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"{obj!r} ({type(obj).__name__}) cannot be written to a config file")


def _tuples(obj: Any) -> Any:
    """JSON lists back to the tuples module fields use."""
    if isinstance(obj, dict):
        return {k: _tuples(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return tuple(_tuples(v) for v in obj)
    return obj


# ------------------------------------------------------------------------------------------------ single files
def _metadata(path: pathlib.Path) -> dict[str, Any] | None:
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
    return json.loads(meta["ldm_jax"]) if "ldm_jax" in meta else None


def _ema_view(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """LitEma stores `model_ema.<key without dots>`: put those under the UNet's keys instead."""
    out = {k: v for k, v in tensors.items() if not k.startswith(UNET_PREFIX)}
    found = 0
    for k in tensors:
        if k.startswith(UNET_PREFIX):
            ema = "model_ema." + k[len("model."):].replace(".", "")
            if ema in tensors:
                out[k] = tensors[ema]
                found += 1
    if not found:
        raise CheckpointError("use_ema=True but the checkpoint has no model_ema.* weights")
    return out


def _schedule_from_file(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    s = dict(_SD_SCHEDULE)
    if "betas" in tensors:
        betas = np.asarray(tensors["betas"], np.float64)
        s["num_train_timesteps"] = len(betas)
        s["beta_start"], s["beta_end"] = float(betas[0]), float(betas[-1])
        sqrt_linear = np.linspace(betas[0] ** 0.5, betas[-1] ** 0.5, len(betas)) ** 2
        if np.allclose(betas, sqrt_linear, rtol=1e-4):
            s["beta_schedule"] = "scaled_linear"
        elif np.allclose(betas, np.linspace(betas[0], betas[-1], len(betas)), rtol=1e-4):
            s["beta_schedule"] = "linear"
        else:
            s["trained_betas"] = betas.tolist()
        s["beta_start"], s["beta_end"] = round(s["beta_start"], 8), round(s["beta_end"], 8)
    if "scale_factor" in tensors:
        s["scale_factor"] = float(np.asarray(tensors["scale_factor"]))
    return s


def load_single_file(
    path: str | os.PathLike, *, prediction_type: str | None = None, use_ema: bool = False,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Pretrained:
    """Loads a CompVis/SD single-file checkpoint (.safetensors; .ckpt needs torch).

    SD1 vs SD2 is read from the text encoder's layout; v- vs eps-prediction cannot be seen in the
    weights of SD2 models: pass `prediction_type` ("epsilon" for 2.x-base, "v_prediction" for 768-v).
    `use_ema` takes the UNet from the `model_ema.` copy that training checkpoints carry.
    `overrides` ({"unet": {...}, "vae": {...}, "text": {...}}) sets what shapes cannot tell (head
    counts, GroupNorm groups) on top of the inferred or stored kwargs.
    """
    overrides = dict(overrides or {})
    if set(overrides) - {"unet", "vae", "text"}:
        raise ValueError(f"overrides may hold 'unet', 'vae', 'text'; got {sorted(overrides)}")
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    tensors = load_state_dict(path)
    meta = _metadata(path)
    if use_ema:
        tensors = _ema_view(tensors)
    if not any(k.startswith(UNET_PREFIX) for k in tensors):
        raise CheckpointError(f"{path} holds no UNet ({UNET_PREFIX}*): not a Stable Diffusion / LDM single file")
    sd = StrictStateDict(tensors, what=str(path))
    is_xl = any(k.startswith(sdxl.CONDITIONER) for k in tensors)
    layout = meta.get("text_layout") if meta else (None if is_xl else clip.compvis_layout(tensors, TEXT_PREFIX))
    if meta:
        unet_kwargs, vae_kwargs = _tuples(meta["unet"]), _tuples(meta["vae"])
        text_kwargs = _tuples(meta["text"]) if meta.get("text") is not None else None
        scheduler = dict(meta["scheduler"])
    else:
        unet_kwargs = unet_io.config_from_compvis(tensors, UNET_PREFIX)
        vae_kwargs = vae_io.config_from_compvis(tensors, VAE_PREFIX)
        text_kwargs = clip.config_from_compvis(tensors, TEXT_PREFIX) if layout else None
        scheduler = _schedule_from_file(tensors)
        if is_xl:  # SGM files carry no schedule buffers: SDXL's own (EulerDiscrete, scale 0.13025)
            text_kwargs = sdxl.text_config_from_single_file(tensors)
            scheduler = {**scheduler, "scale_factor": scheduler["scale_factor"] if "scale_factor" in tensors
                         else sdxl.SCALE_FACTOR, "class_name": sdxl.SCHEDULER["class_name"]}
        if layout == "open_clip" and unet_kwargs.get("in_channels") == 4:
            scheduler["prediction_type"] = "v_prediction"
            if prediction_type is None:
                warnings.warn(f"{path.name}: an SD2-style model; v- vs eps-prediction cannot be told from the "
                              "weights, assuming v_prediction (768-v); pass prediction_type='epsilon' for 2.x-base")
    if prediction_type is not None:
        scheduler["prediction_type"] = _check_prediction(prediction_type)
    unet_kwargs = {**unet_kwargs, **overrides.get("unet", {})}
    vae_kwargs = {**vae_kwargs, **overrides.get("vae", {})}
    if text_kwargs is not None:
        text_kwargs = {**text_kwargs, **overrides.get("text", {})}
    params = {"unet": unet_io.from_compvis(sd, unet_kwargs, UNET_PREFIX), "vae": vae_io.from_compvis(sd, vae_kwargs, VAE_PREFIX)}
    if sdxl.is_sdxl_text(text_kwargs):
        params["text"] = sdxl.load_single_file_text(sd, text_kwargs)
    elif text_kwargs is not None:
        params["text"] = clip.from_compvis(sd, text_kwargs, TEXT_PREFIX, layout=layout)
    # everything outside the three models must be a known LDM buffer or the EMA copy
    known = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX, sdxl.CONDITIONER, "model_ema.") + _LDM_BUFFERS
    for k in _LDM_BUFFERS:
        if k in sd:
            sd.take(k)
    sd.finish("", ignore=known)
    sample_size = (meta or {}).get("sample_size") or (
        128 if is_xl else 96 if scheduler["prediction_type"] == "v_prediction" else 64)
    options = dict((meta or {}).get("options") or {})
    return Pretrained(unet_kwargs, vae_kwargs, text_kwargs, params, scheduler, tokenizer_dir=None,
                      sample_size=sample_size, options=options)


def save_single_file(p: Pretrained, path: str | os.PathLike, *, text_layout: str | None = None) -> None:
    """Writes `p` as one CompVis-layout .safetensors file (model.diffusion_model., first_stage_model., cond_stage_model.;
    SDXL: conditioner.embedders.N. as Stability's files).

    The text encoder goes in SD1's HF layout or SD2's OpenCLIP layout (`clip.default_compvis_layout`
    unless `text_layout`); the exact configs ride along as metadata so that `load_single_file` round-trips.
    """
    path = pathlib.Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"single files are written as .safetensors, got {path.name}")
    tensors = {**unet_io.to_compvis(p.params["unet"], p.unet_kwargs, UNET_PREFIX),
               **vae_io.to_compvis(p.params["vae"], p.vae_kwargs, VAE_PREFIX)}
    if sdxl.is_sdxl_text(p.text_kwargs):
        tensors.update(sdxl.save_single_file_text(p.params["text"], p.text_kwargs))
    elif p.text_kwargs is not None:
        text_layout = text_layout or clip.default_compvis_layout(p.text_kwargs)
        tensors.update(clip.to_compvis(p.params["text"], p.text_kwargs, TEXT_PREFIX, layout=text_layout))
    meta = dict(unet=p.unet_kwargs, vae=p.vae_kwargs, text=p.text_kwargs, scheduler=p.scheduler,
                text_layout=text_layout, sample_size=p.sample_size, options=p.options)
    save_safetensors(tensors, path, {"format": "pt", "ldm_jax": json.dumps(_jsonable(meta))})
