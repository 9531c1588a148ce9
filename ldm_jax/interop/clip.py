"""CLIP text encoder weights: transformers `CLIPTextModel` layout and CompVis/SD single-file layouts.

Layouts
- "diffusers": transformers' CLIPTextModel (`text_model.encoder.layers.N.self_attn.q_proj.weight`, ...),
  as in a diffusers folder's `text_encoder/`; `text_projection.weight` when the model has a projection.
- SD1 single file: the same layout under `cond_stage_model.transformer.`.
- SD2 single file: OpenCLIP under `cond_stage_model.model.` (`transformer.resblocks.N.attn.in_proj_weight`
  with q, k, v fused, `positional_embedding`, `ln_final`, `text_projection` (width, proj), `logit_scale`).
  SD2 runs 23 of its 24 layers then `ln_final`; such a file loads as the full 24-layer tower with
  `output_layer=-2`, and exports to a diffusers folder as the 23-layer model diffusers ships (the
  unused last layer and the projection are dropped there, as diffusers' own converter does).

Neither single-file layout stores the head count; it is inferred as width // 64 (true of both OpenAI
CLIP ViT-L/14 and OpenCLIP ViT-H/14). Our own single-file exports carry the exact kwargs as metadata.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ldm_jax.interop.common import CheckpointError, StrictStateDict, flatten, linear_to_flax, linear_to_torch, unflatten

_DEFAULTS = dict(max_length=77, act="quick_gelu", causal=True, layer_norm_eps=1e-5, output_layer=-1,
                 final_norm=True, eos_token_id=None, projection_dim=None)
_LEGACY_EOS = 2  # transformers configs saying eos_token_id=2 pool at argmax(input_ids)


def _kw(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {**_DEFAULTS, **kwargs}


# --------------------------------------------------------------------------------------------- configs
def config_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """transformers CLIPTextConfig dict (text_encoder/config.json) -> complete CLIPTextTransformer kwargs."""
    if cfg.get("model_type") == "clip" and "text_config" in cfg:  # a full CLIPModel config
        cfg = cfg["text_config"]
    eos = cfg.get("eos_token_id", 49407)
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    hidden = cfg.get("hidden_size", 512)
    out = dict(
        vocab_size=cfg.get("vocab_size", 49408),
        width=hidden,
        layers=cfg.get("num_hidden_layers", 12),
        heads=cfg.get("num_attention_heads", 8),
        mlp_dim=cfg.get("intermediate_size", 2048),
        max_length=cfg.get("max_position_embeddings", 77),
        act=cfg.get("hidden_act", "quick_gelu"),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
        eos_token_id=None if eos == _LEGACY_EOS else eos,
    )
    if "CLIPTextModelWithProjection" in (cfg.get("architectures") or []):
        out["projection_dim"] = cfg.get("projection_dim", 512)
    out.update(cfg.get("ldm_jax", {}))  # what transformers cannot express (non-causal, un-normed penultimate)
    return _kw(out)


def _diffusers_layers(kw: Mapping[str, Any]) -> tuple[int, bool]:
    """(layers to export, keep projection): a normed penultimate output exports as a truncated model."""
    if kw["output_layer"] != -1 and kw["final_norm"]:
        return kw["layers"] + kw["output_layer"] + 1, False
    return kw["layers"], kw["projection_dim"] is not None


def config_to_diffusers(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """CLIPTextTransformer kwargs -> a config.json that transformers' CLIPTextModel opens."""
    kw = _kw(kwargs)
    n_layers, proj = _diffusers_layers(kw)
    cfg = {
        "architectures": ["CLIPTextModelWithProjection" if proj else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": kw["vocab_size"],
        "hidden_size": kw["width"],
        "intermediate_size": kw["mlp_dim"],
        "num_hidden_layers": n_layers,
        "num_attention_heads": kw["heads"],
        "max_position_embeddings": kw["max_length"],
        "hidden_act": kw["act"],
        "layer_norm_eps": kw["layer_norm_eps"],
        "projection_dim": kw["projection_dim"] if proj else kw["width"],
        "bos_token_id": 0 if kw["eos_token_id"] is None else 49406,
        "eos_token_id": _LEGACY_EOS if kw["eos_token_id"] is None else kw["eos_token_id"],
        "pad_token_id": 1,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "dtype": "float32",
    }
    extra = {}
    if not kw["causal"]:
        extra["causal"] = False  # transformers' CLIP is always causal: our loader reads this back
    if kw["output_layer"] != -1 and not kw["final_norm"]:
        extra.update(output_layer=kw["output_layer"], final_norm=False)
    if extra:
        cfg["ldm_jax"] = extra
    return cfg


# --------------------------------------------------------------------------------------------- key tables
# Each entry: (torch key, our flat path, kind, torch shape); kind "linear" transposes, "copy" does not.
Entry = tuple[str, str, str, tuple[int, ...]]


def _hf_entries(kw: Mapping[str, Any], prefix: str, n_layers: int, proj: bool, nested: bool = True) -> list[Entry]:
    """transformers keys; `nested`: under `text_model.` (every checkpoint before transformers 5 and ours)."""
    w, m = kw["width"], kw["mlp_dim"]
    b = prefix + ("text_model." if nested else "")
    e: list[Entry] = [
        (b + "embeddings.token_embedding.weight", "token_embedding/embedding", "copy", (kw["vocab_size"], w)),
        (b + "embeddings.position_embedding.weight", "position_embedding", "copy", (kw["max_length"], w)),
    ]
    for i in range(n_layers):
        t, o = f"{b}encoder.layers.{i}.", f"layers_{i}/"
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            e += [(f"{t}self_attn.{p}.weight", f"{o}self_attn/{p}/kernel", "linear", (w, w)),
                  (f"{t}self_attn.{p}.bias", f"{o}self_attn/{p}/bias", "copy", (w,))]
        for ln in ("layer_norm1", "layer_norm2"):
            e += [(f"{t}{ln}.weight", f"{o}{ln}/scale", "copy", (w,)), (f"{t}{ln}.bias", f"{o}{ln}/bias", "copy", (w,))]
        e += [(f"{t}mlp.fc1.weight", f"{o}fc1/kernel", "linear", (m, w)), (f"{t}mlp.fc1.bias", f"{o}fc1/bias", "copy", (m,)),
              (f"{t}mlp.fc2.weight", f"{o}fc2/kernel", "linear", (w, m)), (f"{t}mlp.fc2.bias", f"{o}fc2/bias", "copy", (w,))]
    e += [(b + "final_layer_norm.weight", "final_layer_norm/scale", "copy", (w,)),
          (b + "final_layer_norm.bias", "final_layer_norm/bias", "copy", (w,))]
    if proj:
        e.append((prefix + "text_projection.weight", "text_projection/kernel", "linear", (kw["projection_dim"], w)))
    return e


def _openclip_entries(kw: Mapping[str, Any], base: str) -> list[Entry]:
    """OpenCLIP keys under `base`; the fused in_proj tensors are handled separately ("qkv" kind)."""
    w, m = kw["width"], kw["mlp_dim"]
    e: list[Entry] = [
        (base + "token_embedding.weight", "token_embedding/embedding", "copy", (kw["vocab_size"], w)),
        (base + "positional_embedding", "position_embedding", "copy", (kw["max_length"], w)),
    ]
    for i in range(kw["layers"]):
        t, o = f"{base}transformer.resblocks.{i}.", f"layers_{i}/"
        e += [(f"{t}attn.in_proj_weight", f"{o}self_attn", "qkv_w", (3 * w, w)),
              (f"{t}attn.in_proj_bias", f"{o}self_attn", "qkv_b", (3 * w,)),
              (f"{t}attn.out_proj.weight", f"{o}self_attn/out_proj/kernel", "linear", (w, w)),
              (f"{t}attn.out_proj.bias", f"{o}self_attn/out_proj/bias", "copy", (w,))]
        for theirs, ours in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
            e += [(f"{t}{theirs}.weight", f"{o}{ours}/scale", "copy", (w,)), (f"{t}{theirs}.bias", f"{o}{ours}/bias", "copy", (w,))]
        e += [(f"{t}mlp.c_fc.weight", f"{o}fc1/kernel", "linear", (m, w)), (f"{t}mlp.c_fc.bias", f"{o}fc1/bias", "copy", (m,)),
              (f"{t}mlp.c_proj.weight", f"{o}fc2/kernel", "linear", (w, m)), (f"{t}mlp.c_proj.bias", f"{o}fc2/bias", "copy", (w,))]
    e += [(base + "ln_final.weight", "final_layer_norm/scale", "copy", (w,)),
          (base + "ln_final.bias", "final_layer_norm/bias", "copy", (w,))]
    if kw["projection_dim"] is not None:  # OpenCLIP applies x @ text_projection: already (in, out)
        e.append((base + "text_projection", "text_projection/kernel", "copy", (w, kw["projection_dim"])))
    return e


_QKV = ("q_proj", "k_proj", "v_proj")


def _load(sd: StrictStateDict, entries: list[Entry]) -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for key, path, kind, shape in entries:
        v = sd.take(key, shape)
        if v is None:
            continue
        if kind == "linear":
            flat[path] = linear_to_flax(v)
        elif kind == "copy":
            flat[path] = np.asarray(v)
        else:  # fused q, k, v rows in that order
            for name, part in zip(_QKV, np.split(np.asarray(v), 3, axis=0)):
                flat[f"{path}/{name}/" + ("kernel" if kind == "qkv_w" else "bias")] = (
                    linear_to_flax(part) if kind == "qkv_w" else part)
    return flat


def _dump(params: Mapping[str, Any], kw: Mapping[str, Any], entries: list[Entry]) -> dict[str, np.ndarray]:
    flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
    expected = {p if k not in ("qkv_w", "qkv_b") else f"{p}/{n}/{'kernel' if k == 'qkv_w' else 'bias'}"
                for _, p, k, _ in _hf_entries(kw, "", kw["layers"], kw["projection_dim"] is not None)
                for n in (_QKV if k in ("qkv_w", "qkv_b") else ("",))}
    if set(flat) != expected:
        raise CheckpointError(f"text encoder params do not match the kwargs: missing {sorted(expected - set(flat))[:8]}, "
                              f"unexpected {sorted(set(flat) - expected)[:8]}")
    out: dict[str, np.ndarray] = {}
    for key, path, kind, shape in entries:
        if kind == "linear":
            out[key] = linear_to_torch(flat[path])
        elif kind == "copy":
            out[key] = np.ascontiguousarray(flat[path])
        elif kind == "qkv_w":
            out[key] = np.concatenate([linear_to_torch(flat[f"{path}/{n}/kernel"]) for n in _QKV], axis=0)
        else:
            out[key] = np.concatenate([flat[f"{path}/{n}/bias"] for n in _QKV], axis=0)
        if out[key].shape != shape:
            raise ValueError(f"parameter for {key} has shape {out[key].shape}, expected {shape} from the kwargs")
    return out


# --------------------------------------------------------------------------------------------- diffusers / transformers
def from_diffusers(sd: StrictStateDict, kwargs: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """transformers CLIPTextModel(WithProjection) state dict -> params.

    Keys are `prefix + text_model.…` or, as transformers 5 saves a bare CLIPTextModel, `prefix + …`.
    """
    kw = _kw(kwargs)
    nested = prefix + "embeddings.token_embedding.weight" not in sd
    flat = _load(sd, _hf_entries(kw, prefix, kw["layers"], kw["projection_dim"] is not None, nested))
    position_ids = prefix + ("text_model." if nested else "") + "embeddings.position_ids"
    if position_ids in sd:  # a buffer (arange) that older transformers saved: accounted for, not needed
        sd.take(position_ids)
    sd.finish(prefix)
    return unflatten(flat)


def to_diffusers(params: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """params -> transformers CLIPTextModel state dict matching `config_to_diffusers(kwargs)`.

    Keys are written under `text_model.`, the layout every transformers version and SD tool reads.
    """
    kw = _kw(kwargs)
    n_layers, proj = _diffusers_layers(kw)
    return _dump(params, kw, _hf_entries(kw, "", n_layers, proj))


# --------------------------------------------------------------------------------------------- CompVis single files
def compvis_layout(tensors: Mapping[str, Any], prefix: str = "cond_stage_model.") -> str | None:
    """'hf' (SD1, `prefix + transformer.`), 'open_clip' (SD2, `prefix + model.`), or None when absent."""
    if any(prefix + f"transformer.{m}embeddings.token_embedding.weight" in tensors for m in ("text_model.", "")):
        return "hf"
    if prefix + "model.token_embedding.weight" in tensors:
        return "open_clip"
    return None


def config_from_compvis(tensors: Mapping[str, Any], prefix: str = "cond_stage_model.") -> dict[str, Any]:
    """Infers (complete) kwargs from a single file's tensor shapes (SD1 OpenAI CLIP or SD2 OpenCLIP)."""
    layout = compvis_layout(tensors, prefix)
    if layout is None:
        raise KeyError(f"no CLIP text encoder under {prefix!r} (looked for {prefix}transformer.text_model. "
                       f"and {prefix}model.)")
    if layout == "hf":
        b = prefix + "transformer."
        b += "text_model." if b + "text_model.embeddings.token_embedding.weight" in tensors else ""
        n = _count(tensors, b + "encoder.layers.")
        vocab, width = tensors[b + "embeddings.token_embedding.weight"].shape
        return _kw(dict(vocab_size=vocab, width=width, layers=n, heads=max(1, width // 64),
                    mlp_dim=tensors[b + "encoder.layers.0.mlp.fc1.weight"].shape[0],
                    max_length=tensors[b + "embeddings.position_embedding.weight"].shape[0], act="quick_gelu",
                    **({"projection_dim": tensors[prefix + "transformer.text_projection.weight"].shape[0]}
                       if prefix + "transformer.text_projection.weight" in tensors else {})))
    b = prefix + "model."
    n = _count(tensors, b + "transformer.resblocks.")
    vocab, width = tensors[b + "token_embedding.weight"].shape
    out = dict(vocab_size=vocab, width=width, layers=n, heads=max(1, width // 64),
               mlp_dim=tensors[b + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
               max_length=tensors[b + "positional_embedding"].shape[0], act="gelu", output_layer=-2)
    if b + "text_projection" in tensors:
        out["projection_dim"] = tensors[b + "text_projection"].shape[1]
    return _kw(out)


def _count(tensors: Mapping[str, Any], head: str) -> int:
    idx = {int(k[len(head):].split(".")[0]) for k in tensors if k.startswith(head)}
    if not idx:
        raise KeyError(f"no layers under {head!r}")
    return max(idx) + 1


def default_compvis_layout(kwargs: Mapping[str, Any]) -> str:
    """SD1's OpenAI CLIP uses quick_gelu (HF layout in SD1 files); gelu encoders are written as OpenCLIP (SD2)."""
    return "open_clip" if _kw(kwargs)["act"] == "gelu" else "hf"


def from_compvis(sd: StrictStateDict, kwargs: Mapping[str, Any], prefix: str = "cond_stage_model.",
                 layout: str | None = None) -> dict[str, Any]:
    """Single-file text encoder (SD1 HF layout or SD2 OpenCLIP, detected unless `layout`) -> params."""
    layout = layout or compvis_layout(sd.tensors, prefix) or default_compvis_layout(kwargs)
    kw = _kw(kwargs)
    if layout == "hf":
        params = from_diffusers(sd, kw, prefix + "transformer.")  # with or without `text_model.`
        sd.finish(prefix)  # nothing else may sit under cond_stage_model.
        return params
    if layout == "open_clip":
        flat = _load(sd, _openclip_entries(kw, prefix + "model."))
        sd.finish(prefix, ignore=(prefix + "model.logit_scale", prefix + "model.attn_mask"))
        return unflatten(flat)
    raise ValueError(f"layout must be 'hf' or 'open_clip', got {layout!r}")


def to_compvis(params: Mapping[str, Any], kwargs: Mapping[str, Any], prefix: str = "cond_stage_model.",
               layout: str | None = None) -> dict[str, np.ndarray]:
    """params -> single-file keys under `prefix` (layout defaults to `default_compvis_layout(kwargs)`)."""
    kw = _kw(kwargs)
    layout = layout or default_compvis_layout(kw)
    if layout == "hf":
        return _dump(params, kw, _hf_entries(kw, prefix + "transformer.", kw["layers"], kw["projection_dim"] is not None))
    if layout == "open_clip":
        return _dump(params, kw, _openclip_entries(kw, prefix + "model."))
    raise ValueError(f"layout must be 'hf' or 'open_clip', got {layout!r}")
