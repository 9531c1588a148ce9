"""SDXL fine-tuning through the CLI and the real trainer (configs/ldm_sdxl.py:finetune,tiny).

tests/goldens/tiny_sdxl is a random-weight SDXL base diffusers folder (tests/goldens/make_tiny_sdxl.py). One
`python -m ldm_jax.train` run with `--config.init_from=` that folder (its VAE, both frozen text towers and their
tokenizers come from it too) on a folder of captioned images of several sizes must keep the VAE and both towers
byte-identical, move only the UNet, and leave a workdir that `load_pretrained` samples as SDXL. In-process, on
the folder's weights: the batch's micro-conditioning reaches `y` exactly as sampling builds it (diffusers'
semantics, `conditioning.micro_ids`), and caption dropout drops both towers together.
"""
from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_shapes_eval import tb_scalars
from training_utils import load_config, max_diff

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "goldens" / "tiny_sdxl"
SIZES = [(48, 40), (32, 64), (40, 40), (56, 36)]  # (h, w) on disk; the model trains at 32 x 32
CAPTIONS = ["a red circle", "two blue squares", "a green triangle", "a small cat"]
STEPS, LR = 2, 1e-5


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, ((h, w), caption) in enumerate(zip(SIZES, CAPTIONS)):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(caption)
    return root


@pytest.fixture(scope="module")
def pretrained():
    from ldm_jax.interop import pretrained as pio

    return pio.load_diffusers(TINY)


@pytest.fixture(scope="module")
def cli_run(images, tmp_path_factory):
    """The README's SDXL fine-tuning command at tiny size: STEPS steps, one checkpoint at the end."""
    wd, tfds = tmp_path_factory.mktemp("wd") / "run", tmp_path_factory.mktemp("tfds")
    cmd = [sys.executable, "-m", "ldm_jax.train", "--config=configs/ldm_sdxl.py:finetune,tiny", f"--workdir={wd}",
           f"--config.init_from={TINY}", f"--config.data.path={images}", f"--config.data.data_dir={tfds}",
           f"--config.num_steps={STEPS}", "--config.progress=False", "--config.log_every=1",
           "--config.checkpoint.async_save=False"]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return wd, out.stdout + out.stderr


@pytest.fixture(scope="module")
def objective(images, tmp_path_factory):
    from ldm_jax.training import ldm

    c = load_config("ldm_sdxl", "finetune,tiny")
    with c.unlocked():
        c.init_from = str(TINY)
        c.data.path, c.data.data_dir = str(images), str(tmp_path_factory.mktemp("tfds"))
        c.global_batch_size = 4
    return ldm.build(c)


@pytest.fixture(scope="module")
def state(objective, pretrained):
    """A host-side state holding the folder's weights (no compiled init needed for the loss-level checks)."""
    from ldm_jax.training.state import TrainState

    return TrainState(step=jnp.zeros((), jnp.int32), params={"model": {"unet": pretrained.unet_params}}, opt_state={},
                      ema={}, frozen={"first_stage": pretrained.vae_params, "text": pretrained.text_params},
                      extra={"scale_factor": jnp.float32(0.13025), "uncond_ids": jnp.asarray(objective._uncond_ids())},
                      rng=jax.random.key_data(jax.random.key(0)))


def _read(wd, paths):
    from ldm_jax.interop import workdir as workdir_io

    arrays, meta, step = workdir_io.read_arrays(wd, paths)
    return arrays, meta, step


# ------------------------------------------------------------------------------------------- the CLI run
def test_cli_finetune_trains_only_the_unet(cli_run, pretrained):
    wd, _ = cli_run
    arrays, meta, step = _read(wd, {"params": ("params",), "frozen": ("frozen",), "ema": ("ema",)})
    assert step == STEPS and meta["objective"] == "ldm"
    assert set(arrays["params"]["model"]) == {"unet"}  # both towers frozen by default
    for name in ("text_encoder", "text_encoder_2"):  # byte-identical to the folder
        leaves = zip(jax.tree_util.tree_leaves(arrays["frozen"]["text"][name]),
                     jax.tree_util.tree_leaves(pretrained.text_params[name]))
        assert all(np.array_equal(a, np.asarray(b)) and a.dtype == np.asarray(b).dtype for a, b in leaves), name
    assert max_diff(arrays["frozen"]["first_stage"], pretrained.vae_params) == 0.0
    moved = max_diff(arrays["params"]["model"]["unet"], pretrained.unet_params)
    assert 0.0 < moved <= STEPS * LR * 1.01 + 1e-6, moved  # AdamW moves a weight by at most ~lr per step
    losses = [v for _, v in tb_scalars(wd / "tb")["train/loss"]]  # log_every=1: one value per step
    assert len(losses) == STEPS and all(math.isfinite(x) and x > 0 for x in losses), losses


def test_workdir_samples_as_sdxl_with_micro_conditioning(cli_run):
    from ldm_jax.conditioning import MultiTokenizer
    from ldm_jax.pipeline import load_pretrained

    wd, _ = cli_run
    pipe = load_pretrained(wd)
    assert pipe.family == "sdxl-base" and pipe.step == STEPS
    assert pipe.force_zeros_for_empty_prompt  # cond.drop_mode="zeros": the null condition it was trained with
    assert isinstance(pipe.tokenizer, MultiTokenizer) and list(pipe.tokenizer.tokenizers) == ["text_encoder",
                                                                                              "text_encoder_2"]
    ema, _, _ = _read(wd, {"unet": ("ema", "model", "unet")})
    assert max_diff(jax.device_get(pipe.params["unet"]), ema["unet"]) == 0.0  # the EMA weights are sampled
    kw = dict(steps=2, height=32, width=32, seed=0, guidance_scale=3.0)
    a = pipe.generate(["a red circle"], original_size=(64, 64), **kw)
    b = pipe.generate(["a red circle"], original_size=(32, 32), **kw)
    assert a.shape == (1, 32, 32, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0 and pipe.trace_count == 1  # traced, not recompiled


# --------------------------------------------------------------------------------- conditioning, in-process
def test_batch_micro_conditioning_reaches_y(objective, state):
    from ldm_jax import conditioning
    from ldm_jax import sharding as shd

    batch = next(iter(objective.make_dataset(shd.make_mesh((1, 1, 1), jax.devices()[:1]))))
    sizes = {tuple(int(v) for v in s) for s in np.asarray(batch["original_size"])}
    assert sizes <= set(SIZES) and len(sizes) > 1  # each image's size on disk, from the input pipeline
    assert np.all(np.asarray(batch["target_size"]) == 32) and np.asarray(batch["input_ids"]).shape == (4, 2, 77)
    no_drop = jnp.zeros((4,), bool)
    ctx, y = objective.cond(state.frozen["text"], objective.unet, batch, no_drop, state.extra["uncond_ids"], False)
    assert ctx.shape == (4, 77, 32) and y.shape == (4, 64)
    _, pooled = objective.text.apply({"params": state.frozen["text"]}, batch["input_ids"])
    for i in range(4):  # the row sampling builds for the same numbers (diffusers' add_time_ids order)
        ids, _ = conditioning.micro_ids(6, 32, 32, original_size=tuple(np.asarray(batch["original_size"][i])),
                                        crops_coords_top_left=tuple(np.asarray(batch["crop_top_left"][i])))
        want = objective.unet.added_cond(pooled[i:i + 1], jnp.asarray(ids)[None])
        np.testing.assert_allclose(np.asarray(y[i:i + 1]), np.asarray(want), rtol=1e-6, atol=1e-6)

    loss = jax.jit(lambda b: objective.loss(state.params["model"], state, b, jax.random.key(3))[0])
    other = {**batch, "original_size": jnp.asarray(batch["original_size"]) * 2}
    l1, l2, l3 = float(loss(batch)), float(loss(other)), float(loss(batch))
    assert math.isfinite(l1) and l1 == l3 and l1 != l2  # only the sizes differ, with the same key


def test_caption_dropout_drops_both_towers_together(objective, state):
    import copy

    from ldm_jax.training.text_conditioning import TextConditioner

    ids = jnp.asarray(objective.tokenizer(["a red circle", "two blue squares"]))
    batch = {"input_ids": ids, "original_size": jnp.array([[48, 40], [32, 64]]),
             "crop_top_left": jnp.array([[8, 4], [0, 16]]), "target_size": jnp.full((2, 2), 32)}
    drop = jnp.array([True, False])
    text, uncond = state.frozen["text"], state.extra["uncond_ids"]
    ctx, y = objective.cond(text, objective.unet, batch, drop, uncond, False)  # drop_mode="zeros" (SGM's ucg)
    kept_ctx, kept_y = objective.cond(text, objective.unet, batch, jnp.zeros((2,), bool), uncond, False)
    assert objective.cond.drop_mode == "zeros"
    assert float(jnp.abs(ctx[0]).max()) == 0.0 and float(jnp.abs(y[0, :16]).max()) == 0.0  # both towers + pooled
    assert float(jnp.abs(ctx[1, :, :16]).min(axis=-1).max()) > 0 and float(jnp.abs(ctx[1, :, 16:]).max()) > 0
    np.testing.assert_array_equal(np.asarray(y[0, 16:]), np.asarray(kept_y[0, 16:]))  # sizes are never dropped
    np.testing.assert_array_equal(np.asarray(ctx[1]), np.asarray(kept_ctx[1]))

    cfg = copy.deepcopy(objective.config.cond)
    cfg.drop_mode = "empty"  # diffusers' proportion_empty_prompts: "" through both towers
    empty = TextConditioner(cfg, objective.unet_kwargs, 32, tokenizer=objective.tokenizer)
    ctx_e, y_e = empty(text, objective.unet, batch, drop, uncond, False)
    null_ctx, null_pooled = objective.text.apply({"params": text}, jnp.asarray(uncond)[None])
    assert uncond.shape == (2, 77)  # one "" row per tower's tokenizer
    np.testing.assert_allclose(np.asarray(ctx_e[0]), np.asarray(null_ctx[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(y_e[0, :16]), np.asarray(null_pooled[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ctx_e[1]), np.asarray(ctx[1]), atol=1e-6)


def test_text_towers_train_when_asked(objective, state, pretrained):
    from ldm_jax.training import ldm

    obj = ldm.LDMObjective(copy_config(objective.config, text_trainable=True), objective.tokenizer)
    abstract = jax.eval_shape(lambda: obj.init(jax.random.key(0)))
    assert set(abstract["params"]["model"]["text"]) == {"text_encoder", "text_encoder_2"}  # trained, not frozen
    assert "text" not in abstract["frozen"] and "text" in jax.eval_shape(lambda: objective.init(jax.random.key(0)))["frozen"]
    batch = {"input_ids": jnp.asarray(objective.tokenizer(["a red circle", "b"])), "original_size": jnp.full((2, 2), 40),
             "crop_top_left": jnp.zeros((2, 2)), "target_size": jnp.full((2, 2), 32), "image": jnp.zeros((2, 32, 32, 3))}
    r = jax.random.normal(jax.random.key(2), (2, 77, 32))
    uncond = state.extra["uncond_ids"]

    def score(text, trainable):  # a linear read-out of (context, y): its gradient is what the loss sends back
        ctx, y = obj.cond(text, obj.unet, batch, jnp.zeros((2,), bool), uncond, trainable)
        return jnp.sum(ctx * r) + jnp.sum(y[:, :16])

    grad = jax.jit(jax.grad(score), static_argnums=1)
    grads = grad(pretrained.text_params, True)
    for name in ("text_encoder", "text_encoder_2"):  # both towers get gradients; frozen ones none
        assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads[name])) > 0, name
    frozen = grad(pretrained.text_params, False)
    assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(frozen)) == 0.0
    # the objective encodes with the trained tree (params["model"]["text"]), not with state.frozen
    moved = jax.tree_util.tree_map(lambda a: a * 1.5, pretrained.text_params)
    key = jax.random.key(4)
    a, _ = obj.conditioning({"text": moved}, state, batch, key)
    b, _ = obj.conditioning({"text": pretrained.text_params}, state, batch, key)
    assert float(jnp.abs(a - b).max()) > 0


def copy_config(config, **cond):
    import copy

    c = copy.deepcopy(config)
    for k, v in cond.items():
        c.cond[k] = v
    return c


def test_refiner_micro_conditioning_takes_the_aesthetic_score():
    from ldm_jax import conditioning
    from ldm_jax.interop import pretrained as pio
    from ldm_jax.models.unet import UNet
    from ldm_jax.training.text_conditioning import TextConditioner

    c = load_config("ldm_sdxl", "tiny,refiner")
    p = pio.load_diffusers(TINY.parent / "tiny_sdxl_refiner")
    unet = UNet(**c.unet.to_dict())
    tok = conditioning.resolve_tokenizer(p.text_kwargs, p.tokenizer_dir)
    cond = TextConditioner(c.cond, c.unet.to_dict(), int(c.image_size), tokenizer=tok)
    assert cond.n_ids == 5 and cond.towers == ("text_encoder_2",)
    batch = {"input_ids": jnp.asarray(tok(["a red circle", "a cat"])), "original_size": jnp.array([[96, 80], [64, 64]]),
             "crop_top_left": jnp.array([[16, 8], [0, 0]]), "aesthetic_score": jnp.array([7.5, 3.0])}
    _, y = cond(p.text_params, unet, batch, jnp.zeros((2,), bool), jnp.asarray(cond.uncond_ids()), False)
    _, pooled = cond.module.apply({"params": p.text_params}, batch["input_ids"])
    for i, score in enumerate((7.5, 3.0)):
        ids, _ = conditioning.micro_ids(5, 64, 64, original_size=tuple(np.asarray(batch["original_size"][i])),
                                        crops_coords_top_left=tuple(np.asarray(batch["crop_top_left"][i])),
                                        aesthetic_score=score)
        np.testing.assert_allclose(np.asarray(y[i]), np.asarray(unet.added_cond(pooled[i:i + 1], ids[None])[0]),
                                   rtol=1e-6, atol=1e-6)
    without = {k: v for k, v in batch.items() if k != "aesthetic_score"}  # then cond.aesthetic_score (6.0)
    _, y6 = cond(p.text_params, unet, without, jnp.zeros((2,), bool), jnp.asarray(cond.uncond_ids()), False)
    ids6, _ = conditioning.micro_ids(5, 64, 64, original_size=(64, 64), aesthetic_score=6.0)
    np.testing.assert_allclose(np.asarray(y6[1]), np.asarray(unet.added_cond(pooled[1:2], ids6[None])[0]), atol=1e-6)


def test_sizes_missing_from_the_data_fail_before_compiling(objective):
    from ldm_jax.training.objective import ConfigError

    for key, value, match in (("data.record_sizes", False, "records no sizes"),
                              ("data.cache", "/tmp/latents", "data.cache keeps no image sizes")):
        c = copy_config(objective.config)
        section, name = key.split(".")
        c[section][name] = value
        with pytest.raises(ConfigError, match=match):
            type(objective)(c, objective.tokenizer).validate(None)
    c = copy_config(objective.config, micro_conditioning="fixed", drop_mode="zeros")
    c.data.record_sizes = False
    type(objective)(c, objective.tokenizer).validate(None)  # fixed ids need no sizes
    with pytest.raises(ConfigError, match="drop_mode='nope' is unknown"):
        type(objective)(copy_config(objective.config, drop_mode="nope"), objective.tokenizer)
