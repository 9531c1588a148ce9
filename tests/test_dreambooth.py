"""DreamBooth (training/dreambooth.py): the prior-preservation batch and weights, resume, class images made once."""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import sharding as shd
from ldm_jax.diffusion import losses
from ldm_jax.training import dreambooth as db

TINY_SD = pathlib.Path(__file__).parent / "goldens" / "tiny_sd"


def _data(prior_loss_weight=0.5, batch=4, seed=3):
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    instance = np.stack([np.full((4, 4, 3), v, np.float32) for v in (0.1, 0.2, 0.3)])
    classes = np.stack([np.full((4, 4, 3), v, np.float32) for v in (-0.1, -0.2)])
    return db.DreamBoothData(instance, np.array([1, 2, 3]), mesh, batch, classes=classes, class_ids=np.array([7, 8, 9]),
                             prior_loss_weight=prior_loss_weight, seed=seed)


def test_prior_batch_is_formed_and_weighted():
    it = _data()
    for _ in range(3):
        b = {k: np.asarray(v) for k, v in next(it).items()}
        assert b["image"].shape == (4, 4, 4, 3)
        assert set(np.rint(10 * b["image"][:2, 0, 0, 0]).astype(int)) <= {1, 2, 3}  # first half: instance images
        assert set(np.rint(10 * b["image"][2:, 0, 0, 0]).astype(int)) <= {-1, -2}  # second half: class images
        np.testing.assert_array_equal(b["input_ids"], [[1, 2, 3]] * 2 + [[7, 8, 9]] * 2)
        np.testing.assert_array_equal(b["loss_weight"], [2.0, 2.0, 1.0, 1.0])  # B/n_inst, 0.5 * B/n_class
    # the LDM loss (batch mean of weight x per-example loss) = instance mean + 0.5 x class mean
    rng = np.random.default_rng(0)
    out, target = (jnp.asarray(rng.standard_normal((4, 2, 2, 4)), jnp.float32) for _ in range(2))
    loss, _ = losses.diffusion_loss(out, target, jnp.zeros(4, jnp.int32), weights=jnp.asarray(b["loss_weight"]))
    per = np.mean((np.asarray(out) - np.asarray(target)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(float(loss), per[:2].mean() + 0.5 * per[2:].mean(), rtol=1e-6)
    solo = db.DreamBoothData(np.zeros((2, 4, 4, 3), np.float32), np.array([1, 2, 3]), it.mesh, 2)
    assert np.asarray(next(solo)["loss_weight"]).tolist() == [1.0, 1.0]  # no class prompt: plain mean
    with pytest.raises(ValueError, match="must be even"):
        _data(batch=3)


def test_resume_reproduces_the_batches():
    a = _data()
    for _ in range(5):
        next(a)
    b = _data()
    b.set_state(a.get_state())
    for _ in range(3):
        x, y = next(a), next(b)
        assert all(np.array_equal(np.asarray(x[k]), np.asarray(y[k])) for k in x)


def test_class_images_are_generated_once(tmp_path):
    import ml_collections

    cfg = ml_collections.ConfigDict(dict(sampler="dpmpp_2m", schedule="karras", steps=2, guidance_scale=3.0, seed=0,
                                         batch_size=2))
    real = db.pipeline_generator(str(TINY_SD), "a red circle", cfg, 32)
    calls = []

    def generate(indices):
        calls.append(list(indices))
        return real(indices)

    paths = db.ensure_class_images(tmp_path, 3, generate, batch_size=2)
    assert calls == [[0, 1], [2]] and all(p.is_file() for p in paths)
    first = [p.read_bytes() for p in paths]
    assert db.ensure_class_images(tmp_path, 3, generate, batch_size=2) == paths and len(calls) == 2  # a restart
    paths[1].unlink()  # a run killed before image 1 was written
    db.ensure_class_images(tmp_path, 3, generate, batch_size=2)
    assert calls[-1] == [1] and [p.read_bytes() for p in paths] == first  # only 1 again, and the same image
    imgs = db.load_images(tmp_path, 32)
    assert imgs.shape == (3, 32, 32, 3) and imgs.min() >= -1 and imgs.max() <= 1 and imgs.std() > 0.01
