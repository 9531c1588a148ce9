"""The pooled caption as the UNet's added vector `y` (`unet.adm_in_channels` = the text encoder's pooled width).

configs/shapes.py adds the caption's pooled embedding (the text encoder's output at EOS) to the time embedding,
beside the cross-attention, with no SDXL micro-conditioning ids. Checked on that config's smoke sizes, with random
weights: y is exactly the pooled vector (a dropped caption's is the empty prompt's), the UNet's output depends on
it, sampling builds the same y, micro-conditioning arguments are refused, and widths that are neither the pooled
width nor the pooled width plus 5 or 6 ids are config errors.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from training_utils import load_config


@pytest.fixture(scope="module")
def setup():
    from ldm_jax.data.tokenizers import train_bpe_tokenizer
    from ldm_jax.models.unet import UNet
    from ldm_jax.training.text_conditioning import TextConditioner

    c = load_config("shapes", "smoke")
    captions = ["a small red circle at the top left on a blue background",
                "a large green square at the center on a white background"]
    tok = train_bpe_tokenizer(captions * 8, vocab_size=int(c.cond.text.vocab_size), max_length=int(c.cond.text.max_length))
    cond = TextConditioner(c.cond, c.unet.to_dict(), int(c.image_size), tokenizer=tok)
    unet = UNet(**c.unet.to_dict())
    text_params = cond.init(jax.random.key(0))
    ids = jnp.asarray(tok(captions))
    return c, tok, cond, unet, text_params, ids


def test_shapes_config_adds_the_pooled_text(setup):
    c, _, cond, unet, _, _ = setup
    assert c.unet.adm_in_channels == c.cond.text.width == cond.module.pooled_dim
    assert cond.added and cond.n_ids == 0


def test_y_is_the_pooled_caption_and_dropout_gives_the_empty_prompts(setup):
    _, _, cond, unet, text_params, ids = setup
    uncond = jnp.asarray(cond.uncond_ids())
    _, pooled = cond.module.apply({"params": text_params}, ids)
    _, pooled_empty = cond.module.apply({"params": text_params}, uncond[None])
    ctx, y = cond(text_params, unet, {"input_ids": ids}, jnp.zeros((2,), bool), uncond, True)
    assert y.shape == (2, unet.adm_in_channels)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(pooled))
    assert float(jnp.abs(y[0] - y[1]).max()) > 1e-3  # two captions, two vectors
    _, y_drop = cond(text_params, unet, {"input_ids": ids}, jnp.array([True, False]), uncond, True)
    np.testing.assert_array_equal(np.asarray(y_drop[0]), np.asarray(pooled_empty[0]))
    np.testing.assert_array_equal(np.asarray(y_drop[1]), np.asarray(pooled[1]))


def test_unet_output_depends_on_y(setup):
    from ldm_jax.models.unet import UNet

    c, _, cond, _, text_params, ids = setup
    # 4 channels per GroupNorm group: with one per group (the smoke UNet's 32 channels in 32 groups) the norm after
    # the time-embedding add removes any per-channel shift, so neither t nor y could change the output
    unet = UNet(**{**c.unet.to_dict(), "norm_num_groups": 8})
    ctx, y = cond(text_params, unet, {"input_ids": ids}, jnp.zeros((2,), bool), jnp.asarray(cond.uncond_ids()), True)
    x = jax.random.normal(jax.random.key(1), (2, *([c.image_size // 4] * 2), unet.in_channels))
    t = jnp.array([500, 500])
    params = unet.init(jax.random.key(2), x, t, ctx, y)["params"]
    # the y MLP's output layer may start at zero (no effect at init): give every weight a random value
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = tree.unflatten([0.1 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])
    out = unet.apply({"params": params}, x, t, ctx, y)
    swapped = unet.apply({"params": params}, x, t, ctx, y[::-1])
    zero_y = unet.apply({"params": params}, x, t, ctx, jnp.zeros_like(y))
    assert float(jnp.abs(out - swapped).max()) > 1e-3 and float(jnp.abs(out - zero_y).max()) > 1e-3
    with pytest.raises(ValueError, match="adm_in_channels"):
        unet.apply({"params": params}, x, t, ctx, None)


def test_sampling_builds_the_same_y_and_refuses_micro_conditioning(setup):
    from ldm_jax import conditioning

    _, _, cond, unet, text_params, ids = setup
    added = conditioning.added_inputs(unet, cond.module, {}, 32, 32, zero=False)
    assert added["cond"].shape == (1, 0) and added["uncond"].shape == (1, 0)
    _, pooled = cond.module.apply({"params": text_params}, ids)
    y = unet.added_cond(pooled, jnp.zeros((2, 0)))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(pooled))
    for micro in ({"original_size": (64, 64)}, {"crops_coords_top_left": (4, 0)}, {"aesthetic_score": 7.0}):
        with pytest.raises(ValueError, match="pooled text alone"):
            conditioning.added_inputs(unet, cond.module, micro, 32, 32, zero=False)


def test_widths_between_are_config_errors(setup):
    from ldm_jax import conditioning
    from ldm_jax.training.objective import ConfigError
    from ldm_jax.training.text_conditioning import TextConditioner, config_errors

    c, tok, cond, _, _, _ = setup
    width = int(c.cond.text.width)
    assert conditioning.n_micro_ids(width, width, 8) == 0
    assert conditioning.n_micro_ids(width + 6 * 8, width, 8) == 6
    with pytest.raises(ValueError, match="pooled width"):
        conditioning.n_micro_ids(width - 8, width, 8)
    unet_kw = {**c.unet.to_dict(), "adm_in_channels": width + 3 * 256}
    with pytest.raises(ConfigError, match="pooled text alone"):
        TextConditioner(c.cond, unet_kw, int(c.image_size), tokenizer=tok)
    # no ids: nothing to read from the batch, so the latent cache and unrecorded sizes are fine
    with c.unlocked():
        c.data.cache = "/tmp/latents"
        c.cond.micro_conditioning = "batch"
    assert config_errors(c, cond) == []
