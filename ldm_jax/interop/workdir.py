"""One of our training workdirs as weights in: the sampling spec in its checkpoints and the arrays it names.

Every checkpoint's meta (`WORKDIR/checkpoints/<step>/meta`, JSON) of a latent-diffusion run carries
"sampling", written by the objective that trained it (`LDMObjective.sampling_spec`):
  unet, vae, text    module kwargs (text: null for unconditional models)
  scheduler          the training noise schedule in diffusers' names, plus the run's scale_factor
  image_size         the training image side
  conditioning       "text" | "none" | "class"
  tokenizer          the tokenizer's path (relative: inside the workdir), or null; SDXL: {tower: path}
  weights            where each sampled tree lives in the state: {"unet": ["params", "model", "unet"],
                     "vae": ["frozen", "first_stage"], ["text": ...]}
  ema_groups         parameter groups with an EMA copy: a "params" path of one reads "ema" when use_ema
  options            pipeline options (`Pretrained.options`; SDXL: force_zeros_for_empty_prompt), may be absent
  base, lora         LoRA runs only (weights is then empty): the base's path (a diffusers folder or a single
                     file) and {"weights": {model: state path of its adapters}, "alpha"}; the workdir reads as
                     the base plus the run's (EMA) adapters, returned in meta["lora"] for the pipeline to attach
So reading a workdir needs this module and `ldm_jax.checkpoint` only, never the training code. Arrays are
read by partial restore (only the named subtrees, shapes from the checkpoint's own metadata).
"""
from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from ldm_jax.checkpoint import Checkpointer
from ldm_jax.interop.pretrained import Pretrained, load_diffusers, load_single_file
from ldm_jax.models import lora
from ldm_jax.models.autoencoder import downsample_factor

Path = tuple[str, ...]
LDM_OBJECTIVES = ("ldm", "dreambooth", "lora", "dreambooth_lora")  # objectives whose checkpoints carry "sampling"


def is_workdir(path: str | pathlib.Path) -> bool:
    """Whether `path` looks like a training workdir (it has checkpoints/)."""
    return (pathlib.Path(path) / "checkpoints").is_dir()


def resolve(weights: Mapping[str, Sequence[str]], ema_groups: Sequence[str], use_ema: bool = True) -> dict[str, Path]:
    """The state paths to read: a ("params", group, ...) path of an EMA group becomes ("ema", group, ...)."""
    out = {}
    for name, path in weights.items():
        path = tuple(path)
        if use_ema and path[0] == "params" and path[1] in tuple(ema_groups):
            path = ("ema",) + path[1:]
        out[name] = path
    return out


def select(state: Any, paths: Mapping[str, Path]) -> dict[str, Any]:
    """{name: the subtree of `state` (a TrainState or nested dicts) at its path}."""
    out = {}
    for name, path in paths.items():
        node = state
        for p in path:
            node = node[p] if isinstance(node, Mapping) else getattr(node, p)
        out[name] = node
    return out


@contextlib.contextmanager
def _checkpoints(workdir: pathlib.Path, step: int | None) -> Iterator[tuple[Checkpointer, int]]:
    """(Checkpointer, the step to read: `step` or the newest), with clear errors for what is missing."""
    if not is_workdir(workdir):
        raise FileNotFoundError(f"{workdir} is not a training workdir (no checkpoints/ in it)")
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        step = ckpt.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"{workdir} has no complete checkpoint yet")
        if step not in ckpt.all_steps():
            raise FileNotFoundError(f"{workdir} has no checkpoint at step {step}; it has {ckpt.all_steps()}")
        yield ckpt, step
    finally:
        ckpt.close()


def read_meta(workdir: str | pathlib.Path, step: int | None = None) -> tuple[dict, int]:
    """(meta, step) of checkpoint `step` (default: the newest) of `workdir`, without touching its arrays."""
    with _checkpoints(pathlib.Path(workdir).expanduser(), step) as (ckpt, step):
        return ckpt.read_meta(step), step


def read_arrays(workdir: str | pathlib.Path, paths: Mapping[str, Path], step: int | None = None
                ) -> tuple[dict[str, Any], dict, int]:
    """({name: numpy tree at its state path}, meta, step) from checkpoint `step` (default: the newest)."""
    workdir = pathlib.Path(workdir).expanduser()
    with _checkpoints(workdir, step) as (ckpt, step):
        meta = ckpt.read_meta(step)
        state_dir = ckpt.directory / str(step) / "state"
        stored = ocp.PyTreeCheckpointHandler().metadata(state_dir).tree  # shapes and dtypes, no arrays read
        cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        item: dict = {}
        for name, path in paths.items():
            node, parent = stored, item
            for i, p in enumerate(path):
                if not isinstance(node, Mapping) or p not in node:
                    raise KeyError(f"checkpoint step {step} of {workdir} has no {'/'.join(path[: i + 1])} (for {name})")
                node = node[p]
                if i < len(path) - 1:
                    parent = parent.setdefault(p, {})
            parent[path[-1]] = jax.tree_util.tree_map(
                lambda a: jax.ShapeDtypeStruct(tuple(a.shape), a.dtype, sharding=cpu), node)
        args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                      partial_restore=True)
        restored = ocp.PyTreeCheckpointer().restore(state_dir, args=args)
    return jax.tree_util.tree_map(np.asarray, select(restored, paths)), meta, step


def sampling_spec(meta: Mapping[str, Any], where: Any) -> dict:
    """The checkpoint meta's sampling spec, or a ValueError saying why `where` cannot be sampled."""
    if meta.get("objective") not in LDM_OBJECTIVES:
        raise ValueError(f"{where} holds a {meta.get('objective')!r} run, not a latent diffusion model "
                         "(an autoencoder workdir cannot sample; use the LDM workdir that reuses it)")
    spec = meta.get("sampling")
    if spec is None:
        raise ValueError(f"{where}: its checkpoint carries no sampling spec (written before ldm_jax stored one); "
                         "train on with the current code so that a new checkpoint is written")
    if spec["conditioning"] == "class":
        raise ValueError(f"{where} is class-conditional; the text-to-image pipeline samples text or "
                         "unconditional models")
    return spec


def _tuples(kwargs: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if kwargs is None else {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def load_workdir(workdir: str | pathlib.Path, *, step: int | None = None, use_ema: bool = True
                 ) -> tuple[Pretrained, dict]:
    """(Pretrained, meta) of a latent-diffusion workdir: the spec's modules and the (EMA) weights it names."""
    workdir = pathlib.Path(workdir).expanduser()
    meta, step = read_meta(workdir, step)
    spec = sampling_spec(meta, workdir)
    if "lora" in spec:
        return _load_lora_workdir(workdir, spec, step, use_ema)
    params, meta, step = read_arrays(workdir, resolve(spec["weights"], spec["ema_groups"], use_ema), step)
    f = downsample_factor(dict(spec["vae"]))
    tok = spec["tokenizer"]
    tok = None if tok is None else {n: str(workdir / t) for n, t in tok.items()} if isinstance(tok, Mapping) \
        else str(workdir / tok)
    p = Pretrained(_tuples(spec["unet"]), _tuples(spec["vae"]), _tuples(spec["text"]), params, dict(spec["scheduler"]),
                   tokenizer_dir=tok, sample_size=int(spec["image_size"]) // f, options=dict(spec.get("options") or {}))
    return p, {**meta, "step": step}


def _load_lora_workdir(workdir: pathlib.Path, spec: Mapping[str, Any], step: int, use_ema: bool
                       ) -> tuple[Pretrained, dict]:
    """(the base `Pretrained`, meta with "lora": {model: (EMA) adapters with their alpha}) of a LoRA run."""
    base = pathlib.Path(spec["base"])
    if not base.exists():
        raise FileNotFoundError(f"{workdir} is a LoRA run on the base {base}, which does not exist any more: put the "
                                "base back there, or export the adapters (LoraLDMObjective.export_lora) and "
                                "load that file into a pipeline of the base (Pipeline.load_lora)")
    p = load_model(base)
    adapters, meta, step = read_arrays(workdir, resolve(spec["lora"]["weights"], spec["ema_groups"], use_ema), step)
    alpha = float(spec["lora"]["alpha"])
    adapters = {m: lora.with_alpha(tree, alpha) for m, tree in adapters.items()}
    tok = spec["tokenizer"]
    if p.tokenizer_dir is None and tok is not None:  # a single-file base: the run's tokenizer
        p = dataclasses.replace(p, tokenizer_dir={n: str(workdir / t) for n, t in tok.items()}
                                if isinstance(tok, Mapping) else str(workdir / tok))
    return p, {**meta, "step": step, "lora": adapters}


def load_model(path: str | pathlib.Path) -> Pretrained:
    """A diffusers folder, an SD single file or one of our LDM workdirs (EMA weights) as a `Pretrained`."""
    path = pathlib.Path(path).expanduser()
    if is_workdir(path):
        return load_workdir(path)[0]
    return (load_diffusers if path.is_dir() else load_single_file)(path)
