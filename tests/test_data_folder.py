"""Image folders prepared into tfds datasets: caption layouts, bad files, clear errors."""
import json
import logging

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data import builders
from ldm_jax.data.builders import DataError
from ldm_jax.data.config import default_data_config
from ldm_jax.data.pipeline import make_dataset
from ldm_jax.sharding import make_mesh


def _save(path, w, h, color, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), color, np.uint8)).save(path, format=fmt)


def _cfg(tmp_path, folder, **kw):
    c = default_data_config()
    c.source, c.path, c.data_dir, c.label_key = "folder", str(folder), str(tmp_path / "tfds"), ""
    c.resolution = 32
    for k, v in kw.items():
        setattr(c, k, v)
    return c


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((2, 1, 1), devices=__import__("jax").devices()[:2])


def test_txt_captions_and_bad_files(tmp_path, mesh, caplog):
    folder = tmp_path / "imgs"
    colors = {}
    for i in range(6):
        name = f"sub/img{i}.{'png' if i % 2 else 'jpg'}"
        colors[name] = (40 * i, 255 - 40 * i, 100)
        _save(folder / name, 40 + 8 * i, 36, colors[name])
        (folder / name).with_suffix(".txt").write_text(f"caption {i}\n")
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    good = (folder / "sub/img0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    for n in ("broken", "truncated"):
        (folder / f"{n}.txt").write_text("x")
    gray = folder / "gray.png"
    Image.fromarray(np.full((34, 34), 77, np.uint8)).save(gray)  # grayscale -> stored as RGB
    gray.with_suffix(".txt").write_text("a gray square")
    with caplog.at_level(logging.WARNING, logger="ldm_jax.data.builders"):
        b = builders.prepare_folder(tmp_path / "tfds", folder)
    assert "skipped 2 unreadable image(s) of 9" in caplog.text
    assert "broken.jpg" in caplog.text and "truncated.jpg" in caplog.text
    src = b.as_data_source("train")
    assert len(src) == 7
    rows = {src[i]["file_name"].decode(): src[i] for i in range(len(src))}
    assert rows["sub/img3.png"]["caption"] == b"caption 3"
    np.testing.assert_array_equal(rows["sub/img3.png"]["image"][0, 0], colors["sub/img3.png"])  # PNG: exact
    assert np.abs(rows["sub/img2.jpg"]["image"].astype(int) - colors["sub/img2.jpg"]).max() <= 3  # JPEG
    assert rows["gray.png"]["image"].shape == (34, 34, 3)

    it = make_dataset(_cfg(tmp_path, folder), mesh=mesh, global_batch_size=2, split="train")
    batch = next(it)
    assert batch["image"].shape == (2, 32, 32, 3) and set(batch) == {"image"}  # no tokenizer, no labels
    it.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm_jax.data.pipeline"):  # folders have no labels
        it = make_dataset(_cfg(tmp_path, folder, label_key="label"), mesh=mesh, global_batch_size=2,
                          tokenizer=lambda texts: np.ones((len(texts), 77), np.int32))
        assert set(next(it)) == {"image", "input_ids"}
    assert "no 'label' feature (data.label_key)" in caplog.text
    it.close()


def test_metadata_jsonl_and_small_images(tmp_path, mesh, caplog):
    folder = tmp_path / "meta"
    rows = []
    for i in range(4):
        size = 16 if i == 1 else 48  # img1 is smaller than the 32-px crop
        _save(folder / f"img{i}.png", size, size, (60 * i, 0, 0))
        rows.append({"file_name": f"img{i}.png", "text": f"red level {i}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    src = builders.prepare_folder(tmp_path / "tfds", folder).as_data_source("train")
    assert sorted(src[i]["caption"].decode() for i in range(4)) == [f"red level {i}" for i in range(4)]

    with caplog.at_level(logging.WARNING, logger="ldm_jax.data.pipeline"):
        up = make_dataset(_cfg(tmp_path, folder, shuffle=False, crop="center"), mesh=mesh, global_batch_size=2,
                          num_epochs=1)
        assert sum(len(b["image"]) for b in up) == 4 and up.num_skipped == 0
    assert "upscaling image img1.png of size (16, 16) to resolution 32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm_jax.data.pipeline"):
        skip = make_dataset(_cfg(tmp_path, folder, small_images="skip", shuffle=False), mesh=mesh,
                            global_batch_size=2, num_epochs=1)
        reds = sorted(float(x[0, 0, 0]) for b in skip for x in np.asarray(b["image"]))
    assert skip.num_skipped == 1 and "img1.png" in caplog.text and "smaller than resolution 32" in caplog.text
    np.testing.assert_allclose(reds, [60 * i / 127.5 - 1 for i in (0, 2)], atol=1e-6)  # 3 left: one batch of 2


def test_clear_errors(tmp_path, mesh):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images in"):
        builders.prepare_folder(tmp_path / "tfds", empty)
    with pytest.raises(DataError, match="does not exist"):
        builders.prepare_folder(tmp_path / "tfds", tmp_path / "nowhere")
    nocap = tmp_path / "nocap"
    for i in range(3):
        _save(nocap / f"a{i}.png", 8, 8, (0, 0, 0))
    (nocap / "a0.txt").write_text("only one caption")
    with pytest.raises(DataError, match=r"2 of 3 images .* have no caption, e.g. \['a1.png', 'a2.png'\]"):
        builders.prepare_folder(tmp_path / "tfds", nocap)
    uncond = builders.prepare_folder(tmp_path / "tfds", nocap, require_captions=False)  # unconditional data
    assert len(uncond.as_data_source("train")) == 3
    bad_meta = tmp_path / "badmeta"
    _save(bad_meta / "x.png", 8, 8, (0, 0, 0))
    (bad_meta / "metadata.jsonl").write_text('{"name": "x.png"}\n')
    with pytest.raises(DataError, match="metadata.jsonl:1: expected a JSON object with 'file_name'"):
        builders.prepare_folder(tmp_path / "tfds", bad_meta)
    c = default_data_config()
    c.source, c.name, c.data_dir = "tfds", "no_such_dataset_xyz", str(tmp_path / "tfds")
    with pytest.raises(DataError, match="unknown tfds dataset 'no_such_dataset_xyz'"):
        make_dataset(c, mesh=mesh, global_batch_size=2)
    c = _cfg(tmp_path, nocap, image_key="picture")
    c.caption_key = ""
    with pytest.raises(DataError, match=r"no feature 'picture'"):
        make_dataset(c, mesh=mesh, global_batch_size=2)
