"""CLIP score: our CLIP vision tower + text tower vs transformers' CLIPModel (a tiny random folder), the image
preprocessing vs CLIPImageProcessor (PIL backend), and torchmetrics' reduction (tests/goldens/make_clip_goldens.py)."""
import json
import pathlib
import shutil

import numpy as np
import pytest

from ldm_jax.evaluation.clip_score import CLIPScorer, clip_score, preprocess
from ldm_jax.interop.clip_model import load_clip_folder
from ldm_jax.interop.common import CheckpointError
from ldm_jax.models.clip_vision import CLIPVisionTransformer
from ldm_jax.models.text import CLIPTextTransformer

GOLDENS = pathlib.Path(__file__).parent / "goldens"
FOLDER = GOLDENS / "tiny_clip"


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDENS / "clip_score.npz"))


@pytest.fixture(scope="module")
def scorer():
    return CLIPScorer.from_folder(str(FOLDER), batch_size=4)


def test_embeddings_match_transformers_clipmodel(golden):
    w = load_clip_folder(FOLDER)
    assert w.vision_kwargs["width"] == 40 and w.text_kwargs["projection_dim"] == 24 and w.text_kwargs["eos_token_id"] == 667
    _, img = CLIPVisionTransformer(**w.vision_kwargs).apply({"params": w.vision_params}, golden["pixel_values"])
    _, txt = CLIPTextTransformer(**w.text_kwargs).apply({"params": w.text_params}, golden["input_ids"])
    for ours, ref in ((img, golden["image_embeds"]), (txt, golden["text_embeds"])):
        assert np.abs(np.asarray(ours) - ref).max() < 1e-5 * max(1.0, np.abs(ref).max())
    assert np.abs(golden["image_embeds"][0] - golden["image_embeds"][1]).max() > 0.1  # inputs matter


def test_preprocessing_tokenizer_and_per_sample_score(golden, scorer):
    np.testing.assert_allclose(preprocess(golden["images"], 32), golden["pixel_values"], atol=1e-6)
    np.testing.assert_array_equal(scorer.tokenizer(list(golden["prompts"])), golden["input_ids"])
    per = scorer.per_sample(golden["images"], list(golden["prompts"]))
    np.testing.assert_allclose(per, golden["per_sample"], rtol=1e-5)
    assert clip_score(per) == pytest.approx(float(golden["clip_score"]), abs=1e-9)  # random weights: mean < 0 -> 0
    assert clip_score(np.array([10.0, -4.0])) == pytest.approx(3.0)  # torchmetrics: max of the mean, not per sample
    with pytest.raises(ValueError, match="3 images, 2 prompts"):
        scorer.per_sample(golden["images"], list(golden["prompts"])[:2])


def test_clip_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_clip_folder(tmp_path)
    bad = tmp_path / "clip"
    shutil.copytree(FOLDER, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vision_config"]["patch_size"] = 4
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="patch_embedding"):
        load_clip_folder(bad)
