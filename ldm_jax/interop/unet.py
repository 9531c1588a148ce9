"""UNet weights and configs to and from diffusers (`UNet2DConditionModel` / `UNet2DModel`) and CompVis single files.

Both directions walk our own parameter tree and name the PyTorch tensor for every leaf, so a load through
`StrictStateDict` accounts for every key, and export -> import is exact.
"""
from __future__ import annotations

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
from ldm_jax.models.unet import UNet

COMPVIS_PREFIX = "model.diffusion_model."
_COMPVIS_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _abstract_params(kwargs: Mapping[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat {path: ShapeDtypeStruct} of the UNet's parameters (eval_shape, nothing allocated)."""
    model = UNet(**kwargs)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *model.example_inputs()))
    return flatten(shapes["params"])


def _block_prefixes(kwargs: Mapping[str, Any], layout: str) -> dict[str, tuple[str, str]]:
    """Our top-level module name -> (torch prefix, block kind) for `layout` 'diffusers' or 'compvis'."""
    m = UNet(**kwargs)
    levels, nrb = len(m.channel_mult), m.num_res_blocks
    attn = "st" if m.use_spatial_transformer else "legacy"
    cv = layout == "compvis"
    out = {
        "conv_in": ("input_blocks.0.0" if cv else "conv_in", "leaf"),
        "time_embedding_linear_1": ("time_embed.0" if cv else "time_embedding.linear_1", "leaf"),
        "time_embedding_linear_2": ("time_embed.2" if cv else "time_embedding.linear_2", "leaf"),
        "class_embedding": ("label_emb" if cv else "class_embedding", "leaf"),
        "add_embedding_linear_1": ("label_emb.0.0" if cv else "add_embedding.linear_1", "leaf"),
        "add_embedding_linear_2": ("label_emb.0.2" if cv else "add_embedding.linear_2", "leaf"),
        "norm_out": ("out.0" if cv else "conv_norm_out", "leaf"),
        "conv_out": ("out.2" if cv else "conv_out", "leaf"),
        "mid_res_0": ("middle_block.0" if cv else "mid_block.resnets.0", "res"),
        "mid_attn": ("middle_block.1" if cv else "mid_block.attentions.0", attn),
        "mid_res_1": ("middle_block.2" if cv else "mid_block.resnets.1", "res"),
    }
    ds, n = 1, 1
    for level in range(levels):
        for i in range(nrb):
            out[f"down_{level}_res_{i}"] = (f"input_blocks.{n}.0" if cv else f"down_blocks.{level}.resnets.{i}", "res")
            out[f"down_{level}_attn_{i}"] = (f"input_blocks.{n}.1" if cv else f"down_blocks.{level}.attentions.{i}", attn)
            n += 1
        if level != levels - 1:
            kind = "res" if m.resblock_updown else "resample"
            out[f"down_{level}_downsample"] = (f"input_blocks.{n}.0" if cv else f"down_blocks.{level}.downsamplers.0", kind)
            n += 1
            ds *= 2
    n = 0
    for level in reversed(range(levels)):
        up = levels - 1 - level
        has_attn = ds in m.attention_resolutions
        for i in range(nrb + 1):
            out[f"up_{level}_res_{i}"] = (f"output_blocks.{n}.0" if cv else f"up_blocks.{up}.resnets.{i}", "res")
            out[f"up_{level}_attn_{i}"] = (f"output_blocks.{n}.1" if cv else f"up_blocks.{up}.attentions.{i}", attn)
            n += 1
        if level:
            kind = "res" if m.resblock_updown else "resample"
            idx = 2 if has_attn else 1
            out[f"up_{level}_upsample"] = (f"output_blocks.{n - 1}.{idx}" if cv else f"up_blocks.{up}.upsamplers.0", kind)
            ds //= 2
    return out


def _leaf_map(kwargs: Mapping[str, Any], layout: str) -> dict[str, tuple[str, str]]:
    """Our flat param path -> (torch key, kind); kind picks the layout transform (see `_to_flax`)."""
    if kwargs.get("coordinate_frequencies"):
        raise ValueError(f"a UNet with coordinate_frequencies={kwargs['coordinate_frequencies']} (our coordinate "
                         f"embedding) has no {layout} equivalent; it loads and saves only as an ldm_jax workdir")
    m = UNet(**kwargs)
    blocks = _block_prefixes(kwargs, layout)
    cv = layout == "compvis"
    proj_kind = "linear" if m.use_linear_in_transformer else "conv1x1"
    result = {}
    for path, value in _abstract_params_cache(kwargs).items():
        parts = path.split("/")
        prefix, block = blocks[parts[0]]
        sub, leaf = parts[1:-1], parts[-1]
        suffix = "weight" if leaf in ("kernel", "scale", "embedding") else "bias"
        kind = {4: "conv", 2: "linear", 1: "vec"}[value.ndim] if leaf != "embedding" else "vec"
        if block == "leaf":
            name = prefix
        elif block == "resample":
            name = f"{prefix}.op" if cv and parts[0].startswith("down") else f"{prefix}.conv"
        elif block == "res":
            name = f"{prefix}.{_COMPVIS_RES[sub[0]] if cv else sub[0]}"
        elif block == "st":
            if sub[0].startswith("transformer_blocks_"):
                j = sub[0].rsplit("_", 1)[1]
                inner = {"ff_proj": "ff.net.0.proj", "ff_out": "ff.net.2"}.get(sub[1], sub[1])
                if len(sub) == 3:  # attn1/to_q ...
                    inner = f"{inner}.{sub[2]}" + (".0" if sub[2] == "to_out" else "")
                name = f"{prefix}.transformer_blocks.{j}.{inner}"
            else:
                name = f"{prefix}.{sub[0]}"
                if sub[0] in ("proj_in", "proj_out") and leaf == "kernel":
                    kind = proj_kind
        else:  # legacy AttentionBlock
            if sub[0] == "group_norm":
                name = f"{prefix}.{'norm' if cv else 'group_norm'}"
            elif not cv:
                name = f"{prefix}.{sub[1]}" + (".0" if sub[1] == "to_out" else "")
            elif sub[1] == "to_out":
                name, kind = f"{prefix}.proj_out", ("conv1d" if leaf == "kernel" else "vec")
            else:  # q, k, v live interleaved per head in one 1x1 conv1d `qkv` (QKVAttentionLegacy)
                heads = m.heads(value.shape[-1])
                name, kind = f"{prefix}.qkv", f"qkv:{'qkv'.index(sub[1][-1])}:{heads}"
        result[path] = (f"{name}.{suffix}", kind)
    return result


def _torch_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    if kind == "linear":
        return (shape[1], shape[0])
    if kind == "conv":
        return (shape[3], shape[2], shape[0], shape[1])
    if kind == "conv1x1":
        return (shape[1], shape[0], 1, 1)
    if kind == "conv1d":
        return (shape[1], shape[0], 1)
    if kind.startswith("qkv"):
        return (3 * shape[-1], shape[0], 1) if len(shape) == 2 else (3 * shape[0],)
    return tuple(shape)


def _qkv_rows(kind: str, channels: int) -> np.ndarray:
    """Rows of a legacy qkv tensor that hold q (0), k (1) or v (2): channel = head*3*ch + s*ch + d."""
    _, s, heads = kind.split(":")
    ch = channels // int(heads)
    return (np.arange(int(heads))[:, None] * 3 * ch + int(s) * ch + np.arange(ch)[None, :]).reshape(-1)


def _to_flax(t: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "conv":
        return conv_to_flax(t)
    if kind in ("linear", "conv1x1", "conv1d"):
        return linear_to_flax(t[..., 0] if kind == "conv1d" else t)
    if kind.startswith("qkv"):
        rows = t[_qkv_rows(kind, shape[-1])]
        return linear_to_flax(rows[..., 0]) if rows.ndim == 3 else rows
    return np.asarray(t)


def _load(sd: StrictStateDict, kwargs: Mapping[str, Any], prefix: str, layout: str) -> dict[str, Any]:
    params = {}
    for path, (key, kind) in _leaf_map(kwargs, layout).items():
        shape = _abstract_params_cache(kwargs)[path].shape
        t = sd.take(prefix + key, _torch_shape(shape, kind))
        if t is not None:
            params[path] = jnp.asarray(_to_flax(np.asarray(t, np.float32), kind, shape))
    sd.finish(prefix)
    return unflatten(params)


def _export(params: Mapping[str, Any], kwargs: Mapping[str, Any], prefix: str, layout: str) -> dict[str, np.ndarray]:
    flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
    mapping = _leaf_map(kwargs, layout)
    if set(flat) != set(mapping):
        raise CheckpointError(f"params do not match the UNet config: {sorted(set(flat) ^ set(mapping))[:12]}")
    out: dict[str, np.ndarray] = {}
    for path, (key, kind) in mapping.items():
        v = flat[path]
        if kind == "conv":
            out[prefix + key] = conv_to_torch(v)
        elif kind == "linear":
            out[prefix + key] = linear_to_torch(v)
        elif kind == "conv1x1":
            out[prefix + key] = linear_to_torch(v)[:, :, None, None]
        elif kind == "conv1d":
            out[prefix + key] = linear_to_torch(v)[:, :, None]
        elif kind.startswith("qkv"):
            channels = v.shape[-1]
            full = out.setdefault(prefix + key, np.zeros((3 * channels, v.shape[0], 1) if v.ndim == 2 else (3 * channels,), np.float32))
            full[_qkv_rows(kind, channels)] = linear_to_torch(v)[:, :, None] if v.ndim == 2 else v
        else:
            out[prefix + key] = v
    return out


_SHAPES: dict[str, dict[str, Any]] = {}


def _abstract_params_cache(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    key = repr(sorted((k, str(v)) for k, v in kwargs.items()))
    if key not in _SHAPES:
        _SHAPES[key] = _abstract_params(kwargs)
    return _SHAPES[key]


def from_diffusers(sd: StrictStateDict, kwargs: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Params from a diffusers UNet state dict (`diffusion_pytorch_model.safetensors`)."""
    return _load(sd, kwargs, prefix, "diffusers")


def to_diffusers(params: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A diffusers UNet state dict (float32 numpy) from our params."""
    return _export(params, kwargs, "", "diffusers")


def from_compvis(sd: StrictStateDict, kwargs: Mapping[str, Any], prefix: str = COMPVIS_PREFIX) -> dict[str, Any]:
    """Params from a CompVis/SD single-file state dict (`model.diffusion_model.input_blocks.N...`)."""
    return _load(sd, kwargs, prefix, "compvis")


def to_compvis(params: Mapping[str, Any], kwargs: Mapping[str, Any], prefix: str = COMPVIS_PREFIX) -> dict[str, np.ndarray]:
    """CompVis/SD single-file UNet tensors (float32 numpy) from our params."""
    return _export(params, kwargs, prefix, "compvis")


# ---------------------------------------------------------------------------------------------- configs

_DIFFUSERS_FIXED = {"flip_sin_to_cos": True, "freq_shift": 0,
                    "class_embed_type": None, "encoder_hid_dim": None, "time_cond_proj_dim": None,
                    "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
                    "time_embedding_type": "positional", "conv_in_kernel": 3, "conv_out_kernel": 3,
                    "only_cross_attention": False, "dual_cross_attention": False, "center_input_sample": False}


def config_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Our UNet kwargs from a diffusers `UNet2DConditionModel` or `UNet2DModel` config.json dict."""
    for k, want in _DIFFUSERS_FIXED.items():
        if k in cfg and cfg[k] != want and not (isinstance(cfg[k], list) and not any(cfg[k])):
            raise ValueError(f"diffusers UNet config {k}={cfg[k]!r} is not supported (only {want!r})")
    if cfg.get("act_fn", "silu") != "silu":
        raise ValueError(f"diffusers UNet config act_fn={cfg['act_fn']!r} is not supported (only 'silu')")
    if cfg.get("attn_norm_num_groups") not in (None, cfg.get("norm_num_groups", 32)):
        raise ValueError(f"diffusers UNet config attn_norm_num_groups={cfg['attn_norm_num_groups']} differs from "
                         f"norm_num_groups={cfg.get('norm_num_groups', 32)}: not supported")
    if cfg.get("reverse_transformer_layers_per_block") is not None:
        raise ValueError("diffusers UNet config reverse_transformer_layers_per_block is not supported")
    if cfg.get("addition_embed_type") not in (None, "text_time"):
        raise ValueError(f"diffusers UNet config addition_embed_type={cfg['addition_embed_type']!r} is not supported "
                         "(only None or 'text_time')")
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"):
        raise ValueError(f"diffusers UNet config mid_block_type={cfg['mid_block_type']!r} is not supported")
    bo = list(cfg["block_out_channels"])
    mc = bo[0]
    if any(c % mc for c in bo):
        raise ValueError(f"block_out_channels {bo} are not multiples of the first")
    downs = list(cfg["down_block_types"])
    conditional = cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DModel"
    lpb = cfg.get("layers_per_block", 2)
    if not isinstance(lpb, int):
        if len(set(lpb)) != 1:
            raise ValueError(f"layers_per_block must be the same for every block, got {lpb}")
        lpb = lpb[0]
    for t in downs:
        if t not in ("CrossAttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"):
            raise ValueError(f"down block type {t!r} is not supported")
    kw: dict[str, Any] = dict(
        in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4), model_channels=mc,
        channel_mult=tuple(c // mc for c in bo), num_res_blocks=lpb,
        attention_resolutions=tuple(sorted((2**i for i, t in enumerate(downs) if "Attn" in t), reverse=True)),
        use_scale_shift_norm=cfg.get("resnet_time_scale_shift", "default") == "scale_shift",
        num_classes=cfg.get("num_class_embeds"),
        norm_num_groups=int(cfg.get("norm_num_groups", 32)), norm_eps=float(cfg.get("norm_eps", 1e-5)),
    )
    if cfg.get("addition_embed_type") == "text_time":
        kw.update(adm_in_channels=int(cfg["projection_class_embeddings_input_dim"]),
                  addition_time_embed_dim=int(cfg.get("addition_time_embed_dim") or 256))
    if conditional:
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)  # SD's attention_head_dim = heads
        kw.update(context_dim=cfg.get("cross_attention_dim", 1280), use_spatial_transformer=True, resblock_updown=False,
                  use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)))
        depth = cfg.get("transformer_layers_per_block", 1)
        kw["transformer_depth"] = depth if isinstance(depth, int) else tuple(depth)
    else:
        if cfg.get("downsample_type", "conv") != cfg.get("upsample_type", "conv"):
            raise ValueError("downsample_type and upsample_type must agree")
        updown = cfg.get("downsample_type") == "resnet" or "ResnetDownsampleBlock2D" in downs
        kw.update(context_dim=None, use_spatial_transformer=False, resblock_updown=updown)
        hd = cfg.get("attention_head_dim")
        heads = [1] * len(bo) if hd is None else [c // hd for c in bo]
    if isinstance(heads, int):
        kw.update(num_heads=heads, num_head_channels=-1)
    elif len(set(heads)) == 1:
        kw.update(num_heads=heads[0], num_head_channels=-1)
    else:
        widths = {c // h for c, h in zip(bo, heads)}
        if len(widths) != 1:
            raise ValueError(f"attention heads {heads} give neither a constant count nor a constant width")
        kw.update(num_heads=-1, num_head_channels=widths.pop())
    return kw


def config_to_diffusers(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers config.json dict (`UNet2DConditionModel`, or `UNet2DModel` for plain-attention models)."""
    m = UNet(**kwargs)
    bo = [m.model_channels * c for c in m.channel_mult]
    attn = [2**i in m.attention_resolutions for i in range(len(bo))]
    heads = [m.heads(c) for c in bo]
    cfg: dict[str, Any] = dict(
        in_channels=m.in_channels, out_channels=m.out_channels, block_out_channels=bo,
        layers_per_block=m.num_res_blocks, norm_num_groups=m.norm_num_groups, norm_eps=m.norm_eps, flip_sin_to_cos=True,
        freq_shift=0,
        resnet_time_scale_shift="scale_shift" if m.use_scale_shift_norm else "default",
        num_class_embeds=m.num_classes, act_fn="silu",
    )
    if m.adm_in_channels is not None:
        if not m.use_spatial_transformer:
            raise ValueError("diffusers expresses added conditioning (adm_in_channels) only in UNet2DConditionModel")
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=m.addition_time_embed_dim,
                   projection_class_embeddings_input_dim=m.adm_in_channels)
    if m.transformer_depth_middle is not None and m.transformer_depth_middle != m.depth(len(bo) - 1):
        raise ValueError(f"diffusers' mid block takes the last level's transformer depth ({m.depth(len(bo) - 1)}); "
                         f"transformer_depth_middle={m.transformer_depth_middle} cannot be saved in this layout")
    if m.use_spatial_transformer:
        if m.context_dim is None or m.resblock_updown or not m.conv_resample:
            raise ValueError("diffusers UNet2DConditionModel needs context_dim, resblock_updown=False, conv_resample=True")
        depth = m.transformer_depth if isinstance(m.transformer_depth, int) else list(m.transformer_depth)
        cfg.update(
            _class_name="UNet2DConditionModel", sample_size=64, cross_attention_dim=m.context_dim,
            down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
            mid_block_type="UNetMidBlock2DCrossAttn", use_linear_projection=m.use_linear_in_transformer,
            attention_head_dim=heads[0] if m.num_head_channels == -1 else heads, transformer_layers_per_block=depth,
        )
        return cfg
    widths = {c // h for c, h in zip(bo, heads)}
    if len(widths) != 1 or not m.conv_resample:
        raise ValueError(f"diffusers UNet2DModel needs one head width for all levels (got {sorted(widths)}) "
                         "and conv_resample=True; save this model in the CompVis layout instead")
    cfg.update(
        _class_name="UNet2DModel", sample_size=64, attention_head_dim=widths.pop(),
        down_block_types=["AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" if m.resblock_updown else "DownBlock2D"
                          for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" if m.resblock_updown else "UpBlock2D"
                        for a in reversed(attn)],
        attn_norm_num_groups=m.norm_num_groups,  # diffusers' mid block drops its attention norm with scale_shift otherwise
        downsample_type="resnet" if m.resblock_updown else "conv", upsample_type="resnet" if m.resblock_updown else "conv",
        add_attention=True,
    )
    return cfg


def _blocks_of(keys: list[str], pattern: str) -> dict[int, dict[int, set[str]]]:
    """{block index: {element index: set of sub-keys}} for keys like `output_blocks.N.K.rest`."""
    out: dict[int, dict[int, set[str]]] = {}
    for k in keys:
        mt = re.match(pattern + r"\.(\d+)\.(\d+)\.(.+)$", k)
        if mt:
            out.setdefault(int(mt[1]), {}).setdefault(int(mt[2]), set()).add(mt[3])
    return out


def config_from_compvis(
    tensors: Mapping[str, Any], prefix: str = COMPVIS_PREFIX, *, num_heads: int | None = None,
    num_head_channels: int | None = None, norm_num_groups: int = 32, norm_eps: float = 1e-5,
    addition_time_embed_dim: int = 256,
) -> dict[str, Any]:
    """Our UNet kwargs inferred from CompVis single-file tensor shapes.

    Head counts are not visible in shapes: SD2-style (linear proj, context 1024) and SDXL-style (vector
    conditioning `label_emb.0.0`) get num_head_channels=64, otherwise num_heads=8 (SD1); pass
    `num_heads` / `num_head_channels` for other models. GroupNorm groups and eps are not visible either
    (every released SD/SDXL file uses 32 and 1e-5), nor is SDXL's Fourier width per micro-conditioning id (256).
    """
    shape = lambda k: tuple(tensors[prefix + k].shape)  # noqa: E731
    keys = [k[len(prefix):] for k in tensors if k.startswith(prefix)]
    if "input_blocks.0.0.weight" not in keys:
        raise CheckpointError(f"no UNet under prefix {prefix!r} (missing {prefix}input_blocks.0.0.weight)")
    mc, cin = shape("input_blocks.0.0.weight")[:2]
    outs = _blocks_of(keys, "output_blocks")
    is_attn = lambda subs: any(s.startswith(("norm.", "qkv.", "proj_in.", "transformer_blocks.")) for s in subs)  # noqa: E731
    ups = [n for n in sorted(outs) if any(k > 0 and not is_attn(outs[n][k]) for k in outs[n])]
    levels = len(ups) + 1
    nrb = ups[0] if ups else len(outs) - 1
    mult, attn_res, depths = [], [], []
    for level in range(levels):
        n = (levels - 1 - level) * (nrb + 1)
        mult.append(shape(f"output_blocks.{n}.0.out_layers.3.weight")[0] // mc)
        if 1 in outs[n] and is_attn(outs[n][1]):
            attn_res.append(2**level)
            depths.append(len({s.split(".")[1] for s in outs[n][1] if s.startswith("transformer_blocks.")}))
        else:
            depths.append(None)  # a level without attention (SDXL's first): its depth is unused
    spatial = any(".transformer_blocks." in k for k in keys)
    kw: dict[str, Any] = dict(
        in_channels=cin, out_channels=shape("out.2.weight")[0], model_channels=mc, channel_mult=tuple(mult),
        num_res_blocks=nrb, attention_resolutions=tuple(sorted(attn_res, reverse=True)),
        use_spatial_transformer=spatial,
        use_scale_shift_norm=shape("input_blocks.1.0.emb_layers.1.weight")[0] == 2 * shape("input_blocks.1.0.out_layers.3.weight")[0],
        resblock_updown=any(f"output_blocks.{n}" in k and ".in_layers." in k and not k.startswith(f"output_blocks.{n}.0.")
                            for n in ups for k in keys),
        num_classes=shape("label_emb.weight")[0] if "label_emb.weight" in keys else None,
        norm_num_groups=norm_num_groups, norm_eps=norm_eps,
    )
    if "label_emb.0.0.weight" in keys:  # SGM's vector conditioning (SDXL's pooled text + micro-conditioning)
        kw.update(adm_in_channels=shape("label_emb.0.0.weight")[1], addition_time_embed_dim=addition_time_embed_dim)
    if spatial:
        k_key = next(k for k in keys if k.endswith("attn2.to_k.weight"))
        proj = next(k for k in keys if k.endswith("proj_in.weight"))
        kw.update(context_dim=shape(k_key)[1], use_linear_in_transformer=len(shape(proj)) == 2)
        depth_mid = len({k.split(".")[3] for k in keys if k.startswith("middle_block.1.transformer_blocks.")})
        used = {d for d in depths if d is not None}
        fill = depth_mid if used <= {depth_mid} else 1  # as diffusers' SDXL config: (1, 2, 10)
        depths = [fill if d is None else d for d in depths]
        kw["transformer_depth"] = depths[0] if len(set(depths)) == 1 else tuple(depths)
        if depth_mid != depths[-1]:
            kw["transformer_depth_middle"] = depth_mid
    else:
        kw["context_dim"] = None
    if num_heads is None and num_head_channels is None:
        # SD2 and SDXL use 64-wide heads; SD1 and the LDM text models 8 heads
        sd2 = spatial and kw["use_linear_in_transformer"] and (kw["context_dim"] == 1024 or "adm_in_channels" in kw)
        num_heads, num_head_channels = (-1, 64) if sd2 else (8, -1)
    kw.update(num_heads=-1 if num_heads is None else num_heads,
              num_head_channels=-1 if num_head_channels is None else num_head_channels)
    return kw
