"""SDXL models and weights: the tiny random SDXL (tests/goldens/make_tiny_sdxl.py) against transformers /
diffusers outputs, exact round trips through diffusers folders and Stability single files, family detection,
parameter counts of the full-size towers."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ldm_jax.data import tokenizers
from ldm_jax.interop import clip, sdxl
from ldm_jax.interop import pretrained as pt
from ldm_jax.interop.common import CheckpointError, flatten, load_safetensors, save_safetensors
from ldm_jax.models.text import SDXL_TEXT, TextEncoders
from ldm_jax.models.unet import UNet


@pytest.fixture(scope="module")
def ref(goldens_dir):
    return dict(np.load(goldens_dir / "tiny_sdxl_ref.npz"))


@pytest.fixture(scope="module")
def base(goldens_dir):
    return pt.load_diffusers(goldens_dir / "tiny_sdxl")


@pytest.fixture(scope="module")
def refiner(goldens_dir):
    return pt.load_diffusers(goldens_dir / "tiny_sdxl_refiner")


def _close(ours, theirs, rel=1e-4):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=rel * np.abs(theirs).max())


def _same(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_text_towers_match_transformers(base, ref):
    """Tokenizers give transformers' ids (EOS vs "!" padding); towers give hidden_states[-2] and text_embeds."""
    prompts = json.loads(str(ref["meta"]))["prompts"]
    ids = [tokenizers.load_tokenizer(base.tokenizer_dir[n])(prompts) for n in sdxl.TOWERS]
    np.testing.assert_array_equal(ids[0], ref["ids"])
    np.testing.assert_array_equal(ids[1], ref["ids_2"])
    assert ids[0][0, -1] != ids[1][0, -1]  # the two pad tokens differ
    hidden, pooled = jax.jit(TextEncoders(**base.text_kwargs).apply)({"params": base.params["text"]}, np.stack(ids, 1))
    _close(hidden[..., :16], ref["hidden"])
    _close(hidden[..., 16:], ref["hidden_2"])
    _close(pooled, ref["text_embeds"])


@pytest.mark.parametrize("which", ["unet", "refiner_unet"])
def test_unets_match_diffusers(base, refiner, ref, which):
    p = base if which == "unet" else refiner
    model = UNet(**p.unet_kwargs)
    y = model.added_cond(ref[f"{which}_pooled"], ref[f"{which}_time_ids"])
    out = jax.jit(model.apply)({"params": p.params["unet"]}, ref[f"{which}_x"], ref[f"{which}_t"],
                               ref[f"{which}_context"], y)
    _close(out, ref[f"{which}_out"])


def test_families_are_told_apart(base, refiner, goldens_dir):
    assert (base.family, refiner.family) == ("sdxl-base", "sdxl-refiner")
    assert pt.load_diffusers(goldens_dir / "tiny_sd").family == "sd1"
    assert base.options == {"force_zeros_for_empty_prompt": True}
    assert refiner.options == {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}
    assert base.scheduler["scale_factor"] == pytest.approx(0.13025)
    assert set(refiner.text_kwargs["encoders"]) == {"text_encoder_2"}


def _fake_single_file(text_kwargs, unet_kwargs):
    """Shapes (no data) of a full-size Stability single file's UNet and conditioner."""
    from ldm_jax.interop import unet as iu

    fake = {}
    for i, (name, kw) in enumerate(text_kwargs["encoders"].items()):
        kw = clip._kw(kw)
        prefix = f"{sdxl.CONDITIONER}{i}."
        entries = (clip._hf_entries(kw, prefix + "transformer.", kw["layers"], False) if name == "text_encoder"
                   else clip._openclip_entries(kw, prefix + "model."))
        fake.update({k: jax.ShapeDtypeStruct(shape, jnp.float32) for k, _, _, shape in entries})
    shapes = iu._abstract_params_cache(unet_kwargs)
    fake.update({iu.COMPVIS_PREFIX + key: jax.ShapeDtypeStruct(iu._torch_shape(shapes[p].shape, kind), jnp.float32)
                 for p, (key, kind) in iu._leaf_map(unet_kwargs, "compvis").items()})
    return fake


@pytest.mark.parametrize("name", ["sdxl-base", "sdxl-refiner"])
def test_full_size_single_file_configs_and_counts(name, goldens_dir):
    """The released layouts' shapes give back the presets; the towers' sizes equal transformers'."""
    from ldm_jax.interop import unet as iu
    from ldm_jax.models.unet import UNET_PRESETS

    text = {"encoders": SDXL_TEXT[name]}
    fake = _fake_single_file(text, UNET_PRESETS[name])
    got = sdxl.text_config_from_single_file(fake)
    assert got == {"encoders": {n: clip._kw(kw) for n, kw in SDXL_TEXT[name].items()}}
    unet_kw = iu.config_from_compvis(fake)
    assert sdxl.family(unet_kw, got) == name
    assert UNet(**unet_kw).heads(1280) == 20 and unet_kw["adm_in_channels"] == UNET_PRESETS[name]["adm_in_channels"]
    counts = json.loads((goldens_dir / "sdxl_param_counts.json").read_text())  # transformers, meta device
    shapes = jax.eval_shape(lambda: TextEncoders(got["encoders"]).init(
        jax.random.key(0), jnp.zeros((1, len(got["encoders"]), 77), jnp.int32)))
    for tower, tree in nn.meta.unbox(shapes)["params"].items():
        assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)) == counts[tower], tower
    assert counts == {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840}


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_diffusers_folder_round_trip_is_exact(base, refiner, which, goldens_dir, tmp_path):
    p = base if which == "base" else refiner
    src = goldens_dir / ("tiny_sdxl" if which == "base" else "tiny_sdxl_refiner")
    pt.save_diffusers(p, tmp_path)
    for comp in ("unet", "vae", *p.text_kwargs["encoders"]):
        name = "diffusion_pytorch_model.safetensors" if comp in ("unet", "vae") else "model.safetensors"
        a, b = load_safetensors(src / comp / name), load_safetensors(tmp_path / comp / name)
        # transformers 5 saves a bare CLIPTextModel without `text_model.`; we write the nested keys every version reads
        b = {k.replace("text_model.", "") if "text_model." + k.replace("text_model.", "") not in a else k: v
             for k, v in b.items()}
        assert a.keys() == b.keys(), comp
        for k in a:  # fp16 files, our export is float32 of the same values
            np.testing.assert_array_equal(a[k].astype(np.float32), b[k], err_msg=f"{comp} {k}")
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if which == "base" else "StableDiffusionXLImg2ImgPipeline")
    again = pt.load_diffusers(tmp_path)
    _same(again.params, p.params)
    assert (again.unet_kwargs, again.text_kwargs, again.options, again.family) == (
        p.unet_kwargs, p.text_kwargs, p.options, p.family)
    for tok in (("tokenizer", "tokenizer_2") if which == "base" else ("tokenizer_2",)):
        assert (tmp_path / tok / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_single_file_round_trip_is_exact(base, refiner, which, tmp_path):
    p = base if which == "base" else refiner
    pt.save_single_file(p, tmp_path / "m.safetensors")
    tensors = load_safetensors(tmp_path / "m.safetensors")
    if which == "base":
        assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in tensors
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in tensors
        assert "conditioner.embedders.1.model.text_projection" in tensors
    else:
        assert "conditioner.embedders.0.model.ln_final.weight" in tensors
    assert "model.diffusion_model.label_emb.0.0.weight" in tensors
    again = pt.load_single_file(tmp_path / "m.safetensors")
    _same(again.params, p.params)
    assert (again.text_kwargs, again.unet_kwargs, again.family) == (p.text_kwargs, p.unet_kwargs, p.family)
    # a foreign file (no metadata): configs from shapes; what shapes cannot show comes as overrides
    save_safetensors({**tensors, "conditioner.embedders.1.model.logit_scale": np.float32(4.6)}
                     if which == "base" else tensors, tmp_path / "foreign.safetensors")
    heads = {n: {**kw, "heads": 2} for n, kw in p.text_kwargs["encoders"].items()}
    foreign = pt.load_single_file(tmp_path / "foreign.safetensors", overrides={
        "unet": {"addition_time_embed_dim": 8, "num_head_channels": 8, "norm_num_groups": 4},
        "vae": {"norm_groups": 8}, "text": {"encoders": heads}})
    _same(foreign.params, p.params)
    assert foreign.family == p.family and foreign.scheduler["scale_factor"] == pytest.approx(0.13025)


def test_single_file_missing_tower_is_named(base, tmp_path):
    pt.save_single_file(base, tmp_path / "m.safetensors")
    tensors = load_safetensors(tmp_path / "m.safetensors")
    del tensors["conditioner.embedders.1.model.transformer.resblocks.2.mlp.c_fc.bias"]
    save_safetensors(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="resblocks.2.mlp.c_fc.bias"):
        pt.load_single_file(tmp_path / "bad.safetensors", overrides={
            "unet": {"addition_time_embed_dim": 8, "num_head_channels": 8, "norm_num_groups": 4},
            "vae": {"norm_groups": 8}})


def test_diffusers_opens_our_exports(base, refiner, ref, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    pt.save_diffusers(base, tmp_path / "base")
    pt.save_diffusers(refiner, tmp_path / "refiner")
    pipes = {"unet": diffusers.StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "base")),
             "refiner_unet": diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tmp_path / "refiner"))}
    assert pipes["refiner_unet"].config.requires_aesthetics_score and pipes["unet"].config.force_zeros_for_empty_prompt
    with torch.no_grad():
        for which, pipe in pipes.items():
            t = lambda k: torch.from_numpy(ref[f"{which}_{k}"])  # noqa: E731
            out = pipe.unet(t("x").permute(0, 3, 1, 2), t("t"), t("context"),
                            added_cond_kwargs={"text_embeds": t("pooled"), "time_ids": t("time_ids")}).sample
            _close(out.permute(0, 2, 3, 1).numpy(), ref[f"{which}_out"], 1e-5)
        ids = torch.from_numpy(ref["ids_2"])
        _close(pipes["unet"].text_encoder_2(ids).text_embeds.numpy(), ref["text_embeds"], 1e-5)
