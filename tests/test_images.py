"""ldm_jax.images: the one image-grid / PNG helper used by sample.py, evaluation and the training hooks."""
import json

import numpy as np
from PIL import Image

from ldm_jax.images import image_grid, save_png


def test_image_grid_places_tiles_row_by_row_with_white_padding():
    images = np.arange(5 * 3 * 4 * 3, dtype=np.uint8).reshape(5, 3, 4, 3)
    grid = image_grid(images, pad=1)
    assert grid.shape == (2 * 4 + 1, 3 * 5 + 1, 3)           # 5 tiles -> 3 columns, 2 rows
    for i, img in enumerate(images):
        r, c = divmod(i, 3)
        np.testing.assert_array_equal(grid[1 + r * 4: 1 + r * 4 + 3, 1 + c * 5: 1 + c * 5 + 4], img)
    assert (grid[0] == 255).all() and (grid[:, 0] == 255).all()
    np.testing.assert_array_equal(grid[5:8, 11:15], 255)       # the empty sixth cell
    assert image_grid(images, cols=5, pad=0).shape == (3, 20, 3)


def test_save_png_round_trips_pixels_and_parameters(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    save_png(tmp_path / "a.png", img, {"seed": 3, "prompt": "x"})
    back = Image.open(tmp_path / "a.png")
    np.testing.assert_array_equal(np.asarray(back), img)
    assert json.loads(back.text["ldm_jax"]) == {"seed": 3, "prompt": "x"}
    assert back.text["parameters"] == "seed: 3, prompt: x"
