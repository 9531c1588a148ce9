"""LoRA on SDXL (configs/lora_sdxl.py:tiny on tests/goldens/tiny_sdxl), shape-only plus the file formats.

The objective takes the UNet, VAE, both text towers, their tokenizers and the schedule from the folder; the step
traced with jax.eval_shape (nothing compiled) trains adapters on the UNet's attention projections only, with the
batch's micro-conditioning; LoRAs on the two towers are refused with the flag to use. An SDXL UNet LoRA written
in the kohya layout (`lora_unet_…`) and in the diffusers/peft layout loads back exactly.
"""
from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest

from training_utils import load_config

TINY = pathlib.Path(__file__).parent / "goldens" / "tiny_sdxl"


def _config(**lora):
    c = load_config("lora_sdxl", "tiny")
    with c.unlocked():
        c.init_from = str(TINY)
        c.mesh = (1, 1, 1)
        c.lora.update(lora)
    return c


@pytest.fixture(scope="module")
def tiny():
    from ldm_jax.interop import load_diffusers

    return load_diffusers(TINY)


def test_step_trains_unet_adapters_on_the_frozen_sdxl_base(tiny):
    from ldm_jax import sharding as shd
    from ldm_jax.conditioning import MultiTokenizer
    from ldm_jax.models import lora
    from ldm_jax.training import lora as lora_train
    from ldm_jax.training.trainer import Trainer

    objective = lora_train.build(_config())
    assert objective.unet_kwargs == {k: v for k, v in tiny.unet_kwargs.items()}  # the architecture of the base
    assert isinstance(objective.tokenizer, MultiTokenizer)  # both towers' tokenizers, from the folder
    trainer = Trainer.of(objective)
    abstract, _ = trainer.state_shardings(shd.make_mesh((1, 1, 1), jax.devices()[:1]))
    n = 2
    spec = lambda *s, dt=np.int32: jax.ShapeDtypeStruct(s, dt)  # noqa: E731
    batch = {"image": spec(n, 32, 32, 3, dt=np.float32), "input_ids": spec(n, 2, 77), "original_size": spec(n, 2),
             "crop_top_left": spec(n, 2), "target_size": spec(n, 2)}
    new, metrics = jax.eval_shape(trainer.step_fn(objective.config.ema), abstract, batch, jax.random.key(0))
    assert sorted(new.params["model"]) == ["lora"] and sorted(new.params["model"]["lora"]) == ["unet"]
    mods = lora.modules_of(new.params["model"]["lora"]["unet"])
    attn = lora.select_targets(tiny.unet_params, ["attn"])
    assert sorted(mods) == attn and len(attn) > 0
    assert sorted(new.frozen["text"]) == ["text_encoder", "text_encoder_2"]
    shapes = lambda t: [x.shape for x in jax.tree_util.tree_leaves(t)]  # noqa: E731
    assert shapes(new.frozen["unet"]) == shapes(tiny.unet_params)
    n_adapters = sum(int(np.prod(s)) for s in shapes(new.params))
    assert sum(int(np.prod(s)) for s in shapes(new.opt_state) if len(s)) == 2 * n_adapters  # AdamW: adapters only
    assert metrics["loss"].shape == ()


def test_lora_on_the_sdxl_towers_is_refused():
    from ldm_jax.training import lora as lora_train
    from ldm_jax.training.objective import ConfigError

    with pytest.raises(ConfigError, match="lora.text_targets=''"):
        lora_train.build(_config(text_targets="attn"))


@pytest.mark.parametrize("fmt, prefix", [("kohya", "lora_unet_"), ("diffusers", "unet.")])
def test_sdxl_unet_lora_files_round_trip(tiny, tmp_path, fmt, prefix):
    from ldm_jax.interop import lora as lora_io
    from ldm_jax.interop.common import load_safetensors
    from ldm_jax.models import lora

    mods = lora.select_targets(tiny.unet_params, ["attn", "proj", "ff", "conv"])
    rng = np.random.default_rng(0)  # numpy: eager jax draws would compile once per adapter shape
    ad = jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(np.float32),
                      jax.eval_shape(lambda p: lora.init_adapters(jax.random.key(0), p, mods, 2), tiny.unet_params))
    path = tmp_path / "sdxl.safetensors"
    lora_io.save(path, {"unet": ad}, {"unet": tiny.unet_kwargs}, format=fmt, alpha=3.0)
    keys = list(load_safetensors(path))
    assert keys and all(k.startswith(prefix) for k in keys)
    loaded, found = lora_io.load(path, {"unet": tiny.unet_kwargs})
    assert found == fmt
    got, want = lora.modules_of(loaded["unet"]), lora.modules_of(ad)
    assert sorted(got) == sorted(want)
    for m in want:
        np.testing.assert_array_equal(got[m]["down"], want[m]["down"])
        np.testing.assert_array_equal(got[m]["up"], want[m]["up"])
        assert float(got[m]["alpha"]) == 3.0
