"""Fine-tuning from Stable Diffusion weights through the real trainer (configs/ldm_f8.py:finetune).

tests/goldens/tiny_sd is a random-weight SD diffusers folder (tests/goldens/make_tiny_sd.py). One run of
`loop.train` with `init_from` = that folder, its VAE as the first stage and its frozen CLIP text encoder +
tokenizer must start from exactly the folder's weights, keep the frozen parts frozen and move the UNet.
The single-file path (`save_single_file` of the same weights) must load the very same starting state.
"""
from __future__ import annotations

import math
import pathlib

import jax
import numpy as np
import pytest

from training_utils import host, load_config, max_diff

TINY_SD = pathlib.Path(__file__).parent / "goldens" / "tiny_sd"
STEPS = 2


def finetune_config(p, init_from: str, first_stage: str, text: str, data_dir: str):
    """ldm_f8:finetune with the models of `p` (a `Pretrained`), shapes data at 32 px, batch 2, one device."""
    c = load_config("ldm_f8", "finetune")
    with c.unlocked():
        c.unet = dict(p.unet_kwargs)
        c.first_stage.kwargs = dict(p.vae_kwargs)
        c.cond.text = dict(p.text_kwargs)
        c.init_from = init_from
        c.first_stage.checkpoint = first_stage
        c.cond.text_checkpoint = text
        c.cond.tokenizer = str(TINY_SD / "tokenizer")
        c.image_size = 32
        c.dtype = "float32"
        c.remat = "none"
        c.mesh = (1, 1, 1)
        c.global_batch_size = 2
        c.num_steps = STEPS
        c.optim.warmup_steps = 0  # the full lr (1e-5) from the first step, so that two steps move the UNet
        assert c.optim.schedule == "sd_linear" and c.optim.cycle_length == 10**13  # SD's "never": must not overflow
        c.data.source = "shapes"
        c.data.data_dir = data_dir
        c.data.resolution = 32
        c.data.num_threads = 1
        c.data.shapes.num_train = 16
        c.data.shapes.num_test = 4
        c.data.shapes.num_heldout = 4
        c.sample.every = 0
        c.progress = False
        c.log_every = 1
        c.checkpoint.every = 1000
        c.checkpoint.async_save = False
    return c


@pytest.fixture(scope="module")
def pretrained():
    from ldm_jax.interop import pretrained

    return pretrained.load_diffusers(TINY_SD)


@pytest.fixture(scope="module")
def runs(pretrained, tmp_path_factory):
    """One STEPS-step run from the folder (with the state it started from), and the single-file start state."""
    import jax.numpy as jnp

    from ldm_jax import sharding as shd
    from ldm_jax.interop import pretrained as pio
    from ldm_jax.training import ldm, loop

    folder, data_dir = str(TINY_SD), str(tmp_path_factory.mktemp("tfds"))
    config = finetune_config(pretrained, folder, folder, folder, data_dir)
    objective = ldm.build(config, workdir=tmp_path_factory.mktemp("unused"))
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    seen = {}

    def load_and_record(state, mesh):  # the loop's own call; the first step donates the state, so copy it
        zeros = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)  # noqa: E731
        seen["zeros"] = state.replace(params=zeros(state.params), frozen=zeros(state.frozen), ema=zeros(state.ema))
        state = ldm.LDMObjective.load_pretrained(objective, state, mesh)
        seen["start"] = host({"params": state.params, "frozen": state.frozen, "extra": state.extra, "ema": state.ema})
        return state

    objective.load_pretrained = load_and_record
    trained = loop.train(config, tmp_path_factory.mktemp("run"), objective=objective, mesh=mesh)

    # the single-file path, into a zeroed state of the same structure (no second state compile)
    single = tmp_path_factory.mktemp("single") / "tiny_sd.safetensors"
    pio.save_single_file(pretrained, single)
    sobjective = ldm.build(finetune_config(pretrained, str(single), str(single), str(single), data_dir))
    sobjective.validate(mesh)
    sstate = sobjective.load_pretrained(seen["zeros"], mesh)
    single_host = host({"params": sstate.params, "frozen": sstate.frozen, "extra": sstate.extra})
    return dict(start=seen["start"], trained=trained, single=single_host, zeros=host(seen["zeros"].params))


def test_start_state_is_the_folder(runs, pretrained):
    s = runs["start"]
    assert max_diff(s["params"]["model"]["unet"], pretrained.unet_params) == 0.0
    assert max_diff(s["frozen"]["first_stage"], pretrained.vae_params) == 0.0
    assert max_diff(s["frozen"]["text"], pretrained.text_params) == 0.0
    assert "text" not in s["params"]["model"]  # frozen CLIP: not trained
    assert max_diff(s["ema"]["model"], s["params"]["model"]) == 0.0  # EMA starts from the loaded weights
    assert float(s["extra"]["scale_factor"]) == np.float32(0.18215)  # config.first_stage.scale_factor
    assert float(s["extra"]["scale_factor"]) == np.float32(pretrained.scheduler["scale_factor"])
    # the null prompt is the tiny tokenizer's "" (BOS, EOS, pads), not the all-zeros fallback
    uncond = np.asarray(s["extra"]["uncond_ids"])
    assert uncond.shape == (77,) and uncond[0] == 666 and uncond[1] == 667


def test_two_steps_train_only_the_unet(runs, pretrained):
    r = runs["trained"]
    assert len(r.losses) == STEPS and all(math.isfinite(x) for x in r.losses), r.losses
    assert int(jax.device_get(r.state.step)) == STEPS
    end = host({"params": r.state.params, "frozen": r.state.frozen, "extra": r.state.extra})
    assert max_diff(end["frozen"]["first_stage"], pretrained.vae_params) == 0.0
    assert max_diff(end["frozen"]["text"], pretrained.text_params) == 0.0
    assert float(end["extra"]["scale_factor"]) == np.float32(0.18215)
    moved = max_diff(end["params"]["model"]["unet"], pretrained.unet_params)
    # AdamW moves each weight by at most ~lr per step (plus decoupled decay lr*wd*|w|)
    assert 0.0 < moved <= STEPS * 1e-5 * 1.01 + 1e-6, moved


def test_single_file_starts_the_same(runs):
    a, b = runs["start"], runs["single"]
    assert max_diff(b["params"]["model"]["unet"], a["params"]["model"]["unet"]) == 0.0
    assert max_diff(b["frozen"]["first_stage"], a["frozen"]["first_stage"]) == 0.0
    assert max_diff(b["frozen"]["text"], a["frozen"]["text"]) == 0.0
    assert float(b["extra"]["scale_factor"]) == float(a["extra"]["scale_factor"])
    assert max_diff(runs["zeros"]["model"]["unet"], a["params"]["model"]["unet"]) > 0.01  # the load did replace it
