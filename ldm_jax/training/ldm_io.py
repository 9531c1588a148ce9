"""Host-side I/O of the LDM objective: first-stage / text-encoder weights, tokenizers, reading a workdir back.

A first stage (`config.first_stage.checkpoint`) is one of
  "random"                        random weights (tests, benchmarks)
  an autoencoder workdir of ours  `WORKDIR/checkpoints/<step>/` written by the autoencoder objective:
                                  its `ema["ae"]` (else `params["ae"]`), checked against the kwargs
                                  in its meta["first_stage"]["kwargs"] (`AutoencoderObjective.export`)
  a diffusers VAE folder          config.json + diffusion_pytorch_model.safetensors (or an SD folder with vae/)
  a single-file SD checkpoint     .safetensors / .ckpt with `first_stage_model.` keys
The text encoder (`cond.text_checkpoint`) is a transformers CLIP folder, an SD / SDXL diffusers folder or a single
file (SDXL: both towers, `interop.sdxl`). `init_from` fills whichever of these paths (and `cond.tokenizer`) is empty
(`with_init_from`), so `--config.init_from=SDXL_FOLDER_OR_FILE` alone starts a fine-tune; the file is then read once.
"""
from __future__ import annotations

import copy
import json
import pathlib
from typing import Any

import jax
import ml_collections
from flax import linen as nn

from ldm_jax import conditioning
from ldm_jax import sharding as shd
from ldm_jax.data import tokenizers
from ldm_jax.data.pipeline import dataset_captions
from ldm_jax.interop import clip, common, pretrained, sdxl, vae
from ldm_jax.interop import workdir as workdir_io
from ldm_jax.training.objective import ConfigError

HOW_TO_FIRST_STAGE = (
    "train one with `python -m ldm_jax.train --config=configs/autoencoder_kl_f8.py --workdir=DIR` and set "
    "--config.first_stage.checkpoint=DIR, point it at a Stable Diffusion VAE (a diffusers folder or a .safetensors "
    "single-file checkpoint), or use a config with `first_stage_train` (two stages from one command)"
)


def with_init_from(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with an empty first_stage.checkpoint / cond.text_checkpoint set to `init_from`, and an empty
    cond.tokenizer to its folder (a diffusers folder; single files carry no tokenizer). Unchanged without it."""
    src = str(config.get("init_from") or "")
    if not src:
        return config
    c = copy.deepcopy(config)
    if not str(c.first_stage.checkpoint):
        c.first_stage.checkpoint = src
    if c.cond.type == "text":
        if not c.cond.text_checkpoint and not c.cond.text_trainable:
            c.cond.text_checkpoint = src
        if not c.cond.tokenizer and pathlib.Path(src).expanduser().is_dir():
            sdxl_text = "encoders" in c.cond.text
            c.cond.tokenizer = src if sdxl_text else str(pathlib.Path(src) / "tokenizer")
    return c


def tower_tokenizer_dirs(root: str | pathlib.Path, towers: Any) -> dict[str, str]:
    """{tower: tokenizer folder} in an SDXL diffusers folder `root` (tokenizer/, tokenizer_2/)."""
    return {n: str(pathlib.Path(root) / sdxl.TOKENIZERS[n]) for n in towers}


def check_first_stage(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError (before compiling) when the first-stage checkpoint is missing."""
    ckpt = str(config.first_stage.checkpoint)
    if ckpt == "random":
        return
    if not ckpt:
        raise ConfigError(f"config.first_stage.checkpoint is empty: {HOW_TO_FIRST_STAGE}")
    path = pathlib.Path(ckpt)
    if not path.exists():
        raise ConfigError(f"first-stage checkpoint {path} does not exist: {HOW_TO_FIRST_STAGE}")
    if path.is_dir() and not (workdir_io.is_workdir(path) or (path / "config.json").exists() or (path / "vae").is_dir()):
        raise ConfigError(f"{path} is neither an autoencoder workdir (no checkpoints/) nor a diffusers VAE folder: "
                          f"{HOW_TO_FIRST_STAGE}")
    if workdir_io.is_workdir(path):
        try:
            workdir_io.read_meta(path)
        except FileNotFoundError:
            raise ConfigError(f"autoencoder workdir {path} has no complete checkpoint yet: {HOW_TO_FIRST_STAGE}") from None


def check_data(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError when an image folder named by the data config is missing."""
    d = config.data
    if d.get("source") == "folder" and (not d.path or not pathlib.Path(d.path).expanduser().is_dir()):
        raise ConfigError(
            f"data.source='folder' but data.path={d.path!r} is not a folder of images: point it at your data with "
            "--config.data.path=DIR (captions in <image>.txt or metadata.jsonl), use a tfds dataset with "
            "--config.data.source=tfds --config.data.name=NAME, or train on the built-in dataset with "
            "--config=configs/shapes.py")


def check_text(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError when a frozen text encoder has no weights."""
    c = config.cond
    if c.type != "text":
        return
    if not c.text_trainable and not c.text_checkpoint:
        raise ConfigError("the text encoder is frozen (cond.text_trainable=False) but cond.text_checkpoint is empty: "
                          "point it at a CLIP text encoder (a transformers folder, an SD diffusers folder or a "
                          "single-file SD checkpoint), or set --config.cond.text_trainable=True")
    if c.text_checkpoint and not pathlib.Path(c.text_checkpoint).expanduser().exists():
        raise ConfigError(f"cond.text_checkpoint={c.text_checkpoint!r} does not exist")


def _compare_kwargs(found: dict, expected: dict, where: str) -> None:
    # architecture_diff compares attention by level, not by CompVis `resolution` (which files do not record).
    diff = vae.architecture_diff(found, expected)
    if diff:
        raise ConfigError(f"first stage in {where} does not match config.first_stage.kwargs: "
                          + ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
                          + "; set --config.first_stage.kwargs.<name> to the checkpoint's values")


def read_workdir_params(workdir: str | pathlib.Path, group: str, abstract: Any, use_ema: bool = True) -> tuple[Any, dict]:
    """(params of `group` — the EMA copy when saved —, meta) from the newest checkpoint of one of our workdirs.

    Only that subtree is read (`ldm_jax.interop.workdir.read_arrays`); it must have the shapes of `abstract`
    (the boxed or plain abstract tree of the group).
    """
    try:
        meta, step = workdir_io.read_meta(workdir)
        ema_groups = (meta.get("config") or {}).get("ema_groups") or (["model"] if meta.get("objective") == "ldm" else [])
        paths = workdir_io.resolve({group: ("params", group)}, ema_groups, use_ema)
        arrays, meta, _ = workdir_io.read_arrays(workdir, paths, step)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    except KeyError as e:
        raise ConfigError(f"{workdir}: {e.args[0]}; is it the right kind of workdir?") from None
    expected = jax.tree_util.tree_map(lambda a: tuple(a.shape), nn.meta.unbox(abstract))
    found = jax.tree_util.tree_map(lambda a: tuple(a.shape), arrays[group])
    if found != expected:
        raise ConfigError(f"{workdir}: its checkpoint's {'/'.join(paths[group])} does not have the expected shapes; "
                          "was it trained with the same first_stage.kwargs?")
    return arrays[group], meta


def load_first_stage(config: ml_collections.ConfigDict, module: nn.Module, abstract: Any) -> Any:
    """Host params of the first stage named by `config.first_stage.checkpoint` (see the module docstring)."""
    path = pathlib.Path(config.first_stage.checkpoint)
    kwargs = config.first_stage.kwargs.to_dict()
    if workdir_io.is_workdir(path):
        params, meta = read_workdir_params(path, "ae", abstract)
        found = (meta.get("first_stage") or {}).get("kwargs")
        if found:
            _compare_kwargs(dict(found), kwargs, str(path))
        return jax.device_get(params)
    if path.is_dir():
        folder = path / "vae" if (path / "vae").is_dir() else path
        cfg = json.loads((folder / "config.json").read_text())
        _compare_kwargs(vae.config_from_diffusers(cfg), kwargs, str(folder))
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"{folder} has no .safetensors weights")
        return vae.from_diffusers(common.StrictStateDict(common.load_safetensors(files[0]), str(files[0])), kwargs)
    tensors = common.load_state_dict(path)
    # Our own single files (interop.pretrained.save_single_file) record the exact kwargs; shapes cannot tell
    # norm_groups, so foreign files are compared against CompVis' 32.
    meta = _single_file_meta(path)
    found = meta["vae"] if meta and meta.get("vae") else vae.config_from_compvis(tensors)
    _compare_kwargs(dict(found), kwargs, str(path))
    return vae.from_compvis(common.StrictStateDict(tensors, str(path)), kwargs)


def _single_file_meta(path: pathlib.Path) -> dict | None:
    """The configs `interop.pretrained.save_single_file` stores in a .safetensors file, or None."""
    return pretrained._metadata(path)


def load_text_encoder(config: ml_collections.ConfigDict) -> Any:
    """Host params of a pretrained CLIP text encoder (transformers folder or single-file SD checkpoint); SDXL
    (`cond.text.encoders`): {tower: params} from a diffusers SDXL folder or a Stability single file."""
    path = pathlib.Path(config.cond.text_checkpoint)
    kwargs = config.cond.text.to_dict()
    if sdxl.is_sdxl_text(kwargs):
        if path.is_dir():
            out = {}
            for name, kw in kwargs["encoders"].items():
                files = sorted((path / name).glob("*.safetensors"))
                if not files:
                    raise ConfigError(f"{path} has no {name}/*.safetensors: not the SDXL diffusers folder the "
                                      f"config's text towers {sorted(kwargs['encoders'])} need")
                out[name] = clip.from_diffusers(common.StrictStateDict(common.load_safetensors(files[0]), str(files[0])), kw)
            return out
        return sdxl.load_single_file_text(common.StrictStateDict(common.load_state_dict(path), str(path)), kwargs)
    if path.is_dir():
        folder = path / "text_encoder" if (path / "text_encoder").is_dir() else path
        files = sorted(folder.glob("*.safetensors"))
        return clip.from_diffusers(common.StrictStateDict(common.load_safetensors(files[0]), str(files[0])), kwargs)
    tensors = common.load_state_dict(path)
    return clip.from_compvis(common.StrictStateDict(tensors, str(path)), kwargs)


def _check_shapes(host: Any, like: Any, what: str) -> None:
    """ConfigError naming the first parameter whose shape differs between a loaded tree and the state's."""
    a = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(host)}
    b = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(like)}
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ConfigError(f"{what} does not fit the config's model: {diff[0]} is {a.get(diff[0])} in the checkpoint, "
                          f"{b.get(diff[0])} in the model ({len(diff)} differences); set --config.unet / cond.text / "
                          "first_stage.kwargs to the checkpoint's architecture (configs/ldm_sdxl.py: the presets)")


def _same(a: Any, b: Any) -> bool:
    return bool(a) and bool(b) and pathlib.Path(str(a)).expanduser().resolve() == pathlib.Path(str(b)).expanduser().resolve()


def load_pretrained(objective: Any, state: Any, mesh) -> Any:
    """Puts the configured first stage, frozen text encoder and `init_from` UNet into a fresh state (a path shared
    with `init_from` is read once, from the `Pretrained` it loads)."""
    config = objective.config
    frozen = dict(state.frozen)
    params = {g: dict(p) for g, p in state.params.items()}
    p = None
    if config.init_from:
        p = (pretrained.load_diffusers if pathlib.Path(config.init_from).is_dir() else pretrained.load_single_file)(
            config.init_from)
        _check_shapes(p.unet_params, state.params["model"]["unet"], f"the UNet of init_from={config.init_from}")
        params["model"]["unet"] = shd.put_like(p.unet_params, state.params["model"]["unet"])
    if str(config.first_stage.checkpoint) != "random":
        if p is not None and _same(config.first_stage.checkpoint, config.init_from):
            _compare_kwargs(dict(p.vae_kwargs), config.first_stage.kwargs.to_dict(), str(config.init_from))
            host = p.vae_params
        else:
            host = load_first_stage(config, objective.first_stage, state.frozen["first_stage"])
        frozen["first_stage"] = shd.put_like(host, state.frozen["first_stage"])
    if objective.text is not None and config.cond.text_checkpoint:
        reuse = p is not None and p.text_params is not None and _same(config.cond.text_checkpoint, config.init_from)
        host = p.text_params if reuse else load_text_encoder(config)
        like = state.params["model"]["text"] if objective.text_trainable else state.frozen["text"]
        _check_shapes(host, like, f"the text encoder of {config.cond.text_checkpoint}")
        if objective.text_trainable:
            params["model"]["text"] = shd.put_like(host, like)
        else:
            frozen["text"] = shd.put_like(host, like)
    state = state.replace(frozen=frozen, params=params)
    # EMA starts from the loaded weights (LitEma copies the model at start).
    return state.replace(ema={g: jax.tree_util.tree_map(lambda x: x, state.params[g]) for g in state.ema})


def load_tokenizer(config: ml_collections.ConfigDict, workdir: Any = None) -> Any:
    """The tokenizer named by `cond.tokenizer`: a CLIP tokenizer folder, a tokenizer.json, or "train" (a BPE
    trained on the dataset's captions with `cond.text.vocab_size` entries, saved as WORKDIR/tokenizer.json)."""
    text = config.cond.text.to_dict()
    if sdxl.is_sdxl_text(text):  # one tokenizer per tower, from an SDXL folder's tokenizer/ and tokenizer_2/
        root = pathlib.Path(str(config.cond.tokenizer)).expanduser()
        missing = [d for d in tower_tokenizer_dirs(root, text["encoders"]).values() if not pathlib.Path(d).is_dir()]
        if missing:
            raise ConfigError(f"cond.tokenizer={str(root)!r} must be an SDXL diffusers folder with "
                              f"{', '.join(sdxl.TOKENIZERS[n] for n in text['encoders'])}/; missing {missing}")
        return conditioning.resolve_tokenizer(text, None, str(root))
    length = int(config.cond.text.get("max_length", 77))
    if str(config.cond.tokenizer) == "train":
        if workdir is None:
            raise ConfigError("cond.tokenizer='train' needs a workdir to keep the trained tokenizer in")
        return tokenizers.load_or_train_tokenizer(workdir, lambda: dataset_captions(config.data),
                                                  vocab_size=int(config.cond.text.vocab_size), max_length=length)
    return tokenizers.load_tokenizer(str(config.cond.tokenizer), max_length=length)
