"""Aspect-ratio buckets: equal-area shapes, one bucket per batch, micro-conditioning recorded, exact resume."""
import numpy as np
import pytest
from PIL import Image

from ldm_jax.data import buckets
from ldm_jax.data.config import default_data_config
from ldm_jax.data.pipeline import crop_and_flip, make_dataset
from ldm_jax.sharding import make_mesh


def test_make_buckets_equal_area_and_bounded():
    b = buckets.make_buckets(1024, 64, 2.0)
    assert (1024, 1024) in b and len(b) == len(set(b)) <= 2 * 1024 // 64
    for h, w in b:
        assert h % 64 == 0 and w % 64 == 0 and 0.5 <= w / h <= 2.0
        assert 1024 * 1024 - 64 * max(h, w) < h * w <= 1024 * 1024  # the tallest multiple of 64 under the area
    assert {(h, w) for h, w in b} == {(w, h) for h, w in b}  # portrait and landscape alike
    assert buckets.make_buckets(1024, 64, 4.0)[0] == (2048, 512)
    assert b[buckets.nearest_bucket(b, 600, 1200)] == (704, 1408)
    with pytest.raises(ValueError, match="bucket_step"):
        buckets.make_buckets(96, 64)


def test_square_bucket_is_the_old_crop():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    crop, (top, left) = buckets.resize_and_crop(img, (32, 32), np.random.default_rng(3), random_crop=True, flip=False)
    again = crop_and_flip(img, 32, np.random.default_rng(3), random_crop=True, flip=False)
    np.testing.assert_array_equal(crop, again)
    wide, (t2, l2) = buckets.resize_and_crop(img, (32, 64), None, random_crop=False, flip=False)
    assert wide.shape == (32, 64, 3) and t2 == (46 - 32) // 2 and l2 == 0  # covers 64 wide: 70*64/70 x 50*64/70


@pytest.fixture(scope="module")
def folder_config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("buckets")
    rng = np.random.default_rng(0)
    shapes = [(64, 64)] * 6 + [(60, 130)] * 6 + [(130, 62)] * 4 + [(40, 40)]  # (h, w); the last one is too small
    for i, (h, w) in enumerate(shapes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp / f"im{i:02d}.png")
        (tmp / f"im{i:02d}.txt").write_text(f"image {i}")
    c = default_data_config()
    c.source, c.path, c.data_dir, c.label_key, c.caption_key = "folder", str(tmp), str(tmp / "tfds"), "", ""
    c.resolution, c.buckets, c.bucket_step, c.small_images = 64, True, 16, "skip"
    return c, shapes


def test_bucketed_batches_and_resume(folder_config):
    c, shapes = folder_config
    mesh = make_mesh((2, 1, 1), devices=__import__("jax").devices()[:2])
    it = make_dataset(c, mesh=mesh, global_batch_size=2, seed=1)
    allowed = set(buckets.make_buckets(64, 16, 2.0))
    assert allowed == {(64, 64), (48, 80), (80, 48)}
    seen, batches = set(), []
    for _ in range(8):
        b = {k: np.asarray(v) for k, v in next(it).items()}
        h, w = b["image"].shape[1:3]
        assert (h, w) in allowed and -1.0 <= b["image"].min() and b["image"].max() <= 1.0
        np.testing.assert_array_equal(b["target_size"], [[h, w]] * 2)
        for (oh, ow), (top, left) in zip(b["original_size"], b["crop_top_left"]):
            assert (oh, ow) in set(shapes[:-1])  # the 40x40 image is never used (smaller than its bucket)
            scale = max(h / oh, w / ow)
            assert 0 <= top <= round(oh * scale) - h and 0 <= left <= round(ow * scale) - w
        seen.add((h, w))
        batches.append(b)
    assert len(seen) == 3  # square, landscape, portrait: one bucket per batch
    state = None
    it2 = make_dataset(c, mesh=mesh, global_batch_size=2, seed=1)
    for _ in range(5):
        next(it2)
    state = it2.get_state()
    it2.close()
    it3 = make_dataset(c, mesh=mesh, global_batch_size=2, seed=1)
    it3.set_state(state)
    for want in batches[5:]:
        got = {k: np.asarray(v) for k, v in next(it3).items()}
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    it.close()
    it3.close()
