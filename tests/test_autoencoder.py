"""AutoencoderKL / VQModel: parity with diffusers goldens, exact formulas, converters, sharding, presets."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from safetensors import safe_open

from ldm_jax import sharding
from ldm_jax.interop import vae as conv
from ldm_jax.interop.common import CheckpointError, StrictStateDict, flatten, load_safetensors
from ldm_jax.models.autoencoder import (
    VAE_PRESETS,
    AutoencoderKL,
    DiagonalGaussian,
    Encoder,
    VectorQuantizer,
    VQModel,
    build_autoencoder,
)


def _golden(goldens_dir, name):
    path = goldens_dir / f"vae_{name}_weights.safetensors"
    with safe_open(str(path), "numpy") as f:
        cfg = json.loads(f.metadata()["config"])
    io = dict(np.load(goldens_dir / f"vae_{name}_io.npz"))
    return cfg, load_safetensors(path), io


def _close(ours, ref, rtol=1e-4):
    """fp32 parity criterion: max abs error within rtol of the reference's largest magnitude."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err, scale = np.max(np.abs(ours - ref)), np.max(np.abs(ref))
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} * {scale:.3g}"


@pytest.fixture(scope="module")
def kl(goldens_dir):
    cfg, sd, io = _golden(goldens_dir, "kl")
    kwargs = conv.config_from_diffusers(cfg)
    params = conv.from_diffusers(StrictStateDict(sd), kwargs)
    return kwargs, AutoencoderKL(**kwargs), params, sd, io


@pytest.fixture(scope="module")
def vq(goldens_dir):
    cfg, sd, io = _golden(goldens_dir, "vq")
    kwargs = conv.config_from_diffusers(cfg)
    params = conv.from_diffusers(StrictStateDict(sd), kwargs)
    return kwargs, VQModel(**kwargs), params, sd, io


def _kl_outputs(model, params, x, z):
    def f(p, x, z):
        recon, post = model.apply({"params": p}, x, sample_posterior=False)
        return post.mean, post.logvar, post.kl(), recon, model.apply({"params": p}, z, method="decode")

    return jax.jit(f)(params, x, z)


def _count(kwargs):
    return sum(int(np.prod(s)) for s in conv.param_shapes(kwargs).values())


def test_kl_f8_parameter_count():
    assert _count(VAE_PRESETS["kl-f8"]) == 83_653_863  # REFERENCE.md, SD v1 VAE


def test_preset_parameter_counts_match_diffusers(goldens_dir):
    counts = json.loads((goldens_dir / "vae_param_counts.json").read_text())
    assert set(counts) == set(VAE_PRESETS)
    for name, kwargs in VAE_PRESETS.items():
        assert _count(kwargs) == counts[name], name


def test_kl_matches_diffusers(kl):
    kwargs, model, params, _, io = kl
    assert kwargs["attn_resolutions"] == (128,) and kwargs["ch_mult"] == (1, 2, 2)  # attention at level 1 only
    mean, logvar, kl_value, recon, decoded = _kl_outputs(model, params, io["x"], io["z"])
    _close(mean, io["mean"])
    _close(logvar, io["logvar"])
    _close(kl_value, io["kl"])
    _close(recon, io["recon_mode"])
    _close(decoded, io["decoded_z"])


def test_vq_matches_diffusers(vq):
    kwargs, model, params, _, io = vq
    assert kwargs["embed_dim"] == 3 and kwargs["z_channels"] == 4 and kwargs["n_embed"] == 16

    @jax.jit
    def f(p, x):
        latent = model.apply({"params": p}, x, method="encode_latent")
        quant, loss, idx = model.apply({"params": p}, x, method="encode")
        recon, loss2, idx2 = model.apply({"params": p}, x)
        from_codes = model.apply({"params": p}, idx, method="decode_code")
        snapped = model.apply({"params": p}, latent, quantize=True, method="decode")
        return latent, quant, loss, idx, recon, loss2, idx2, from_codes, snapped

    latent, quant, loss, idx, recon, loss2, idx2, from_codes, snapped = f(params, io["x"])
    _close(latent, io["latent"])
    np.testing.assert_array_equal(idx, io["indices"])
    np.testing.assert_array_equal(idx2, io["indices"])
    assert len(np.unique(idx)) > 8  # the golden uses most of its 16 codes
    _close(quant, io["quant"])
    _close(loss, io["loss"])
    _close(loss2, io["commit_loss"])
    _close(recon, io["recon"])
    np.testing.assert_allclose(from_codes, recon, atol=1e-5)
    np.testing.assert_allclose(snapped, recon, atol=1e-5)


def test_diagonal_gaussian_formulas():
    rng = np.random.RandomState(0)
    moments = rng.randn(2, 3, 3, 8).astype(np.float32) * 4
    moments[0, 0, 0, 4], moments[0, 0, 1, 4] = -50.0, 40.0  # outside the [-30, 20] logvar clamp
    post = DiagonalGaussian.from_moments(jnp.asarray(moments))
    mean, logvar = moments[..., :4], np.clip(moments[..., 4:], -30.0, 20.0)
    np.testing.assert_array_equal(post.mean, mean)
    np.testing.assert_array_equal(post.logvar, logvar)
    key = jax.random.key(3)
    eps = np.asarray(jax.random.normal(key, mean.shape))
    np.testing.assert_allclose(post.sample(key), mean + np.exp(0.5 * logvar) * eps, rtol=1e-6)
    np.testing.assert_array_equal(post.mode(), mean)
    var = np.exp(logvar.astype(np.float64))
    ref_kl = 0.5 * np.sum(mean.astype(np.float64) ** 2 + var - 1.0 - logvar, axis=(1, 2, 3))
    np.testing.assert_allclose(post.kl(), ref_kl, rtol=1e-5)
    other = DiagonalGaussian(jnp.asarray(mean[::-1]), jnp.asarray(logvar[::-1]))
    ovar = np.exp(logvar[::-1].astype(np.float64))
    ref_kl2 = 0.5 * np.sum((mean - mean[::-1]) ** 2 / ovar + var / ovar - 1.0 - logvar + logvar[::-1], axis=(1, 2, 3))
    np.testing.assert_allclose(post.kl(other), ref_kl2, rtol=1e-5)
    np.testing.assert_allclose(post.kl(post), 0.0, atol=1e-6)


@pytest.mark.parametrize("legacy", [True, False])
def test_vector_quantizer_straight_through_and_loss(legacy):
    rng = np.random.RandomState(1)
    codebook = rng.randn(5, 2).astype(np.float32)
    z = rng.randn(1, 2, 3, 2).astype(np.float32)
    vq = VectorQuantizer(n_embed=5, embed_dim=2, beta=0.25, legacy=legacy)
    p = {"params": {"embedding": jnp.asarray(codebook)}}
    idx = np.argmin(((z[..., None, :] - codebook) ** 2).sum(-1), axis=-1)
    zq_ref = codebook[idx]
    zq, loss, indices = vq.apply(p, jnp.asarray(z))
    np.testing.assert_array_equal(indices, idx)
    np.testing.assert_allclose(zq, zq_ref, rtol=1e-6)
    mse = np.mean((zq_ref - z) ** 2)
    np.testing.assert_allclose(loss, 1.25 * mse, rtol=1e-5)  # both terms have the value mse
    # Straight-through: d(sum(w * zq))/dz = w.
    w = rng.randn(*z.shape).astype(np.float32)
    g = jax.grad(lambda z: jnp.sum(vq.apply(p, z)[0] * w))(jnp.asarray(z))
    np.testing.assert_allclose(g, w, rtol=1e-6)
    # The loss sends (1, beta) (legacy) or (beta, 1) of its gradient to the encoder / the codebook.
    enc_w, code_w = (1.0, 0.25) if legacy else (0.25, 1.0)
    gz, gp = jax.grad(lambda z, p: vq.apply(p, z)[1], argnums=(0, 1))(jnp.asarray(z), p)
    np.testing.assert_allclose(gz, enc_w * 2 * (z - zq_ref) / z.size, rtol=1e-5, atol=1e-7)
    ref_gcode = np.zeros_like(codebook)
    np.add.at(ref_gcode, idx.reshape(-1), (code_w * 2 * (zq_ref - z) / z.size).reshape(-1, 2))
    np.testing.assert_allclose(gp["params"]["embedding"], ref_gcode, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["kl", "vq"])
def test_diffusers_round_trip_is_exact(name, kl, vq):
    kwargs, _, params, sd, _ = kl if name == "kl" else vq
    exported = conv.to_diffusers(params, kwargs)
    assert set(exported) == set(sd)  # the export is the original file, key for key ...
    for k, v in sd.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)  # ... and bit for bit
    again = conv.from_diffusers(StrictStateDict(exported), conv.config_from_diffusers(conv.config_to_diffusers(kwargs)))
    assert jax.tree.all(jax.tree.map(np.array_equal, params, again))


@pytest.mark.parametrize("name", ["kl", "vq"])
def test_compvis_round_trip_is_exact(name, kl, vq):
    kwargs, _, params, _, _ = kl if name == "kl" else vq
    tensors = conv.to_compvis(params, kwargs, prefix="first_stage_model.")
    assert "first_stage_model.encoder.down.1.attn.0.q.weight" in tensors
    assert "first_stage_model.decoder.up.1.attn.1.proj_out.weight" in tensors  # CompVis numbering, not diffusers'
    assert tensors["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv in CompVis
    inferred = conv.config_from_compvis(tensors, "first_stage_model.", norm_groups=kwargs["norm_groups"])
    for field in ("ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim", "in_channels", "out_ch", "mid_attn"):
        assert inferred[field] == kwargs[field], field
    assert conv.architecture_diff(inferred, kwargs) == {}
    assert ("n_embed" in inferred) == (name == "vq")
    # A training checkpoint's loss weights sit beside the model and are not part of it.
    tensors["first_stage_model.loss.logvar"] = np.zeros((), np.float32)
    again = conv.from_compvis(StrictStateDict(tensors), inferred, "first_stage_model.")
    assert jax.tree.all(jax.tree.map(np.array_equal, params, again))
    linear_attn = {k: v[:, :, 0, 0] if ".attn" in k and v.ndim == 4 else v for k, v in tensors.items()}
    again = conv.from_compvis(StrictStateDict(linear_attn), inferred, "first_stage_model.")
    assert jax.tree.all(jax.tree.map(np.array_equal, params, again))
    assert conv.to_compvis(again, inferred, prefix="").keys() == {k[len("first_stage_model."):] for k in tensors} - {"loss.logvar"}


def test_architecture_diff_compares_attention_levels_not_resolutions():
    tiny = VAE_PRESETS["tiny"]  # resolution 32
    assert conv.architecture_diff({**tiny, "resolution": 256}, tiny) == {}
    assert conv.architecture_diff({**tiny, "resolution": 256, "attn_resolutions": (128,)}, {**tiny, "attn_resolutions": (16,)}) == {}
    assert conv.architecture_diff({**tiny, "attn_resolutions": (16,)}, tiny) == {
        "attn_levels": ((False, True, False), (False, False, False))
    }
    assert set(conv.architecture_diff(VAE_PRESETS["vq-tiny"], tiny)) == {"n_embed", "beta", "legacy", "double_z",
                                                                         "use_quant_conv", "use_post_quant_conv"}


def test_published_diffusers_configs_give_the_presets():
    sd_vae = {  # stable-diffusion-v1-5 vae/config.json
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
        "norm_num_groups": 32, "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
    }  # fmt: skip
    assert conv.config_from_diffusers(sd_vae) == conv.full_kwargs(VAE_PRESETS["kl-f8"])
    ldm_vq = {  # CompVis/ldm-celebahq-256 vqvae/config.json
        "_class_name": "VQModel", "act_fn": "silu", "block_out_channels": [128, 256, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 3, "in_channels": 3, "latent_channels": 3, "layers_per_block": 2,
        "norm_num_groups": 32, "num_vq_embeddings": 8192, "out_channels": 3, "sample_size": 256,
        "up_block_types": ["UpDecoderBlock2D"] * 3, "vq_embed_dim": 3,
    }  # fmt: skip
    assert conv.config_from_diffusers(ldm_vq) == conv.full_kwargs(VAE_PRESETS["vq-f4"])


def test_loads_fail_naming_the_bad_keys(kl):
    kwargs, _, _, sd, _ = kl
    broken = dict(sd)
    del broken["decoder.up_blocks.1.attentions.0.to_q.weight"]
    broken["encoder.conv_in.weight"] = broken["encoder.conv_in.weight"][:, :2]
    broken["decoder.stray.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as e:
        conv.from_diffusers(StrictStateDict(broken), kwargs)
    msg = str(e.value)
    assert "decoder.up_blocks.1.attentions.0.to_q.weight" in msg and "missing 1" in msg
    assert "encoder.conv_in.weight: checkpoint (8, 2, 3, 3) vs model (8, 3, 3, 3)" in msg
    assert "decoder.stray.weight" in msg
    with pytest.raises(CheckpointError, match="no CompVis autoencoder"):
        conv.config_from_compvis(sd, "first_stage_model.")


def test_deprecated_diffusers_attention_names_load(kl):
    kwargs, _, params, sd, _ = kl
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in sd.items():
        for new, dep in renames.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{dep}.")
        old[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
    again = conv.from_diffusers(StrictStateDict(old), kwargs)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, again))


def test_bf16_decode_tracks_fp32(kl):
    kwargs, _, params, _, io = kl
    bf16 = AutoencoderKL(**kwargs, dtype=jnp.bfloat16)
    out = jax.jit(lambda p, z: bf16.apply({"params": p}, z, method="decode"))(params, io["z"])
    assert out.dtype == jnp.float32
    _close(out, io["decoded_z"], rtol=5e-2)


def test_remat_keeps_gradients():
    kw = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(128,), z_channels=2, norm_groups=4)
    x = jnp.asarray(np.random.RandomState(0).randn(1, 8, 8, 3), jnp.float32)
    # Random values on the abstract tree: an init (eager or jitted) would cost more compile time than the test.
    abstract = jax.eval_shape(Encoder(**kw).init, jax.random.key(0), x)["params"]
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.randn(*a.shape), jnp.float32), nn.meta.unbox(abstract))

    def grad(policy):
        enc = Encoder(**kw, remat_policy=policy)
        jaxpr = str(jax.make_jaxpr(lambda p: enc.apply({"params": p}, x))(params))
        assert ("remat" in jaxpr) == (policy != "none"), policy
        return jax.jit(jax.grad(lambda p: jnp.sum(enc.apply({"params": p}, x) ** 2)))(params)

    g, g_remat = grad("none"), grad("full")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, g_remat)


def test_sharded_forward_equals_single_device(kl):
    kwargs, model, params, _, io = kl
    mesh = sharding.make_mesh((2, 2, 2))
    x = np.concatenate([io["x"]] * 2)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, sample_posterior=False))["params"]
    p_shard = sharding.logical_sharding(abstract, mesh)
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(p_shard))
    sharded_params = jax.device_put(params, p_shard)
    xs = jax.device_put(x, sharding.batch_sharding(mesh, 4))
    f = jax.jit(lambda p, x: model.apply({"params": p}, x, sample_posterior=False)[0])
    np.testing.assert_allclose(f(sharded_params, xs), np.concatenate([io["recon_mode"]] * 2), atol=1e-4 * 2)


def test_presets_build_with_expected_shapes():
    for name, kw in VAE_PRESETS.items():
        model = build_autoencoder(name)
        size = 32 if name in ("tiny", "vq-tiny") else 64
        x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, method="encode"), x)[0]
        latent = out[0] if isinstance(model, VQModel) else out.mean
        f = model.downsample_factor
        assert latent.shape == (1, size // f, size // f, kw["embed_dim"]), name
    for name in ("tiny", "vq-tiny"):  # every parameter carries one logical axis name per dimension
        model = build_autoencoder(name)
        extra = {} if isinstance(model, VQModel) else {"sample_posterior": False}
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), **extra))["params"]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
        assert leaves and all(isinstance(v, nn.Partitioned) and len(v.names) == v.value.ndim for v in leaves), name
    assert build_autoencoder("kl-f16").downsample_factor == 16 and build_autoencoder("kl-f4").downsample_factor == 4
    assert "n_embed" not in conv.config_from_diffusers(conv.config_to_diffusers(VAE_PRESETS["kl-f8"]))


def test_bad_inputs_raise_clear_errors(kl):
    kwargs, model, params, _, io = kl
    with pytest.raises(ValueError, match="PRNG key"):
        model.apply({"params": params}, io["x"])
    with pytest.raises(ValueError, match="divisible by the downsampling factor 4"):
        model.apply({"params": params}, io["x"][:, :6, :6], method="encode")
    with pytest.raises(ValueError, match="latents with 4 channels"):
        model.apply({"params": params}, io["x"], method="decode")
    with pytest.raises(KeyError, match="unknown autoencoder preset"):
        build_autoencoder("kl-f7")
    with pytest.raises(ValueError, match="embed_dim == z_channels"):
        conv.config_to_diffusers({**kwargs, "embed_dim": 3})


def test_space_to_depth_folds_patches_into_channels_in_row_column_channel_order():
    from ldm_jax.models.autoencoder import depth_to_space, space_to_depth

    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    y = space_to_depth(x, 2)
    assert y.shape == (2, 2, 2, 12)
    # the patch at (1, 0) of image 1: pixels (2, 0), (2, 1), (3, 0), (3, 1), each with its 3 channels
    np.testing.assert_array_equal(y[1, 1, 0], np.concatenate([x[1, 2, 0], x[1, 2, 1], x[1, 3, 0], x[1, 3, 1]]))
    np.testing.assert_array_equal(depth_to_space(y, 2), x)


def test_patch_stem_autoencoder_shapes_and_refused_export():
    """patch_size p: the trunk runs at 1/p of the image; f = p * 2**(levels-1); no diffusers/CompVis export."""
    kw = dict(ch=16, ch_mult=(1,), num_res_blocks=0, attn_resolutions=(), resolution=32, z_channels=4, embed_dim=4,
              norm_groups=8, mid_attn=False, patch_size=4)
    model = build_autoencoder(kw)
    assert model.downsample_factor == 4 and build_autoencoder({**kw, "ch_mult": (1, 2)}).downsample_factor == 8
    x = jax.random.uniform(jax.random.key(0), (1, 32, 32, 3), minval=-1, maxval=1)
    params = nn.meta.unbox(model.init(jax.random.key(1), x, sample_posterior=False)["params"])
    assert params["encoder"]["conv_in"]["kernel"].shape[-2] == 48  # 4 x 4 pixels x 3 channels per position
    assert params["decoder"]["conv_out"]["kernel"].shape[-1] == 48
    z = model.apply({"params": params}, x, method="encode_latent")
    assert z.shape == (1, 8, 8, 4)
    # the decoder's conv_out predicts 48 channels per cell, folded back into a 4 x 4 x 3 patch
    out = model.apply({"params": params}, z, method="decode")
    assert out.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="patch_size=4"):
        conv.config_to_diffusers(kw)
    with pytest.raises(ValueError, match="patch_size=4"):
        conv.to_diffusers(params, kw)
    with pytest.raises(ValueError, match="patch_size must be >= 1"):
        build_autoencoder({**kw, "patch_size": 0}).init(jax.random.key(0), x, sample_posterior=False)
