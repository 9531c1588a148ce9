"""python -m ldm_jax.evaluation stats|fid|kid|clip: the numbers in the JSON are the library's on the written PNGs.

Runs offline on the tiny diffusers folder (tests/goldens/tiny_sd) in its own first-stage feature space (the
FID Inception path is checked against pytorch-fid in test_fid.py) and the tiny CLIP folder."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data.pipeline import crop_and_flip
from ldm_jax.evaluation import fid, first_stage
from ldm_jax.evaluation.clip_score import CLIPScorer, clip_score
from ldm_jax.pipeline import load_pretrained

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ldm_jax.evaluation", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _pngs(folder: pathlib.Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])


def test_stats_fid_and_clip_commands(tmp_path, goldens_dir):
    tiny_sd, tiny_clip = goldens_dir / "tiny_sd", goldens_dir / "tiny_clip"
    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):  # 40x48: resized and center-cropped to the model's 32x32 like training data
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(real / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\n")

    res = _cli("stats", f"--data={real}", f"--pretrained={tiny_sd}", "--features=first_stage",
               f"--out={tmp_path / 'ref.npz'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _cli("fid", f"--pretrained={tiny_sd}", "--features=first_stage", f"--ref={tmp_path / 'ref.npz'}",
               f"--prompts={tmp_path / 'prompts.txt'}", "--num_samples=5", "--batch_size=4", "--steps=1",
               f"--out={tmp_path / 'out'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "sampling" in res.stderr  # the tqdm bar
    result = json.loads((tmp_path / "out" / "fid.json").read_text())
    samples = _pngs(tmp_path / "out")
    assert samples.shape == (5, 32, 32, 3) and result["num_samples"] == 5 and result["steps"] == 1
    meta = [json.loads(Image.open(tmp_path / "out" / f"{i:06d}.png").text["ldm_jax"])["prompt"] for i in range(5)]
    assert meta == ["a red circle", "a blue square"] * 2 + ["a red circle"]

    feats = first_stage.from_pipeline(load_pretrained(tiny_sd), batch_size=8)
    ref = fid.load_stats(tmp_path / "ref.npz")
    real_imgs = np.stack([crop_and_flip(np.asarray(Image.open(real / f"{i}.png")), 32, None, random_crop=False,
                                        flip=False) for i in range(8)])
    direct = fid.feature_stats(feats(real_imgs))
    np.testing.assert_allclose(ref.mu, direct.mu, rtol=1e-5, atol=1e-6)
    assert ref.features.shape == (8, 8 * 8 * 4)
    assert result["fid_first_stage"] == pytest.approx(fid.fid_from_features(feats(samples), ref), rel=1e-5)

    res = _cli("clip", f"--images={tmp_path / 'out'}", f"--clip={tiny_clip}", f"--out={tmp_path / 'clip'}",
               cwd=tmp_path)  # the prompts come from the PNGs' "ldm_jax" text chunks
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((tmp_path / "clip" / "clip.json").read_text())
    per = CLIPScorer.from_folder(str(tiny_clip)).per_sample(samples, meta)
    assert got["clip_score"] == pytest.approx(clip_score(per), abs=1e-4) and got["num_samples"] == 5


@pytest.mark.parametrize("args, message", [
    (["bogus"], "the command is one of shapes, fid, kid, clip, stats"),
    (["stats", "--data=.", "--out=x.npz", "--inception=missing.pth"], "no checkpoint at missing.pth"),
])
def test_user_errors_end_in_one_line(tmp_path, args, message):
    res = _cli(*args, cwd=tmp_path)
    assert res.returncode == 1 and message in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr[-2000:]
