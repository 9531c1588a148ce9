"""UNet: parity with diffusers (stored goldens), converters, parameter counts, remat/bf16/sharding."""
from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import sharding
from ldm_jax.interop import unet as iu
from ldm_jax.interop.common import CheckpointError, StrictStateDict, flatten
from ldm_jax.models.unet import UNET_PRESETS, UNet
from ldm_jax.models.unet_blocks import AttentionBlock


def _golden_weights(goldens_dir, name):
    sys.path.insert(0, str(goldens_dir))
    from make_unet_goldens import random_state_dict  # numpy only

    g = dict(np.load(goldens_dir / f"unet_{name}.npz"))
    spec = json.loads(str(g["spec"]))
    return g, json.loads(str(g["config"])), random_state_dict(spec, int(g["seed"]))


def _count(kwargs):
    return sum(int(np.prod(v.shape)) for v in iu._abstract_params_cache(kwargs).values())


# ------------------------------------------------------------------ parameter counts (eval_shape only)

def test_param_count_sd1_and_sd2():
    assert _count(UNET_PRESETS["sd1"]) == 859_520_964  # REFERENCE.md
    # diffusers UNet2DConditionModel with the SD2 config (make_unet_goldens.py prints it): 865,910,724
    assert _count(UNET_PRESETS["sd2"]) == 865_910_724


def test_param_count_sdxl_equals_diffusers(goldens_dir):
    """diffusers' UNet2DConditionModel from the published SDXL configs, counted on the meta device."""
    counts = json.loads((goldens_dir / "unet_param_counts.json").read_text())
    assert counts["sdxl-base"] == 2_567_463_684 and counts["sdxl-refiner"] == 2_259_526_660
    for name in ("sd1", "sd2", "sdxl-base", "sdxl-refiner"):
        assert _count(UNET_PRESETS[name]) == counts[name], name


def test_config_from_compvis_tells_sd1_from_sd2():
    for name in ("sd1", "sd2", "sdxl-base", "sdxl-refiner"):
        kw = UNET_PRESETS[name]
        shapes = iu._abstract_params_cache(kw)
        fake = {iu.COMPVIS_PREFIX + key: jax.ShapeDtypeStruct(iu._torch_shape(shapes[p].shape, kind), jnp.float32)
                for p, (key, kind) in iu._leaf_map(kw, "compvis").items()}
        got = iu.config_from_compvis(fake)
        want = UNet(**kw)
        for field in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "context_dim",
                      "use_linear_in_transformer", "num_heads", "num_head_channels", "transformer_depth",
                      "adm_in_channels"):
            assert getattr(UNet(**got), field) == getattr(want, field), (name, field)
        assert UNet(**got).depth(len(want.channel_mult)) == want.depth(len(want.channel_mult)), name  # mid block
        assert tuple(got["channel_mult"]) == want.channel_mult
        assert tuple(got["attention_resolutions"]) == want.attention_resolutions


def test_diffusers_config_of_sd1():
    cfg = iu.config_to_diffusers(UNET_PRESETS["sd1"])
    assert cfg["block_out_channels"] == [320, 640, 1280, 1280] and cfg["attention_head_dim"] == 8
    assert cfg["cross_attention_dim"] == 768 and cfg["down_block_types"][-1] == "DownBlock2D"
    assert cfg["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert iu.config_to_diffusers(UNET_PRESETS["sd2"])["attention_head_dim"] == [5, 10, 20, 20]
    assert iu.config_from_diffusers(cfg) == {**UNET_PRESETS["sd1"], **iu.config_from_diffusers(cfg)}
    with pytest.raises(ValueError, match="one head width"):  # 8 heads over 192..768 channels
        iu.config_to_diffusers(UNET_PRESETS["ldm8-lsun-churches"])


# ------------------------------------------------------------------ parity with diffusers

@pytest.fixture(scope="module", params=["sd1", "sd2", "cls", "sdxl", "refiner", "g8"])
def golden(request, goldens_dir):
    g, cfg, sd = _golden_weights(goldens_dir, request.param)
    kw = iu.config_from_diffusers(cfg)
    params = iu.from_diffusers(StrictStateDict(sd, "golden"), kw)
    model = UNet(**kw)
    y = model.added_cond(g["text_embeds"], g["time_ids"]) if "time_ids" in g else g.get("y")
    out = jax.jit(model.apply)({"params": params}, g["x"], g["timesteps"], g.get("context"), y)
    return request.param, g, cfg, sd, kw, params, np.asarray(out)


def test_matches_diffusers(golden):
    name, g, cfg, _, kw, _, out = golden
    for ref in (g["out"], g["out64"]):  # PyTorch fp32 and fp64
        assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max(), name
    assert kw["in_channels"] == cfg["in_channels"]
    assert kw["use_spatial_transformer"] == (name not in ("cls", "g8"))
    assert kw["norm_num_groups"] == cfg.get("norm_num_groups", 32) and kw["norm_eps"] == cfg.get("norm_eps", 1e-5)


def test_diffusers_round_trip_exact(golden):
    *_, sd, kw, params, _ = golden
    back = iu.to_diffusers(params, kw)
    assert set(back) == set(sd)
    assert all(np.array_equal(back[k], sd[k]) for k in sd)
    assert iu.config_from_diffusers(iu.config_to_diffusers(kw)) == kw


def test_compvis_path_loads_same_params(golden):
    name, *_, kw, params, _ = golden
    cv = iu.to_compvis(params, kw)
    assert all(k.startswith("model.diffusion_model.") for k in cv)
    assert "model.diffusion_model.input_blocks.0.0.weight" in cv and "model.diffusion_model.out.2.bias" in cv
    got = iu.config_from_compvis(cv, num_heads=kw["num_heads"], num_head_channels=kw["num_head_channels"],
                                 norm_num_groups=kw["norm_num_groups"], norm_eps=kw["norm_eps"],
                                 **({"addition_time_embed_dim": kw["addition_time_embed_dim"]} if "adm_in_channels" in kw else {}))
    assert got == kw
    p2 = iu.from_compvis(StrictStateDict(cv), got)
    a, b = flatten(params), flatten(p2)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    again = iu.to_compvis(p2, got)
    assert all(np.array_equal(again[k], cv[k]) for k in cv)


def test_compvis_legacy_attention_matches_qkv_attention_legacy(golden):
    """The CompVis `qkv` tensor read as openaimodel's QKVAttentionLegacy does (per head [q|k|v])."""
    name, *_, kw, params, _ = golden
    if name != "cls":
        pytest.skip("plain attention only in the cls golden")
    cv = iu.to_compvis(params, kw)
    pre = "model.diffusion_model.middle_block.1."
    c = cv[pre + "qkv.weight"].shape[1]
    heads = UNet(**kw).heads(c)
    x = np.random.default_rng(0).standard_normal((1, 2, 2, c)).astype(np.float32)
    # openaimodel AttentionBlock in numpy (NCT layout)
    mean = x.reshape(1, 4, 32, c // 32).mean(axis=(1, 3), keepdims=True)
    var = x.reshape(1, 4, 32, c // 32).var(axis=(1, 3), keepdims=True)
    h = ((x.reshape(1, 4, 32, c // 32) - mean) / np.sqrt(var + 1e-5)).reshape(1, 4, c)
    h = h * cv[pre + "norm.weight"] + cv[pre + "norm.bias"]
    qkv = np.einsum("oc,btc->bot", cv[pre + "qkv.weight"][..., 0], h) + cv[pre + "qkv.bias"][None, :, None]
    ch = c // heads
    q, k, v = np.split(qkv.reshape(heads, 3 * ch, 4), 3, axis=1)
    w = np.einsum("hct,hcs->hts", q, k) / np.sqrt(ch)
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    a = np.einsum("hts,hcs->hct", w, v).reshape(c, 4)
    ref = x.reshape(4, c) + (cv[pre + "proj_out.weight"][..., 0] @ a).T + cv[pre + "proj_out.bias"]
    ours = AttentionBlock(heads).apply({"params": params["mid_attn"]}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(ours).reshape(4, c), ref, atol=1e-4)


def test_strict_load_names_bad_keys(golden):
    name, *_, sd, kw, _, _ = golden
    first = next(iter(sd))
    broken = {k: v for k, v in sd.items() if k != first}
    broken["conv_in.extra"] = np.zeros(1, np.float32)
    broken["conv_out.bias"] = np.zeros(7, np.float32)
    with pytest.raises(CheckpointError) as e:
        iu.from_diffusers(StrictStateDict(broken), kw)
    msg = str(e.value)
    assert first in msg and "conv_in.extra" in msg and "conv_out.bias" in msg


# ------------------------------------------------------------------ module behaviour

# one level, one res block: compiles fast; covers ResBlock, SpatialTransformer, mid block and skips
MICRO = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1,), num_res_blocks=1,
             attention_resolutions=(1,), num_heads=-1, num_head_channels=32, context_dim=16)


@pytest.fixture(scope="module")
def tiny():
    kw = MICRO
    model = UNet(**kw)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 8, 8, 4)), jnp.float32)
    t = jnp.arange(4) * 250
    ctx = jnp.asarray(rng.standard_normal((4, 5, kw["context_dim"])), jnp.float32)
    # random values for every parameter (init would zero the residual branch outputs, as openaimodel does)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, ctx))["params"]
    params = jax.tree.map(lambda v: jnp.asarray(0.2 * rng.standard_normal(v.shape), jnp.float32), nn_unbox(shapes))
    return kw, model, params, (x, t, ctx)


def nn_unbox(tree):
    from flax.core import meta

    return meta.unbox(tree)


def test_init_carries_logical_names(tiny):
    kw, model, _, (x, t, ctx) = tiny
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, ctx))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: hasattr(v, "names"))
    assert leaves and all(hasattr(v, "names") and len(v.names) == v.value.ndim for v in leaves)


def test_remat_gives_same_gradients(tiny):
    kw, model, params, (x, t, ctx) = tiny
    loss = lambda m: jax.jit(jax.grad(lambda p: jnp.mean(m.apply({"params": p}, x, t, ctx) ** 2)))  # noqa: E731
    g0 = loss(model)(params)
    g1 = loss(UNet(**kw, remat_policy="full"))(params)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_sharded_equals_single_device(tiny):
    kw, model, params, (x, t, ctx) = tiny
    ref = jax.jit(model.apply)({"params": params}, x, t, ctx)
    mesh = sharding.make_mesh((2, 2, 2))
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, ctx))["params"]
    p_sh = jax.device_put(params, sharding.logical_sharding(boxed, mesh))
    xs = jax.device_put(x, sharding.batch_sharding(mesh, 4))
    out = jax.jit(model.apply)({"params": p_sh}, xs, t, ctx)
    assert float(jnp.abs(out - ref).max()) <= 1e-5 * float(jnp.abs(ref).max())


def test_bf16_compute_close_to_fp32(tiny):
    kw, model, params, (x, t, ctx) = tiny
    ref = jax.jit(model.apply)({"params": params}, x, t, ctx)
    out = jax.jit(UNet(**kw, dtype=jnp.bfloat16).apply)({"params": params}, x, t, ctx)
    assert out.dtype == jnp.bfloat16
    assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) < 0.05 * float(jnp.abs(ref).max())


def test_bad_inputs_are_named(tiny):
    kw, model, params, (x, t, ctx) = tiny
    with pytest.raises(ValueError, match="context"):
        model.apply({"params": params}, x, t)
    with pytest.raises(ValueError, match="expects x"):
        model.apply({"params": params}, x[..., :3], t, ctx)
    with pytest.raises(ValueError, match="divisible"):  # checked before any parameter is read
        UNet(**UNET_PRESETS["tiny"]).apply({"params": {}}, x[:, :7, :7], t, jnp.zeros((4, 5, 64)))
    with pytest.raises(ValueError, match="timesteps"):
        model.apply({"params": params}, x, t[:3], ctx)
    with pytest.raises(ValueError, match="class labels"):
        model.apply({"params": params}, x, t, ctx, jnp.zeros((4,), jnp.int32))


@pytest.mark.parametrize("name", sorted(set(UNET_PRESETS) - {"sd1", "sd2", "ldm4-ffhq", "ldm4-lsun-bedrooms", "ldm-kl8-txt2img"}))
def test_presets_build(name):
    kw = UNET_PRESETS[name]
    n = _count(kw)
    # sizes the LDM paper reports for these models (arXiv 2112.10752, appendix tables), in millions
    paper = {"ldm4-celebahq": 274, "ldm8-lsun-churches": 294, "ldm4-cin256": 400}
    assert n // 10**6 == paper.get(name, n // 10**6) and n > 0  # the paper truncates to whole millions
    iu._leaf_map(kw, "compvis")  # every parameter has a CompVis name


@pytest.mark.parametrize("causal,masked", [(False, False), (True, False), (False, True)])
def test_cpu_attention_path_matches_dot_product_attention(causal, masked):
    from ldm_jax.models import layers

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 6, 3, 8)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(rng.random((2, 1, 6, 6)) > 0.3) | jnp.eye(6, dtype=bool) if masked else None
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    out = layers._attention_head_major(q, k, v, mask=mask, is_causal=causal)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_coordinate_features_give_position_and_leave_presets_unchanged():
    """coordinate_frequencies > 0: Fourier features of the relative (y, x) added after conv_in. The UNet then tells
    places apart in an input that is the same everywhere; without them (every preset) it cannot."""
    from ldm_jax.models.unet_blocks import coordinate_features

    f = np.asarray(coordinate_features(4, 6, 2))
    assert f.shape == (4, 6, 8)
    ys, xs = (np.arange(4) + 0.5) / 4 * 2 - 1, (np.arange(6) + 0.5) / 6 * 2 - 1
    np.testing.assert_allclose(f[:, 0, 1], np.sin(2 * np.pi * ys), atol=1e-6)  # sin(pi 2^1 y)
    np.testing.assert_allclose(f[0, :, 6], np.cos(np.pi * xs), atol=1e-6)  # cos(pi 2^0 x)
    assert "coordinate_frequencies" not in str(UNET_PRESETS) and UNet().coordinate_frequencies == 0
    kw = dict(UNET_PRESETS["tiny"], norm_num_groups=8)
    # a flat 96 x 96 input: pixels farther than the receptive field (~32 px) from every border see the same
    # neighbourhood, and self-attention is permutation-equivariant, so without coordinates they get one output
    x, t, ctx = jnp.ones((1, 96, 96, 4)), jnp.array([500]), jnp.ones((1, 3, 64))
    for cf in (0, 3):
        m = UNet(**kw, coordinate_frequencies=cf)
        params = m.init(jax.random.key(0), x, t, ctx)["params"]
        assert ("coordinate_embedding" in params) == bool(cf)
        params = jax.tree.map(lambda a: a + 0.01, params)  # conv_out starts at zero
        out = np.asarray(m.apply({"params": params}, x, t, ctx))[0]
        gap = np.abs(out[44, 44] - out[52, 50]).max() / np.abs(out).max()
        assert (gap < 1e-5) if cf == 0 else (gap > 1e-3), (cf, gap)
    with pytest.raises(ValueError, match="coordinate_frequencies"):
        iu.to_diffusers({}, dict(kw, coordinate_frequencies=2))
    with pytest.raises(ValueError, match="coordinate_frequencies must be >= 0"):
        UNet(**kw, coordinate_frequencies=-1).init(jax.random.key(0), x, t, ctx)
