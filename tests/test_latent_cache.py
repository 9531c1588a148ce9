"""Cached first-stage latents (data.cache): keyed, resumable, per-process shards, exact iterator state, and
the LDM loss from the cache equals the loss from images (posterior sample and mean)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import sharding as shd
from ldm_jax.data import latent_cache as lc


def fake_read(indices):
    return {"image": np.stack([np.full((4, 4, 3), i % 256, np.uint8) for i in indices]),
            "caption": np.asarray([f"c{i}" for i in indices]), "label": np.asarray(indices, np.int32)}


def fake_encode(images):
    m = images[:, :2, :2, :1] * 2.0
    return m, np.abs(m) + 0.5


def test_key_changes_with_first_stage_and_data_only():
    fs, data = {"checkpoint": {"path": "/a", "files": [["x", 1, 2]]}, "kwargs": {"ch": 16}}, {"resolution": 32, "seed": 0}
    k = lc.cache_key(fs, data)
    assert k == lc.cache_key(fs, {**data, "num_threads": 7, "prefetch": 9, "cache": "/elsewhere"})  # how, not what
    assert k != lc.cache_key(fs, {**data, "seed": 1})
    assert k != lc.cache_key({**fs, "checkpoint": {"path": "/a", "files": [["x", 1, 3]]}}, data)  # a new checkpoint
    assert k != lc.cache_key({**fs, "kwargs": {"ch": 32}}, data)


def test_build_resumes_after_a_crash_and_shards_per_process(tmp_path):
    calls = []

    def counting(images):
        calls.append(len(images))
        return fake_encode(images)

    def flaky(images):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while encoding chunk 3
        return counting(images)

    cache = lc.LatentCache(tmp_path, "k1")
    with pytest.raises(KeyboardInterrupt):
        cache.build(50, fake_read, flaky, chunk=8, process_index=1, process_count=2, progress=False)
    assert not cache.done(1) and len(list(tmp_path.glob("k1/p1-*.npz"))) == 2 and not list(tmp_path.glob("k1/*.tmp*"))
    calls.clear()
    cache.build(50, fake_read, counting, chunk=8, process_index=1, process_count=2, progress=False)
    assert calls == [8, 1]  # only the two chunks left of process 1's 25 examples (8, 8 written; 8, 1 to go)
    cache.build(50, fake_read, fake_encode, chunk=8, process_index=0, process_count=2, progress=False)
    calls.clear()
    cache.build(50, fake_read, counting, chunk=8, process_index=0, process_count=2, progress=False)
    assert calls == []  # complete: nothing re-encoded
    p0, p1 = cache.load(0), cache.load(1)
    assert list(p0["index"]) == list(range(0, 50, 2)) and list(p1["index"]) == list(range(1, 50, 2))
    want_mean, want_std = fake_encode(fake_read(p1["index"])["image"].astype(np.float32) * (1 / 127.5) - 1)
    np.testing.assert_array_equal(p1["latent_mean"], want_mean)
    np.testing.assert_array_equal(p1["latent_std"], want_std)
    assert list(p1["caption"][:2]) == ["c1", "c3"] and list(p1["label"][:2]) == [1, 3]


def test_iterator_epochs_and_exact_resume(tmp_path):
    cache = lc.LatentCache(tmp_path, "k")
    cache.build(20, fake_read, fake_encode, chunk=6, progress=False)
    mesh = shd.make_mesh((2, 1, 1), jax.devices()[:2])
    tok = lambda texts: [[int(t[1:]), 0] for t in texts]  # noqa: E731
    it = lc.CachedIterator(cache.load(0), mesh, 4, seed=3, tokenizer=tok)
    labels = [np.asarray(next(it)["label"]) for _ in range(10)]  # two epochs of 5 batches
    first, second = np.concatenate(labels[:5]), np.concatenate(labels[5:])
    assert sorted(first) == sorted(second) == list(range(20)) and list(first) != list(second)
    state = None
    it2 = lc.CachedIterator(cache.load(0), mesh, 4, seed=3, tokenizer=tok)
    for i in range(7):
        b = next(it2)
        if i == 2:
            state = it2.get_state()
    np.testing.assert_array_equal(np.asarray(b["input_ids"])[:, 0], labels[6])  # ids tokenized from the captions
    it3 = lc.CachedIterator(cache.load(0), mesh, 4, seed=3, tokenizer=tok)
    it3.set_state(state)
    np.testing.assert_array_equal(np.asarray(next(it3)["label"]), labels[3])
    assert it3.get_state()["position"] == 4 and b["latent_mean"].sharding.spec[0] is not None
    with pytest.raises(ValueError, match="not one of a latent cache"):
        it3.set_state({"version": 1, "grain": {}})


@pytest.mark.parametrize("sample_posterior", [True, False])
def test_ldm_latents_from_cache_equal_the_encoder_draw(sample_posterior):
    """The step's z0 from a cached (mean, std) is the encoder's own posterior draw with the same key."""
    from flax import linen as nn
    from training_utils import tiny_config

    from ldm_jax.training import ldm
    from ldm_jax.training.latent_cache import _encoder

    config = tiny_config("test", **{"first_stage.sample_posterior": sample_posterior})
    obj = ldm.build(config)
    n, res = int(config.global_batch_size), int(config.image_size)
    fs = nn.unbox(obj.first_stage.init(jax.random.key(0), jnp.zeros((1, res, res, 3)), sample_posterior=False))["params"]
    key = jax.random.key(5)
    images = np.asarray(jax.random.uniform(key, (n, res, res, 3), minval=-1, maxval=1))
    mean, std = _encoder(obj, fs, 3)(images)  # in batches of 3: the cache build's path
    assert float(np.min(std)) > 0.1
    from_images = jax.jit(lambda x: obj.encode(fs, x, key))(images)
    from_cache = jax.jit(lambda m, s: obj.latents(fs, {"latent_mean": m, "latent_std": s}, key))(mean, std)
    np.testing.assert_allclose(np.asarray(from_cache), np.asarray(from_images), atol=2e-6)
    if sample_posterior:  # the draw is in there: the mean alone differs
        assert float(np.max(np.abs(np.asarray(from_images) - mean))) > 0.1
    else:
        np.testing.assert_array_equal(np.asarray(from_cache), mean)
