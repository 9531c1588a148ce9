"""Weights in and out of `AutoencoderKL` / `VQModel`: diffusers layout and the CompVis single-file layout.

Both directions walk our own parameter tree (shapes from `jax.eval_shape`) and rename each leaf, so every
parameter is taken exactly once and `StrictStateDict.finish` reports whatever the checkpoint has left over.
CompVis stores the attention q/k/v/proj_out as 1x1 convs; diffusers as Linear layers (older diffusers
files name them query/key/value/proj_attn, accepted on import). CompVis numbers decoder levels like encoder
levels (up.0 = full resolution); diffusers numbers them in execution order (up_blocks.0 = lowest resolution).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.interop.common import (
    CheckpointError,
    StrictStateDict,
    conv_to_flax,
    conv_to_torch,
    flatten,
    linear_to_flax,
    linear_to_torch,
    unflatten,
)
from ldm_jax.models.autoencoder import AutoencoderKL, VQModel, autoencoder_class

# CompVis `ddconfig.resolution`: attention levels are stored as resolutions relative to it.
DEFAULT_RESOLUTION = 256
_RUNTIME_FIELDS = {"dtype", "param_dtype", "remat_policy", "parent", "name"}
_DEPRECATED_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


# ----------------------------------------------------------------------------------------------- configs
def full_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`kwargs` with every architecture field of its autoencoder class filled in (runtime fields dropped)."""
    cls = autoencoder_class(dict(kwargs))
    fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in _RUNTIME_FIELDS}
    unknown = set(kwargs) - set(fields) - _RUNTIME_FIELDS
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    out = {**fields, **{k: v for k, v in kwargs.items() if k not in _RUNTIME_FIELDS}}
    out["ch_mult"] = tuple(out["ch_mult"])
    out["attn_resolutions"] = tuple(out["attn_resolutions"])
    return out


def _attn_levels(kw: Mapping[str, Any]) -> list[bool]:
    return [kw["resolution"] // 2**i in kw["attn_resolutions"] for i in range(len(kw["ch_mult"]))]


def architecture_diff(found: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (found, expected)} for every architecture difference between two kwargs dicts.

    `resolution` and `attn_resolutions` are compared through the levels they put attention at (files do not
    record the CompVis `resolution`; the converters report 256), and `n_embed` presence tells KL from VQ.
    """
    a, b = full_kwargs(found), full_kwargs(expected)
    a["attn_levels"], b["attn_levels"] = tuple(_attn_levels(a)), tuple(_attn_levels(b))
    keys = (set(a) | set(b)) - {"resolution", "attn_resolutions"}
    return {k: (a.get(k), b.get(k)) for k in sorted(keys) if a.get(k) != b.get(k)}


def config_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Our kwargs from a diffusers `AutoencoderKL` / `VQModel` config.json dict."""
    is_vq = cfg.get("_class_name") == "VQModel" or "num_vq_embeddings" in cfg
    if cfg.get("act_fn", "silu") not in ("silu", "swish"):
        raise ValueError(f"only silu activations are supported, config has act_fn={cfg['act_fn']!r}")
    if cfg.get("norm_type", "group") != "group":
        raise ValueError(f"only GroupNorm decoders are supported, config has norm_type={cfg['norm_type']!r}")
    blocks = list(cfg.get("block_out_channels", (64,)))
    ch = blocks[0]
    if any(b % ch for b in blocks):
        raise ValueError(f"block_out_channels {blocks} are not multiples of the first entry")
    n = len(blocks)
    down = list(cfg.get("down_block_types", ["DownEncoderBlock2D"] * n))
    up = list(cfg.get("up_block_types", ["UpDecoderBlock2D"] * n))
    known = {"DownEncoderBlock2D", "AttnDownEncoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"}
    if len(down) != n or len(up) != n or set(down + up) - known:
        raise ValueError(f"unsupported block types: down {down}, up {up} for {n} levels")
    attn = [t.startswith("Attn") for t in down]
    if attn != [t.startswith("Attn") for t in reversed(up)]:
        raise ValueError(f"encoder and decoder attention levels differ ({down} vs {up}); CompVis ties them")
    latent = cfg.get("latent_channels", 3 if is_vq else 4)
    kw: dict[str, Any] = dict(
        ch=ch,
        ch_mult=tuple(b // ch for b in blocks),
        num_res_blocks=cfg.get("layers_per_block", 1),
        attn_resolutions=tuple(DEFAULT_RESOLUTION // 2**i for i, a in enumerate(attn) if a),
        resolution=DEFAULT_RESOLUTION,
        in_channels=cfg.get("in_channels", 3),
        out_ch=cfg.get("out_channels", 3),
        z_channels=latent,
        norm_groups=cfg.get("norm_num_groups", 32),
        mid_attn=cfg.get("mid_block_add_attention", True),
    )
    if is_vq:
        kw.update(embed_dim=cfg.get("vq_embed_dim") or latent, n_embed=cfg.get("num_vq_embeddings", 256))
    else:
        kw.update(
            embed_dim=latent,
            use_quant_conv=cfg.get("use_quant_conv", True),
            use_post_quant_conv=cfg.get("use_post_quant_conv", True),
        )
    return full_kwargs(kw)


def config_to_diffusers(kwargs: Mapping[str, Any], *, scaling_factor: float | None = None) -> dict[str, Any]:
    """A diffusers config.json dict for our kwargs (raises where diffusers cannot express them)."""
    kw = full_kwargs(kwargs)
    _check_exportable(kw)
    is_vq = "n_embed" in kw
    if not is_vq and kw["embed_dim"] != kw["z_channels"]:
        raise ValueError(
            f"diffusers AutoencoderKL needs embed_dim == z_channels, got {kw['embed_dim']} vs {kw['z_channels']}"
        )
    if is_vq and (not kw["legacy"] or kw["beta"] != 0.25):
        raise ValueError("diffusers VQModel fixes beta=0.25 and the legacy loss")
    attn = _attn_levels(kw)
    cfg: dict[str, Any] = {
        "_class_name": "VQModel" if is_vq else "AutoencoderKL",
        "in_channels": kw["in_channels"],
        "out_channels": kw["out_ch"],
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
        "block_out_channels": [kw["ch"] * m for m in kw["ch_mult"]],
        "layers_per_block": kw["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": kw["z_channels"],
        "norm_num_groups": kw["norm_groups"],
        "sample_size": kw["resolution"],
        "mid_block_add_attention": kw["mid_attn"],
    }
    if is_vq:
        cfg.update(num_vq_embeddings=kw["n_embed"], vq_embed_dim=kw["embed_dim"], norm_type="group")
    else:
        cfg.update(use_quant_conv=kw["use_quant_conv"], use_post_quant_conv=kw["use_post_quant_conv"])
    if scaling_factor is not None:
        cfg["scaling_factor"] = float(scaling_factor)
    return cfg


def config_from_compvis(
    tensors: Mapping[str, Any], prefix: str = "first_stage_model.", *, norm_groups: int = 32
) -> dict[str, Any]:
    """Our kwargs inferred from the shapes of a CompVis autoencoder state dict under `prefix`.

    Shapes cannot tell the GroupNorm group count; CompVis always uses 32 (`norm_groups` overrides it).
    """
    def shape(key: str) -> tuple[int, ...] | None:
        t = tensors.get(prefix + key)
        return None if t is None else tuple(t.shape)

    conv_in = shape("encoder.conv_in.weight")
    if conv_in is None:
        raise CheckpointError(
            f"no CompVis autoencoder under prefix {prefix!r} (missing {prefix}encoder.conv_in.weight)"
        )
    ch, in_channels = conv_in[0], conv_in[1]
    down = re.compile(re.escape(prefix) + r"encoder\.down\.(\d+)\.")
    levels = 1 + max(int(m.group(1)) for k in tensors if (m := down.match(k)))
    ch_mult = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels))
    num_res_blocks = 1 + max(
        int(m.group(1)) for k in tensors if (m := re.match(re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\.", k))
    )
    attn = tuple(DEFAULT_RESOLUTION // 2**i for i in range(levels) if shape(f"encoder.down.{i}.attn.0.q.weight"))
    z_channels = shape("decoder.conv_in.weight")[1]
    kw: dict[str, Any] = dict(
        ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn, resolution=DEFAULT_RESOLUTION,
        in_channels=in_channels, out_ch=shape("decoder.conv_out.weight")[0], z_channels=z_channels,
        mid_attn=shape("encoder.mid.attn_1.q.weight") is not None, norm_groups=norm_groups,
    )  # fmt: skip
    codebook = shape("quantize.embedding.weight")
    quant_conv = shape("quant_conv.weight")
    if codebook is not None:
        kw.update(n_embed=codebook[0], embed_dim=codebook[1])
    else:
        if shape("encoder.conv_out.weight")[0] != 2 * z_channels:
            raise CheckpointError(f"{prefix}encoder.conv_out does not predict 2*z_channels moments (double_z)")
        kw.update(
            embed_dim=quant_conv[0] // 2 if quant_conv else z_channels,
            use_quant_conv=quant_conv is not None,
            use_post_quant_conv=shape("post_quant_conv.weight") is not None,
        )
    return full_kwargs(kw)


# ------------------------------------------------------------------------------------------- key naming
def param_shapes(kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Flat {'encoder/conv_in/kernel': shape} of the model that `kwargs` describes (no allocation)."""
    module = autoencoder_class(dict(kwargs))(**full_kwargs(kwargs))
    f = module.downsample_factor
    x = jnp.zeros((1, f, f, module.in_channels), jnp.float32)
    if isinstance(module, AutoencoderKL):
        init = lambda: module.init(jax.random.key(0), x, sample_posterior=False)  # noqa: E731
    else:
        init = lambda: module.init(jax.random.key(0), x)  # noqa: E731
    return {k: tuple(v.shape) for k, v in flatten(jax.eval_shape(init)["params"]).items()}


_COMPVIS_MODULES = [
    (r"(down|up)_(\d+)_(block|attn)_(\d+)", r"\1.\2.\3.\4"),
    (r"down_(\d+)_downsample", r"down.\1.downsample.conv"),
    (r"up_(\d+)_upsample", r"up.\1.upsample.conv"),
    (r"mid_(block|attn)_(\d)", r"mid.\1_\2"),
]
_DIFFUSERS_INNER = {"nin_shortcut": "conv_shortcut", "norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                    "proj_out": "to_out.0", "norm_out": "conv_norm_out"}  # fmt: skip
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "embedding.weight"}


def _compvis_key(key: str) -> str:
    *mods, leaf = key.split("/")
    if len(mods) > 1:
        for pat, rep in _COMPVIS_MODULES:
            if re.fullmatch(pat, mods[1]):
                mods[1] = re.sub(pat, rep, mods[1])
                break
    return ".".join([*mods, _LEAF[leaf]])


def _diffusers_key(key: str, levels: int) -> str:
    *mods, leaf = key.split("/")
    if len(mods) > 1:
        m = mods[1]
        if mat := re.fullmatch(r"(down|up)_(\d+)_(block|attn)_(\d+)", m):
            kind, level, sub, i = mat.groups()
            level = int(level) if kind == "down" else levels - 1 - int(level)
            m = f"{kind}_blocks.{level}.{'resnets' if sub == 'block' else 'attentions'}.{i}"
        elif mat := re.fullmatch(r"down_(\d+)_downsample", m):
            m = f"down_blocks.{mat.group(1)}.downsamplers.0.conv"
        elif mat := re.fullmatch(r"up_(\d+)_upsample", m):
            m = f"up_blocks.{levels - 1 - int(mat.group(1))}.upsamplers.0.conv"
        elif mat := re.fullmatch(r"mid_(block|attn)_(\d)", m):
            sub, i = mat.groups()
            m = f"mid_block.{'resnets' if sub == 'block' else 'attentions'}.{int(i) - 1}"
        else:
            m = _DIFFUSERS_INNER.get(m, m)
        mods[1] = m
    mods[2:] = [_DIFFUSERS_INNER.get(m, m) for m in mods[2:]]
    return ".".join([*mods, _LEAF[leaf]])


def _is_attn_kernel(key: str, shape: tuple[int, ...]) -> bool:
    return key.endswith("/kernel") and len(shape) == 2


def _torch_shape(key: str, shape: tuple[int, ...], compvis: bool) -> tuple[int, ...]:
    if key.endswith("/kernel") and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if _is_attn_kernel(key, shape):
        return (shape[1], shape[0], 1, 1) if compvis else (shape[1], shape[0])
    return shape


# ------------------------------------------------------------------------------------------- import
def _load(sd: StrictStateDict | Mapping[str, Any], kwargs, prefix: str, compvis: bool) -> dict[str, Any]:
    if not isinstance(sd, StrictStateDict):
        sd = StrictStateDict(sd, what="VAE checkpoint")
    shapes = param_shapes(kwargs)
    levels = len(full_kwargs(kwargs)["ch_mult"])
    flat = {}
    for key, shape in shapes.items():
        name = _compvis_key(key) if compvis else _diffusers_key(key, levels)
        if not compvis and prefix + name not in sd:
            for new, old in _DEPRECATED_ATTN.items():  # diffusers < 0.14 attention names
                alt = name.replace(f".{new}.", f".{old}.")
                if alt != name and prefix + alt in sd:
                    name = alt
        expected = _torch_shape(key, shape, compvis)
        if compvis and _is_attn_kernel(key, shape) and np.ndim(sd.tensors.get(prefix + name)) == 2:
            expected = expected[:2]  # some re-exported single files store these 1x1 convs as Linear weights
        value = sd.take(prefix + name, expected)
        if value is None:
            continue
        if key.endswith("/kernel"):
            value = conv_to_flax(value) if len(shape) == 4 else linear_to_flax(value)
        flat[key] = np.asarray(value, np.float32)
    # LDM autoencoder training checkpoints also carry their loss (LPIPS + discriminator) under `loss.`.
    sd.finish(prefix, ignore=(prefix + "loss.",) if compvis else ())
    return unflatten(flat)


def from_diffusers(sd: StrictStateDict | Mapping[str, Any], kwargs: Mapping[str, Any], prefix: str = "") -> dict:
    """Params from a diffusers AutoencoderKL / VQModel state dict; raises naming any key that does not fit."""
    return _load(sd, kwargs, prefix, compvis=False)


def from_compvis(
    sd: StrictStateDict | Mapping[str, Any], kwargs: Mapping[str, Any], prefix: str = "first_stage_model."
) -> dict:
    """Params from a CompVis state dict (`first_stage_model.` in SD single files, '' for LDM first-stage ckpts)."""
    return _load(sd, kwargs, prefix, compvis=True)


# ------------------------------------------------------------------------------------------- export
def _check_exportable(kw: Mapping[str, Any]) -> None:
    if int(kw.get("patch_size", 1)) != 1:
        raise ValueError(f"an autoencoder with patch_size={kw['patch_size']} (our space-to-depth stem) has no "
                         "diffusers / CompVis equivalent; it is saved and loaded only as an ldm_jax workdir")


def _export(params: Mapping[str, Any], kwargs, prefix: str, compvis: bool) -> dict[str, np.ndarray]:
    _check_exportable(full_kwargs(kwargs))
    shapes = param_shapes(kwargs)
    flat = flatten(params)
    missing, extra = sorted(set(shapes) - set(flat)), sorted(set(flat) - set(shapes))
    wrong = [f"{k}: {np.shape(v)} vs {shapes[k]}" for k, v in flat.items() if k in shapes and np.shape(v) != shapes[k]]
    if missing or extra or wrong:
        raise CheckpointError(
            f"params do not match the autoencoder config: missing {missing}, unexpected {extra}, wrong shape {wrong}"
        )
    levels = len(full_kwargs(kwargs)["ch_mult"])
    out = {}
    for key, shape in shapes.items():
        value = np.asarray(jax.device_get(flat[key]), np.float32)
        if key.endswith("/kernel") and len(shape) == 4:
            value = conv_to_torch(value)
        elif _is_attn_kernel(key, shape):
            value = linear_to_torch(value)
            if compvis:
                value = value[:, :, None, None]
        out[prefix + (_compvis_key(key) if compvis else _diffusers_key(key, levels))] = np.ascontiguousarray(value)
    return out


def to_diffusers(params: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A diffusers-layout state dict (float32 numpy) from our params."""
    config_to_diffusers(kwargs)  # raises early where diffusers cannot hold this model
    return _export(params, kwargs, "", compvis=False)


def to_compvis(
    params: Mapping[str, Any], kwargs: Mapping[str, Any], prefix: str = "first_stage_model."
) -> dict[str, np.ndarray]:
    """A CompVis-layout state dict (float32 numpy) under `prefix` from our params."""
    return _export(params, kwargs, prefix, compvis=True)
