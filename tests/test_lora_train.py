"""LoRA training through the real trainer (configs/lora_sd1.py:test on tests/goldens/tiny_sd, shapes data).

One objective, two runs: 2 steps (checkpoints at 1 and 2), then checkpoint 2 is deleted and the same
command resumes from 1 and redoes step 2. Checks: only adapters are trained (the base stays exactly the folder's
weights, the optimizer state and EMA hold adapter-shaped arrays only), the base is never donated, a bf16 base keeps
fp32 adapters, the resumed run equals the straight one bit for bit, the exported LoRA file loads back
(interop/lora.py) to the trained adapters, and the workdir loads as the base plus its adapters.
"""
from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest

from training_utils import host, load_config, max_diff

TINY_SD = pathlib.Path(__file__).parent / "goldens" / "tiny_sd"
pytestmark = pytest.mark.timeout(1800)  # two compiles of a training step: ~1 min idle, far more on a shared machine


def lora_config(data_dir: str, num_steps: int):
    c = load_config("lora_sd1", "test")
    with c.unlocked():
        c.init_from = str(TINY_SD)
        c.lora.rank, c.lora.alpha = 2, 4.0
        c.lora.unet_targets = "attn,conv"
        c.lora.text_targets = "attn"
        c.optim.lr = 1e-3
        c.num_steps = num_steps
        c.data.source = "shapes"
        c.data.data_dir = data_dir
        c.data.num_threads = 1
        c.data.shapes.num_train, c.data.shapes.num_test, c.data.shapes.num_heldout = 16, 4, 4
        c.progress = False
        c.log_every = 1
        c.checkpoint.every = 1
        c.checkpoint.async_save = False
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 steps with checkpoints at 1 and 2; then checkpoint 2 is deleted and the run resumes from 1 to 2 again."""
    import shutil

    from ldm_jax import sharding as shd
    from ldm_jax.training import loop
    from ldm_jax.training import lora as lora_train
    from ldm_jax.training.objective import Hook

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    objective = lora_train.build(lora_config(data_dir, 2))
    workdir = tmp_path_factory.mktemp("run")
    seen = []  # (step, state after it): the state the next step received
    straight = loop.train(lora_config(data_dir, 2), workdir, objective=objective, mesh=mesh,
                          hooks=[Hook(every=1, fn=lambda ctx: seen.append((ctx.step, ctx.state)))])
    out = tmp_path_factory.mktemp("export") / "lora.safetensors"
    objective.export_lora(straight.state, out, use_ema=False)
    straight_state = host({"params": straight.state.params, "opt": straight.state.opt_state, "ema": straight.state.ema,
                           "frozen": straight.state.frozen})
    shutil.rmtree(workdir / "checkpoints" / "2")
    resumed = loop.train(lora_config(data_dir, 2), workdir, objective=objective, mesh=mesh)
    return dict(objective=objective, straight=straight, straight_state=straight_state, resumed=resumed, export=out,
                workdir=workdir, seen=seen, data_dir=data_dir)


def test_only_adapters_are_trained(runs):
    from ldm_jax.interop import load_diffusers
    from ldm_jax.models import lora

    tiny = load_diffusers(TINY_SD)
    end = runs["straight_state"]
    st = runs["straight"].state
    assert max_diff(end["frozen"]["unet"], tiny.unet_params) == 0.0
    assert max_diff(end["frozen"]["text"], tiny.text_params) == 0.0
    assert max_diff(end["frozen"]["first_stage"], tiny.vae_params) == 0.0
    model = end["params"]["model"]
    assert sorted(model) == ["lora"] and sorted(model["lora"]) == ["text", "unet"]
    n_adapters = lora.count(model["lora"]["unet"]) + lora.count(model["lora"]["text"])
    # unet: 32 attention projections + 22 convs (16 resnet, 4 shortcuts, down- and upsampler); text: 8
    mods = lora.modules_of(model["lora"]["unet"])
    assert len(mods) == 32 + 22 and len(lora.modules_of(model["lora"]["text"])) == 8
    # AdamW state: mu and nu of each adapter, plus scalar counts — nothing of the base
    opt_sizes = [x.size for x in jax.tree_util.tree_leaves(end["opt"])]
    assert sum(s for s in opt_sizes if s > 1) == 2 * n_adapters
    assert max_diff(end["ema"]["model"], end["params"]["model"]) > 0  # EMA of the adapters, not a copy
    ups = [np.abs(m["up"]).max() for m in mods.values()]
    assert min(ups) > 0  # every adapter's up moved off its zero init
    for loss in runs["resumed"].losses + runs["straight"].losses:
        assert np.isfinite(loss)


def test_checkpoints_hold_adapters_only(runs):
    import json

    ckpt = runs["workdir"] / "checkpoints" / "2"
    leaves = json.loads((ckpt / "state" / "_METADATA").read_text())["tree_metadata"]  # orbax: one entry per leaf
    assert not [k for k in leaves if "'frozen'" in k and ("unet" in k or "text" in k or "first_stage" in k)]
    assert sum("'params'" in k for k in leaves) == 2 * (54 + 8)  # down + up of each adapter, nothing else trained
    meta = json.loads((ckpt / "meta" / "metadata").read_text())  # the pointer to the base and the LoRA config
    assert meta["base"] == str(TINY_SD) and meta["lora"]["rank"] == 2 and meta["lora"]["alpha"] == 4.0


def test_resume_equals_straight_run(runs):
    a, b = runs["resumed"].state, runs["straight_state"]
    assert int(a.step) == int(runs["straight"].state.step) == 2 and len(runs["resumed"].losses) == 1  # step 2 again
    assert max_diff(host(a.params), b["params"]) == 0.0
    assert max_diff(host(a.opt_state), b["opt"]) == 0.0
    assert max_diff(host(a.ema), b["ema"]) == 0.0


def test_exported_file_loads_back(runs):
    from ldm_jax.interop import lora as lora_io
    from ldm_jax.models import lora

    o = runs["objective"]
    loaded, fmt = lora_io.load(runs["export"], {"unet": o.unet_kwargs, "text": o.text_kwargs})
    trained = runs["straight_state"]["params"]["model"]["lora"]
    for m in ("unet", "text"):
        got, want = lora.modules_of(loaded[m]), lora.modules_of(trained[m])
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(got[k]["down"], want[k]["down"])
            np.testing.assert_array_equal(got[k]["up"], want[k]["up"])
            assert float(got[k]["alpha"]) == 4.0


def test_base_is_not_donated(runs):
    """The step donates the trained carry (adapters, AdamW, EMA) but takes `state.frozen` as its own argument: the
    base the first step saw is still readable after the second and is the very array the run ends with."""
    (s1, after1), (s2, after2) = runs["seen"]
    assert (s1, s2) == (1, 2)
    frozen1, frozen2 = jax.tree_util.tree_leaves(after1.frozen), jax.tree_util.tree_leaves(after2.frozen)
    assert len(frozen1) > 0 and all(a is b for a, b in zip(frozen1, frozen2))
    assert not any(x.is_deleted() for x in frozen1)
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves((after1.params, after1.opt_state, after1.ema)))


def test_bf16_base_with_fp32_adapters(runs):
    """lora.base_dtype=bfloat16: the traced step keeps the base bf16 and the adapters, their AdamW moments and EMA
    fp32 (shape-only: jax.eval_shape of the trainer's step; the numbers of a bf16 base are tests/test_lora.py's)."""
    from ldm_jax import sharding as shd
    from ldm_jax.training import lora as lora_train
    from ldm_jax.training.trainer import Trainer

    c = lora_config(runs["data_dir"], 2)
    with c.unlocked():
        c.lora.base_dtype = "bfloat16"
    trainer = Trainer.of(lora_train.build(c))
    abstract, _ = trainer.state_shardings(shd.make_mesh((1, 1, 1), jax.devices()[:1]))
    batch = {"image": jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32), "input_ids": jax.ShapeDtypeStruct((2, 77), np.int32)}
    new, metrics = jax.eval_shape(trainer.step_fn(c.ema), abstract, batch, jax.random.key(0))
    dtypes = lambda t: {x.dtype for x in jax.tree_util.tree_leaves(t)}  # noqa: E731
    assert dtypes(new.frozen["unet"]) == dtypes(new.frozen["text"]) == {np.dtype("bfloat16")}
    trained = (new.params, [x for x in jax.tree_util.tree_leaves(new.opt_state) if x.ndim], new.ema)
    assert dtypes(trained) == {np.dtype("float32")} and metrics["loss"].dtype == np.float32


def test_workdir_loads_as_base_plus_adapters(runs):
    """load_pretrained(a LoRA workdir): the base folder's weights with the run's EMA adapters attached as a LoRA;
    what it samples with equals what the objective's sample/eval hooks sample with (`sampling_params`)."""
    from ldm_jax import pipeline_lora
    from ldm_jax.interop import load_diffusers
    from ldm_jax.models import lora
    from ldm_jax.pipeline import load_pretrained

    pipe = load_pretrained(runs["workdir"])
    tiny = load_diffusers(TINY_SD)
    assert max_diff(host(pipe.params["unet"]), tiny.unet_params) == 0.0 and pipe.step == 2
    (name,) = pipe.loras.adapters
    got, ema = host(pipe.loras.adapters[name]), runs["straight_state"]["ema"]["model"]["lora"]
    for m in ("unet", "text"):
        mods = lora.modules_of(got[m])
        assert {float(mods[k].pop("alpha")) for k in mods} == {4.0}  # the run's alpha travels with each module
        assert max_diff(mods, lora.modules_of(ema[m])) == 0.0
    sampled = host(pipeline_lora.apply(pipe.loras.attach(pipe.params)))
    hook = host(runs["objective"].sampling_params(runs["resumed"].state))
    for m in ("unet", "text", "vae"):
        np.testing.assert_allclose(max_diff(sampled[m], hook[m]), 0.0, atol=1e-6)
    assert max_diff(hook["unet"], tiny.unet_params) > 0  # the adapters are in
