"""LoRA fine-tuning: the LDM objective with its UNet (and optionally text encoder) replaced by base + adapters.

The base weights (`init_from`: a diffusers folder, an SD single file or one of our LDM workdirs) sit in `state.frozen["unet"]` /
`["text"]` — never in the optimizer state, never donated by the step (the trainer donates `params` and
`opt_state`; frozen arrays pass through the jitted step unchanged), optionally held in bfloat16
(`lora.base_dtype`). The only trainable group is `params["model"] = {"lora": {"unet": adapters[, "text": ...]}}`
in float32, with its AdamW state and its EMA. The step runs the LDM loss (its conditioning, noise, targets and
gradient accumulation as they are) on the base under `ldm_jax.models.lora.activations`: each adapted Dense/Conv
returns W x + b + alpha/rank · up(down(x)), so the backward pass forms only the small products of the adapters,
never a kernel's gradient (`adapted`, the weight-space form W + alpha/rank · down @ up, gives the same numbers and
is what sampling and merging use).

Sharding: adapters carry no logical names, so they are replicated on every mesh; the frozen base keeps the
logical shardings of the full model (fsdp / tensor), and the delta is added where each kernel lives.

Checkpoints hold the adapters, their EMA and AdamW state only (`checkpoint_frozen = False`); the meta records
the base (`init_from`) and the LoRA config, and a resume reads the base again.

Exporting: `export_lora(state, path)` writes the (EMA) adapters as a diffusers/peft or kohya file that
diffusers, ComfyUI and A1111 load (`ldm_jax.interop.lora`); checkpoint meta records the base
(`init_from`) and the LoRA config.
"""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ldm_jax import sharding as shd
from ldm_jax.interop import lora as lora_io
from ldm_jax.interop import workdir as workdir_io
from ldm_jax.models import lora
from ldm_jax.training import ldm, ldm_io, sample_grid
from ldm_jax.training.objective import ConfigError
from ldm_jax.training.state import TrainState

MODELS = ("unet", "text")


def lora_config_of(config: ml_collections.ConfigDict) -> lora.LoraConfig:
    """The `lora` block of a training config as a `LoraConfig` (targets: comma-separated presets/regexes)."""
    c = config.lora
    targets = {m: tuple(t for t in str(c.get(f"{m}_targets", "")).split(",") if t) for m in MODELS}
    return lora.LoraConfig(rank=int(c.rank), alpha=float(c.alpha), dropout=float(c.dropout),
                           targets={m: t for m, t in targets.items() if t})


class LoraLDMObjective(ldm.LDMObjective):
    """LDM training of low-rank adapters on a frozen base (see the module docstring)."""

    name = "lora"
    checkpoint_frozen = False  # checkpoints: adapters + EMA + optimizer; the base comes from init_from again

    def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any = None):
        super().__init__(config, tokenizer)
        self.lora = lora_config_of(config)
        if "text" in self.lora.targets and self.text is None:
            raise ConfigError("lora.text_targets is set but the model has no text encoder (cond.type != 'text')")
        if "text" in self.lora.targets and self.cond.towers is not None:
            raise ConfigError("lora.text_targets: LoRAs on SDXL's two text towers are not supported yet; train the "
                              "UNet's adapters only (--config.lora.text_targets='')")
        if config.lora.base_dtype not in ldm.DTYPES:
            raise ConfigError(f"lora.base_dtype={config.lora.base_dtype!r}; use one of {sorted(ldm.DTYPES)}")
        self.base_dtype = ldm.DTYPES[config.lora.base_dtype]
        self.base = None  # a `Pretrained` read by `build` (with_base), reused by load_pretrained
        self._merge = None  # jit(adapted), made by the first `sampling_params`

    @property
    def text_trainable(self) -> bool:
        """The LDM loss takes the text encoder from the trained tree when the text encoder has adapters."""
        return self.text is not None and "text" in self.lora.targets

    def init(self, key: jax.Array) -> dict[str, Any]:
        k_base, k_lora = jax.random.split(key)
        v = super().init(k_base)
        model, frozen = dict(v["params"]["model"]), dict(v["frozen"])
        cast = lambda t: jax.tree_util.tree_map(lambda x: x.astype(self.base_dtype), t)  # noqa: E731
        frozen["unet"] = cast(model.pop("unet"))
        if "text" in model:
            frozen["text"] = cast(model.pop("text"))
        adapters = {}
        for i, (m, patterns) in enumerate(sorted(self.lora.targets.items())):
            modules = lora.select_targets(frozen[m], patterns, m)
            adapters[m] = lora.init_adapters(jax.random.fold_in(k_lora, i), frozen[m], modules, self.lora.rank)
        model["lora"] = adapters
        return {"params": {"model": model}, "frozen": frozen, "extra": v["extra"]}

    def adapted(self, model: Any, frozen: dict[str, Any], key: jax.Array | None = None) -> dict[str, Any]:
        """The trainable tree the LDM loss expects ({"unet", ["text"], ...}) with the adapters merged into the base
        `frozen` (the weight-space form of what `loss` computes on the activations; `key`: with dropout)."""
        out = {k: v for k, v in model.items() if k != "lora"}
        for i, m in enumerate(MODELS):
            if m not in frozen:
                continue
            if m in model["lora"]:
                sub = None if key is None else jax.random.fold_in(key, i)
                out[m] = lora.apply(frozen[m], [(model["lora"][m], 1.0)], alpha=self.lora.alpha,
                                    dropout=self.lora.dropout if key is not None else 0.0, key=sub)
            elif m == "unet":
                out[m] = frozen[m]
        return out

    def loss(self, model: Any, state: TrainState, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
        """The LDM loss with the adapters on the activations (`lora.activations`): the same numbers as on the
        weights (`adapted`), but the backward pass forms no kernel gradient and the base stays a constant."""
        k_lora, k_ldm = jax.random.split(key)
        trees = {k: v for k, v in model.items() if k != "lora"}
        trees.update({m: jax.lax.stop_gradient(state.frozen[m]) for m in model["lora"]})
        trees.setdefault("unet", jax.lax.stop_gradient(state.frozen["unet"]))
        roots = {type(self.unet): "unet", **({type(self.text): "text"} if self.text is not None else {})}
        keys = {m: jax.random.fold_in(k_lora, i) for i, m in enumerate(MODELS)}
        with lora.activations(roots, {m: [(a, 1.0)] for m, a in model["lora"].items()}, alpha=self.lora.alpha,
                              dropout=self.lora.dropout, keys=keys):
            return super().loss(trees, state, batch, k_ldm)

    def export(self, state: TrainState) -> dict:
        return {**super().export(state), "lora": self.lora.to_dict(), "base": str(self.config.init_from)}

    def validate(self, mesh) -> None:
        if not self.config.init_from:
            raise ConfigError("LoRA training needs the base weights: set --config.init_from=PATH "
                              "(a diffusers folder or an SD .safetensors file)")
        if not pathlib.Path(self.config.init_from).exists():
            raise ConfigError(f"init_from={self.config.init_from!r} does not exist")
        super().validate(mesh)

    def load_pretrained(self, state: TrainState, mesh) -> TrainState:
        """The base's UNet, first stage and text encoder into `frozen` (a first stage / text encoder named apart
        from `init_from` is read from there, as the LDM objective reads it)."""
        c = self.config
        frozen = dict(state.frozen)
        p = self.base or workdir_io.load_model(c.init_from)
        if str(c.first_stage.checkpoint) != "random":
            own = str(c.first_stage.checkpoint) in ("", str(c.init_from))  # the base's own first stage
            host = p.vae_params if own else ldm_io.load_first_stage(c, self.first_stage, state.frozen["first_stage"])
            frozen["first_stage"] = shd.put_like(host, state.frozen["first_stage"])
        self.base = None  # the host copy is not needed once the weights are on the devices
        frozen["unet"] = shd.put_like(p.unet_params, state.frozen["unet"])
        if self.text is not None:
            own = str(c.cond.text_checkpoint) in ("", str(c.init_from))  # the base's own text encoder
            host = p.text_params if own else ldm_io.load_text_encoder(c)
            frozen["text"] = shd.put_like(host, state.frozen["text"])
        return state.replace(frozen=frozen)

    def sampling_spec(self, scale_factor: float = 1.0) -> dict:
        """The LDM spec with nothing of the base in "weights" (checkpoints do not hold it): "base" (the `init_from`
        path) and "lora" ({"weights": state paths of the adapters per model, "alpha"}), which
        `ldm_jax.interop.workdir.load_workdir` reads to give the base with the run's adapters."""
        spec = super().sampling_spec(scale_factor)
        spec["weights"] = {}
        spec["base"] = str(pathlib.Path(self.config.init_from).expanduser().absolute())
        spec["lora"] = {"weights": {m: ["params", "model", "lora", m] for m in sorted(self.lora.targets)},
                        "alpha": float(self.lora.alpha)}
        return spec

    def sampling_params(self, state: TrainState, use_ema: bool = True) -> dict:
        """{"unet", "vae", ["text"]} of a live state: the base with the (EMA) adapters merged in (`adapted`)."""
        trees = state.ema if use_ema and state.ema else state.params
        if self._merge is None:
            self._merge = jax.jit(self.adapted)
        p = self._merge(trees["model"], {m: state.frozen[m] for m in MODELS if m in state.frozen})
        out = {"unet": p["unet"], "vae": state.frozen["first_stage"]}
        if self.text is not None:
            out["text"] = p.get("text", state.frozen["text"])
        return out

    def hooks(self) -> list:
        return sample_grid.ldm_hooks(self)  # sample grids of the base + the EMA adapters (`sampling_params`)

    def export_lora(self, state: TrainState, path: str | pathlib.Path, *, use_ema: bool = True,
                    format: str = "diffusers", dtype: Any = jnp.float32) -> None:
        """Writes the adapters (EMA when kept) as a LoRA file diffusers / ComfyUI / A1111 read."""
        trees = state.ema if use_ema and state.ema else state.params
        adapters = jax.device_get(trees["model"]["lora"])
        kwargs = {"unet": self.unet_kwargs, "text": self.text_kwargs}
        lora_io.save(path, adapters, {m: kwargs[m] for m in adapters}, format=format, alpha=self.lora.alpha,
                     dtype=dtype, metadata={"ldm_jax_base": str(self.config.init_from)})


def with_base(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, Any]:
    """(config with the models, schedule and files of the base `init_from`, the loaded `Pretrained`).

    With `lora.kwargs_from_base` the UNet / VAE / text-encoder kwargs, the noise schedule, the prediction type
    and the VAE scale factor come from the base; empty `first_stage.checkpoint` / `cond.text_checkpoint` become
    `init_from` and an empty `cond.tokenizer` the folder's tokenizer/ (a single file has none: set it).
    """
    if not config.init_from or not config.lora.get("kwargs_from_base", True):
        return config, None
    path = pathlib.Path(config.init_from)
    if not path.exists():
        raise ConfigError(f"init_from={config.init_from!r} does not exist (a diffusers folder, an SD .safetensors "
                          "or a workdir of ours)")
    p = workdir_io.load_model(path)
    c = ml_collections.ConfigDict(config.to_dict())
    c.unet = dict(p.unet_kwargs)
    c.first_stage.kwargs = dict(p.vae_kwargs)
    c.first_stage.scale_factor = float(p.scheduler["scale_factor"])
    c.first_stage.checkpoint = str(c.first_stage.checkpoint or path)
    if p.text_kwargs is not None:
        c.cond.type = "text"
        c.cond.text = dict(p.text_kwargs)
        c.cond.text_checkpoint = str(c.cond.text_checkpoint or path)
        if not c.cond.tokenizer:
            if p.tokenizer_dir is None:
                raise ConfigError(f"{path} has no tokenizer: set --config.cond.tokenizer=FOLDER (CLIP's tokenizer; "
                                  "SDXL: a diffusers SDXL folder with tokenizer/ and tokenizer_2/)")
            tok = p.tokenizer_dir  # SDXL: {tower: folder}; the config names their parent (ldm_io.load_tokenizer)
            c.cond.tokenizer = str(pathlib.Path(next(iter(tok.values()))).parent) if isinstance(tok, dict) else tok
    s = p.scheduler
    if s["beta_schedule"] not in ("scaled_linear", "linear"):
        raise ConfigError(f"the base's beta_schedule={s['beta_schedule']!r} is not supported for LoRA training")
    c.diffusion.schedule = "linear" if s["beta_schedule"] == "scaled_linear" else "linear_plain"
    c.diffusion.num_timesteps = int(s["num_train_timesteps"])
    c.diffusion.linear_start, c.diffusion.linear_end = float(s["beta_start"]), float(s["beta_end"])
    c.diffusion.prediction = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[s["prediction_type"]]
    return c, p


def build(config: ml_collections.ConfigDict, tokenizer: Any = None, workdir: Any = None) -> LoraLDMObjective:
    """The LoRA objective of `config` on its base (`with_base`); tokenizer as `ldm.build` finds it."""
    config, base = with_base(config)
    if tokenizer is None and config.cond.type == "text" and config.cond.get("tokenizer"):
        tokenizer = ldm_io.load_tokenizer(config, workdir)
    objective = LoraLDMObjective(config, tokenizer)
    objective.base = base
    return objective


def sibling_config(config_file: str, name: str) -> Any:
    """configs/NAME.py beside `config_file`, as a module (configs/ is a folder of files, not a package)."""
    import importlib.util

    path = pathlib.Path(config_file).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"ldm_jax_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def default_lora_block() -> ml_collections.ConfigDict:
    """The `lora` block: rank 8, alpha 8, the UNet's attention projections, a float32 base."""
    return ml_collections.ConfigDict(dict(rank=8, alpha=8.0, dropout=0.0, unet_targets="attn", text_targets="",
                                          base_dtype="float32", kwargs_from_base=True))
