"""Whole-pipeline import/export: diffusers folders and single files round-trip exactly; bad files fail loudly."""
import json
import shutil
import sys
import warnings

import numpy as np
import pytest

from ldm_jax.interop import clip
from ldm_jax.interop import pretrained as pt
from ldm_jax.models.unet import UNet
from ldm_jax.interop.common import CheckpointError, StrictStateDict, flatten, load_safetensors, save_safetensors


@pytest.fixture(scope="module")
def tiny(goldens_dir):
    return pt.load_diffusers(goldens_dir / "tiny_sd")


def _assert_same_params(a, b):
    fa, fb = flatten(a), flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_load_diffusers_reads_configs_and_weights(tiny, goldens_dir):
    assert tiny.text_kwargs["width"] == 32 and tiny.text_kwargs["layers"] == 2 and tiny.text_kwargs["act"] == "quick_gelu"
    assert tiny.unet_kwargs["context_dim"] == 32 and tiny.vae_kwargs["z_channels"] == 4
    assert tiny.scheduler["beta_schedule"] == "scaled_linear" and tiny.scheduler["prediction_type"] == "epsilon"
    assert tiny.scheduler["scale_factor"] == pytest.approx(0.18215) and tiny.sample_size == 8
    assert tiny.tokenizer_dir.endswith("tokenizer")
    # weights are the file's (fp16 upcast), transposed to our layout
    ref = load_safetensors(goldens_dir / "tiny_sd" / "text_encoder" / "model.safetensors")
    np.testing.assert_array_equal(tiny.params["text"]["layers_1"]["fc1"]["kernel"], ref["encoder.layers.1.mlp.fc1.weight"].T)
    # a bare transformers CLIPTextModel folder loads the same way
    kw, params = pt.load_text_encoder(goldens_dir / "tiny_sd" / "text_encoder")
    assert kw == tiny.text_kwargs
    _assert_same_params(params, tiny.params["text"])


def test_diffusers_round_trip_is_exact(tiny, tmp_path):
    pt.save_diffusers(tiny, tmp_path / "out")
    again = pt.load_diffusers(tmp_path / "out")
    _assert_same_params(tiny.params, again.params)
    assert again.unet_kwargs == tiny.unet_kwargs and again.vae_kwargs == tiny.vae_kwargs
    assert again.text_kwargs == tiny.text_kwargs and again.scheduler == tiny.scheduler
    assert again.sample_size == tiny.sample_size
    assert (tmp_path / "out" / "tokenizer" / "vocab.json").is_file()
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["text_encoder"][1] == "CLIPTextModel"


@pytest.mark.parametrize("layout", ["hf", "open_clip"])
def test_single_file_round_trip_is_exact(tiny, tmp_path, layout):
    pt.save_single_file(tiny, tmp_path / "m.safetensors", text_layout=layout)
    keys = load_safetensors(tmp_path / "m.safetensors")
    head = {"hf": "cond_stage_model.transformer.text_model.", "open_clip": "cond_stage_model.model."}[layout]
    assert any(k.startswith(head) for k in keys) and "model.diffusion_model.input_blocks.0.0.weight" in keys
    again = pt.load_single_file(tmp_path / "m.safetensors")
    _assert_same_params(tiny.params, again.params)
    assert (again.unet_kwargs, again.vae_kwargs, again.text_kwargs) == (tiny.unet_kwargs, tiny.vae_kwargs, tiny.text_kwargs)
    assert again.scheduler == tiny.scheduler
    if layout == "open_clip":  # a foreign SD2 file: v- vs eps-prediction is a guess, and says so
        _strip_metadata(tmp_path / "m.safetensors", tmp_path / "sd2.safetensors")
        with pytest.warns(UserWarning, match="v_prediction"):
            p = pt.load_single_file(tmp_path / "sd2.safetensors", overrides={"vae": {"norm_groups": 8}})
        assert p.scheduler["prediction_type"] == "v_prediction" and p.text_kwargs["output_layer"] == -2
        _assert_same_params(tiny.params, p.params)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an explicit prediction_type is not second-guessed
            p = pt.load_single_file(tmp_path / "sd2.safetensors", prediction_type="epsilon",
                                    overrides={"vae": {"norm_groups": 8}})
        assert p.scheduler["prediction_type"] == "epsilon"


def test_openclip_layout_fuses_qkv(tiny):
    sd = clip.to_compvis(tiny.params["text"], tiny.text_kwargs, layout="open_clip")
    w = sd["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]
    attn = tiny.params["text"]["layers_1"]["self_attn"]
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        np.testing.assert_array_equal(w[32 * i:32 * (i + 1)], np.asarray(attn[name]["kernel"]).T)
    sd["cond_stage_model.model.logit_scale"] = np.ones((), np.float32)  # present in SD2 files, not ours to use
    kw = clip.config_from_compvis(sd)
    assert kw["output_layer"] == -2 and kw["act"] == "gelu" and kw["layers"] == 2 and kw["vocab_size"] == 668
    _assert_same_params(clip.from_compvis(StrictStateDict(sd), {**tiny.text_kwargs, "output_layer": -2}), tiny.params["text"])


def test_sd1_layout_with_and_without_text_model(tiny):
    sd = clip.to_compvis(tiny.params["text"], tiny.text_kwargs, layout="hf")
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in sd
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(77)[None]  # a saved buffer
    _assert_same_params(clip.from_compvis(StrictStateDict(sd), tiny.text_kwargs), tiny.params["text"])
    flat = {k.replace("text_model.", ""): v for k, v in sd.items()}  # files saved without `text_model.`
    assert clip.config_from_compvis(flat)["layers"] == 2
    _assert_same_params(clip.from_compvis(StrictStateDict(flat), tiny.text_kwargs), tiny.params["text"])
    flat["cond_stage_model.extra"] = np.zeros(1, np.float32)
    with pytest.raises(CheckpointError, match="unexpected 1: cond_stage_model.extra"):
        clip.from_compvis(StrictStateDict(flat), tiny.text_kwargs)


def _strip_metadata(src, dst, extra=None, drop=()):
    t = {k: v for k, v in load_safetensors(src).items() if k not in drop}
    t.update(extra or {})
    save_safetensors(t, dst)


def test_single_file_without_metadata_infers_configs(tiny, tmp_path):
    pt.save_single_file(tiny, tmp_path / "m.safetensors", text_layout="hf")
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v * 2
           for k, v in load_safetensors(tmp_path / "m.safetensors").items() if k.startswith("model.diffusion_model.")}
    _strip_metadata(tmp_path / "m.safetensors", tmp_path / "foreign.safetensors",
                    extra={"betas": betas.astype(np.float32), "alphas_cumprod": np.cumprod(1 - betas).astype(np.float32),
                           "cond_stage_model.transformer.text_model.embeddings.position_ids": np.arange(77)[None],
                           "model_ema.decay": np.ones((), np.float32), **ema})
    # shapes hold neither head counts (CLIP's rule: width // 64) nor GroupNorm groups
    with pytest.raises(ValueError, match="norm_groups"):
        pt.load_single_file(tmp_path / "foreign.safetensors")
    fix = {"vae": {"norm_groups": 8}, "unet": {"num_heads": 2}}
    p = pt.load_single_file(tmp_path / "foreign.safetensors", overrides=fix)
    _assert_same_params(tiny.params, p.params)
    assert p.scheduler["beta_schedule"] == "scaled_linear" and p.scheduler["beta_end"] == pytest.approx(0.012)
    assert p.scheduler["prediction_type"] == "epsilon"
    assert UNet(**p.unet_kwargs) == UNet(**tiny.unet_kwargs) and p.vae_kwargs == tiny.vae_kwargs
    assert p.text_kwargs == {**tiny.text_kwargs, "heads": 1, "eos_token_id": None}
    e = pt.load_single_file(tmp_path / "foreign.safetensors", use_ema=True, overrides=fix)
    np.testing.assert_array_equal(flatten(e.params["unet"])["conv_in/kernel"], 2 * flatten(tiny.params["unet"])["conv_in/kernel"])


def test_bad_tensors_are_named(tiny, goldens_dir, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(goldens_dir / "tiny_sd", root)
    t = load_safetensors(root / "unet" / "diffusion_pytorch_model.safetensors")
    t["bogus.weight"] = np.zeros(3, np.float32)
    save_safetensors(t, root / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected 1: bogus.weight"):
        pt.load_diffusers(root)
    t = load_safetensors(goldens_dir / "tiny_sd" / "text_encoder" / "model.safetensors")
    t["final_layer_norm.weight"] = t["final_layer_norm.weight"][:31]
    del t["encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"missing 1: encoder.layers.1.mlp.fc2.bias; wrong shape 1: "
                                              r"final_layer_norm.weight: checkpoint \(31,\) vs model \(32,\)"):
        clip.from_diffusers(StrictStateDict(t), tiny.text_kwargs)
    with pytest.raises(CheckpointError, match="unexpected .'text_projection/kernel'"):  # exports are strict too
        clip.to_diffusers({**tiny.params["text"], "text_projection": {"kernel": np.zeros((32, 8))}}, tiny.text_kwargs)


def test_bad_single_file_and_missing_files(tiny, goldens_dir, tmp_path):
    pt.save_single_file(tiny, tmp_path / "m.safetensors")
    _strip_metadata(tmp_path / "m.safetensors", tmp_path / "x.safetensors", extra={"something_else": np.zeros(2)})
    with pytest.raises(CheckpointError, match="unexpected 1: something_else"):
        pt.load_single_file(tmp_path / "x.safetensors", overrides={"vae": {"norm_groups": 8}})
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        pt.load_single_file(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="written as .safetensors"):
        pt.save_single_file(tiny, tmp_path / "m.ckpt")
    shutil.copytree(goldens_dir / "tiny_sd", tmp_path / "noscheduler", ignore=shutil.ignore_patterns("scheduler_config.json"))
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        pt.load_diffusers(tmp_path / "noscheduler")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        pt.load_diffusers(tmp_path)


def test_ckpt_without_torch_says_so(tmp_path, monkeypatch):
    (tmp_path / "m.ckpt").write_bytes(b"not really")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(ImportError, match="needs torch"):
        pt.load_single_file(tmp_path / "m.ckpt")


def test_diffusers_opens_our_exports(tiny, tmp_path, goldens_dir):
    """diffusers reads our folder and, through its own single-file converter, both of our single-file layouts."""
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(goldens_dir / "tiny_sd"), safety_checker=None)
    pt.save_diffusers(tiny, tmp_path / "out")
    pipes = {"folder": diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"), safety_checker=None)}
    for layout in ("hf", "open_clip"):
        pt.save_single_file(tiny, tmp_path / f"{layout}.safetensors", text_layout=layout)
        pipes[layout] = diffusers.StableDiffusionPipeline.from_single_file(
            str(tmp_path / f"{layout}.safetensors"), config=str(goldens_dir / "tiny_sd"), safety_checker=None)
    for how, pipe in pipes.items():
        for name in ("unet", "vae", "text_encoder"):
            ours, theirs = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
            assert sorted(ours) == sorted(theirs), (how, name)
            for k in ours:
                torch.testing.assert_close(ours[k].float(), theirs[k].float(), rtol=0, atol=0, msg=f"{how} {k}")
    pipe = pipes["folder"]
    assert pipe.scheduler.config.prediction_type == "epsilon" and pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        np.testing.assert_array_equal(pipe.text_encoder(ids).pooler_output.numpy(),
                                      ref.text_encoder.float()(ids).pooler_output.numpy())


def test_ckpt_with_torch(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    pt.save_single_file(tiny, tmp_path / "m.safetensors")
    sd = {k: torch.from_numpy(np.array(v)) for k, v in load_safetensors(tmp_path / "m.safetensors").items()}
    torch.save({"state_dict": sd, "global_step": 1}, tmp_path / "m.ckpt")  # a Lightning checkpoint
    p = pt.load_single_file(tmp_path / "m.ckpt", overrides={"vae": {"norm_groups": 8}, "unet": {"num_heads": 2}})
    _assert_same_params(tiny.params, p.params)
