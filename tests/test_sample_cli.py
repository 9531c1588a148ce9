"""python -m ldm_jax.sample (PNG files + generation parameters in the text chunk) and the shapes evaluation."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data import shapes
from ldm_jax.evaluation import evaluate_shapes, write_eval

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ldm_jax.sample", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def test_sample_cli_writes_pngs_with_parameters(tmp_path, goldens_dir):
    out = tmp_path / "out"
    res = _cli(f"--pretrained={goldens_dir / 'tiny_sd'}", "--prompt=a red circle", "--prompt=two blue squares",
               "--num_images=3", "--sampler=euler", "--steps=2", "--guidance_scale=5", "--seed=11",
               "--negative_prompt=green", f"--out={out}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["000000.png", "000001.png", "000002.png", "grid.png"]
    prompts = []
    images = []
    for i in range(3):
        img = Image.open(out / f"{i:06d}.png")
        meta = json.loads(img.text["ldm_jax"])
        assert (meta["sampler"], meta["steps"], meta["seed"], meta["guidance_scale"]) == ("euler", 2, 11, 5.0)
        assert meta["negative_prompt"] == "green" and meta["index"] == i
        # "parameters" is A1111's infotext (its PNG Info tab reads it); the JSON has both front ends' names
        lines = img.text["parameters"].splitlines()
        assert lines[:2] == [meta["prompt"], "Negative prompt: green"]
        assert lines[2].startswith("Steps: 2, Sampler: Euler, Schedule type: Karras, CFG scale: 5, Seed: 11, Size: 32x32")
        assert (meta["a1111_sampler"], meta["comfy_sampler"], meta["comfy_scheduler"]) == ("Euler", "euler", "karras")
        prompts.append(meta["prompt"])
        images.append(np.asarray(img))
        assert images[-1].shape == (32, 32, 3)  # the model's default size (unet sample_size 8 x f4)
    assert prompts == ["a red circle", "two blue squares", "a red circle"]  # prompts cycle over --num_images
    # image 2 repeats image 0's prompt but has its own noise (per-image keys)
    assert np.abs(images[0].astype(int) - images[2]).max() > 0
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 * 34 + 2, 2 * 34 + 2, 3)  # 2x2 tiles of 32 px with 2 px padding
    np.testing.assert_array_equal(grid[2:34, 2:34], images[0])
    assert "ddim" not in res.stdout  # sanity: no accidental sampler switch
    assert "100%" in res.stderr  # tqdm progress


def test_sample_cli_needs_exactly_one_model(tmp_path):
    res = _cli("--prompt=x", cwd=tmp_path)
    assert res.returncode != 0 and "exactly one of --workdir" in res.stderr


class _Painter:
    """Stands in for a pipeline: draws each prompt's own caption, optionally with another color."""

    def __init__(self, wrong_color=None):
        self.wrong_color = wrong_color
        self.calls = []

    def generate(self, prompts, **kw):
        self.calls.append(kw)
        out = []
        for p in prompts:
            attrs = shapes.parse_caption(p)
            if self.wrong_color:
                attrs["color"] = self.wrong_color if attrs["background"] != self.wrong_color else "magenta"
            out.append(shapes.render(attrs, kw["height"]))
        return np.stack(out)


def test_evaluation_scores_heldout_prompts(tmp_path):
    spec = shapes.ShapesSpec()
    metrics, images = evaluate_shapes(_Painter(), spec, per_pair=4, in_distribution=0, steps=3, guidance_scale=2.0)
    assert metrics["num_samples"] == 12 == len(images)
    assert metrics["color_accuracy"] == 1.0 and metrics["shape_accuracy"] == 1.0
    assert set(metrics["color_accuracy_per_pair"]) == {"red triangle", "green square", "blue circle"}
    wrong, _ = evaluate_shapes(_Painter(wrong_color="yellow"), spec, per_pair=4, in_distribution=0)
    assert wrong["color_accuracy"] == 0.0 and wrong["shape_accuracy"] == 1.0
    path = write_eval(tmp_path, metrics, images)
    assert json.loads(path.read_text())["color_accuracy"] == 1.0
    assert (tmp_path / "eval_grid.png").is_file()


def _flags(**over):
    import types

    base = dict(workdir=None, pretrained=str(ROOT / "tests" / "goldens" / "tiny_sd"), prompt=["x"], negative_prompt="",
                num_images=1, sampler="euler", schedule="karras", steps=2, guidance_scale=7.5, seed=0, height=None,
                width=None, batch_size=None, init_image=None, strength=None, mask=None, checkpoint_step=None, out="out")
    return types.SimpleNamespace(**{**base, **over})


def _bad_inputs(tmp):
    (tmp / "notes.txt").write_text("not an image")
    (tmp / "empty_run" / "checkpoints").mkdir(parents=True)
    (tmp / "bad.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{garbage}")
    return [  # (flags, what the one line must say)
        (dict(workdir=str(tmp / "nope"), pretrained=None), "nope is not a training workdir"),
        (dict(workdir=str(tmp / "empty_run"), pretrained=None), "has no complete checkpoint yet"),
        (dict(pretrained=str(tmp / "nope")), "is neither a diffusers folder"),
        (dict(pretrained=str(tmp / "bad.safetensors")), "is not a readable safetensors file"),
        (dict(init_image=str(tmp / "nope.png")), "no image at"),
        (dict(init_image=str(tmp / "notes.txt")), "cannot read the image"),
        (dict(out=str(tmp / "notes.txt")), "is a file, not a folder"),
        (dict(sampler="bogus"), "unknown sampler 'bogus'"),
        (dict(schedule="bogus"), "unknown schedule 'bogus'"),
        (dict(height=33), "multiples of 4"),
        (dict(steps=0), "steps must be >= 1"),
    ]


def test_sample_user_errors_end_in_one_line(tmp_path, monkeypatch):
    from ldm_jax import cli, pipeline, sample

    monkeypatch.chdir(tmp_path)
    real, loaded = pipeline.load_pretrained, {}
    monkeypatch.setattr(pipeline, "load_pretrained", lambda p: loaded[p] if p in loaded else loaded.setdefault(p, real(p)))
    for over, want in _bad_inputs(tmp_path):
        with pytest.raises(SystemExit) as e:
            cli.guarded(lambda: sample.run(_flags(**over)))
        assert isinstance(e.value.code, str) and e.value.code.startswith("error: "), over
        assert want in e.value.code and "\n" not in e.value.code, (over, e.value.code)
    assert not (tmp_path / "out").exists()  # all failed before sampling
    # a bug (an error raised inside a library, or of a type no check of ours raises) keeps its traceback
    with pytest.raises(ValueError, match="operands could not be broadcast"):
        cli.guarded(lambda: np.zeros(2) + np.zeros(3))
    with pytest.raises(TypeError):
        cli.guarded(lambda: sample.run(_flags(num_images="3")))


def test_sample_cli_error_line_and_verbose_traceback(tmp_path):
    res = _cli("--workdir=/nonexistent/run", "--prompt=x", cwd=tmp_path)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("error: /nonexistent/run is not a training workdir")
    assert "Traceback" not in res.stderr
    res = _cli("--workdir=/nonexistent/run", "--prompt=x", "--verbosity=1", cwd=tmp_path)
    assert res.returncode != 0 and "Traceback" in res.stderr and "FileNotFoundError" in res.stderr
