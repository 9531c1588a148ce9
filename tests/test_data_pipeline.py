"""make_dataset on shapes: batch layout and sharding, exact preprocessing, determinism, exact resume."""
import json

import jax
import numpy as np
import pytest

from ldm_jax.data import shapes as S
from ldm_jax.data.config import default_data_config, shapes_spec
import jax.numpy as jnp

from ldm_jax.data.pipeline import (Repeated, local_dataset, make_dataset, parse_repeat_captions, preprocess_image,
                                   repeat_factors, to_unit_range)
from ldm_jax.data.tokenizers import train_bpe_tokenizer
from ldm_jax.sharding import make_mesh

B = 16


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    c = default_data_config()
    c.data_dir = str(tmp_path_factory.mktemp("tfds"))
    c.shapes.num_train, c.shapes.num_test, c.shapes.num_heldout = 96, 32, 16
    return c


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((4, 2, 1))


@pytest.fixture(scope="module")
def tok(cfg):
    spec = shapes_spec(cfg)
    return train_bpe_tokenizer([e["caption"] for e in S.generate(spec, 0, "train", 0, 200)], 600)


def _np(batch):
    return {k: np.asarray(v) for k, v in batch.items()}


def _take(it, n):
    return [_np(next(it)) for _ in range(n)]


def test_batch_layout_and_exact_pixels(cfg, mesh, tok):
    it = make_dataset(cfg, mesh=mesh, global_batch_size=B, tokenizer=tok, split="test")
    batch = next(it)
    assert set(batch) == {"image", "input_ids", "label"}
    assert batch["image"].shape == (B, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["input_ids"].shape == (B, 77) and batch["input_ids"].dtype == np.int32
    assert batch["label"].shape == (B,) and batch["label"].dtype == np.int32
    for v in batch.values():
        assert v.sharding.spec[0] == ("data", "fsdp") and len(v.sharding.device_set) == 8
        assert v.addressable_shards[0].data.shape[0] == B // 8
    # evaluation split: read in order, no augmentation, so pixels are exactly the generator's
    b = _np(batch)
    spec = shapes_spec(cfg)
    truth = {e["caption"]: e for e in S.generate(spec, cfg.shapes.seed, "test", 0, cfg.shapes.num_test)}
    for img, ids, label in zip(b["image"], b["input_ids"], b["label"]):
        e = truth[tok.decode(ids)]
        np.testing.assert_allclose(img, e["image"].astype(np.float32) / 127.5 - 1, rtol=0, atol=1e-6)
        assert label == e["label"]
        np.testing.assert_array_equal(ids, tok([e["caption"]])[0])
    it.close()


def test_train_augmentation_and_epochs(cfg, mesh):
    # 96 examples = 6 batches per epoch: each epoch is a permutation, reshuffled the next epoch
    c = cfg.copy_and_resolve_references()
    c.flip = True
    it = make_dataset(c, mesh=mesh, global_batch_size=B, seed=1, num_epochs=2)
    batches = [_np(b) for b in it]
    assert len(batches) == 12
    spec = shapes_spec(cfg)
    imgs = [(np.asarray(jax.jit(to_unit_range)(jnp.asarray(e["image"]))), e["label"])
            for e in S.generate(spec, cfg.shapes.seed, "train", 0, cfg.shapes.num_train)]

    def which(img):  # index of the source image, flipped or not
        hits = [i for i, (x, _) in enumerate(imgs) if np.array_equal(x, img) or np.array_equal(x[:, ::-1], img)]
        assert hits, "batch image is neither a source image nor its mirror"
        return hits[0]

    flipped = 0
    epochs = []
    for e in range(2):
        ids = []
        for b in batches[6 * e: 6 * e + 6]:
            for img, label in zip(b["image"], b["label"]):
                i = which(img)
                assert imgs[i][1] == label
                flipped += not np.array_equal(imgs[i][0], img)
                ids.append(i)
        epochs.append(ids)
    # symmetric shapes map to themselves when mirrored, so compare multisets via label counts
    assert sorted(imgs[i][1] for i in epochs[0]) == sorted(x[1] for x in imgs)
    assert epochs[0] != epochs[1]
    assert 40 < flipped < 160  # about half of the 192 are mirrored (symmetric ones count as unflipped)


def test_deterministic_and_exact_resume(cfg, mesh, tok):
    a = make_dataset(cfg, mesh=mesh, global_batch_size=B, tokenizer=tok, seed=7)
    first = _take(a, 3)
    state = json.loads(json.dumps(a.get_state()))  # must survive a JSON round trip (checkpointed as JSON)
    rest = _take(a, 5)  # crosses the epoch boundary (6 batches per epoch)
    b = make_dataset(cfg, mesh=mesh, global_batch_size=B, tokenizer=tok, seed=7)
    b.set_state(state)
    resumed = _take(b, 5)
    for x, y in zip(rest, resumed):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    c = make_dataset(cfg, mesh=mesh, global_batch_size=B, tokenizer=tok, seed=7)
    for x, y in zip(first, _take(c, 3)):  # same seed, same stream
        np.testing.assert_array_equal(x["image"], y["image"])
    d = make_dataset(cfg, mesh=mesh, global_batch_size=B, tokenizer=tok, seed=8)
    assert not np.array_equal(first[0]["image"], _take(d, 1)[0]["image"])
    # restoring into the same iterator, after it ran ahead, also rewinds exactly
    a.set_state(state)
    np.testing.assert_array_equal(_take(a, 1)[0]["image"], rest[0]["image"])
    for it in (a, b, c, d):
        it.close()


def test_process_shards_are_disjoint_and_complete():
    source = list(range(40))
    full = list(local_dataset(source, seed=3, shuffle=True, num_epochs=2, process_index=0, process_count=1))
    parts = [list(local_dataset(source, seed=3, shuffle=True, num_epochs=2, process_index=p, process_count=4))
             for p in range(4)]
    assert sorted(full[:40]) == source and full[:40] != source and full[40:] != full[:40]
    assert [parts[i % 4][i // 4] for i in range(80)] == full  # interleaving the shares gives the stream


def test_bad_batch_and_split(cfg, mesh):
    from ldm_jax.data.builders import DataError

    with pytest.raises(ValueError, match="multiple of the data x fsdp"):
        make_dataset(cfg, mesh=mesh, global_batch_size=12)
    with pytest.raises(DataError, match="no split"):
        make_dataset(cfg, mesh=mesh, global_batch_size=8, split="validation")
    c = default_data_config()
    c.source = "nope"
    with pytest.raises(DataError, match="unknown data.source"):
        make_dataset(c, mesh=mesh, global_batch_size=8)


def test_preprocess_resize_crop_flip():
    rng = np.random.default_rng(0)
    # a 48x96 image whose columns encode x: after resizing the smaller side to 32 (-> 32x64),
    # a center crop keeps the middle half of the columns, a flip reverses them
    x = np.tile(np.linspace(0, 255, 96).astype(np.uint8)[None, :, None], (48, 1, 3))
    out = preprocess_image(x, 32, None, random_crop=False, flip=False)
    assert out.shape == (32, 32, 3) and -1 <= out.min() and out.max() <= 1
    col = (out[0, :, 0] + 1) * 127.5
    np.testing.assert_allclose(col, np.linspace(0, 255, 64)[16:48], atol=3)
    flips = [preprocess_image(x, 32, np.random.default_rng(s), random_crop=True, flip=True) for s in range(20)]
    dirs = {bool(np.diff(f[0, :, 0]).mean() < 0) for f in flips}
    assert dirs == {True, False}
    small = preprocess_image(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8), 32, None, random_crop=False,
                             flip=False)
    assert small.shape == (32, 32, 3)  # upscaled


def test_dropped_iterators_stop_their_threads(cfg, mesh):
    import gc
    import threading
    import time

    def alive():
        return sum(t.name == "ldm_jax-data" for t in threading.enumerate())

    before = alive()
    for _ in range(3):  # like an evaluation hook: read a few batches, drop the iterator
        it = make_dataset(cfg, mesh=mesh, global_batch_size=B, split="test")
        next(it)
    assert alive() >= before + 1
    del it
    gc.collect()
    deadline = time.time() + 5
    while alive() > before and time.time() < deadline:
        time.sleep(0.05)
    assert alive() == before


def test_nested_and_multiple_captions(cfg):
    from ldm_jax.data.pipeline import _Preprocess

    png = S.encoded_examples(shapes_spec(cfg), 0, "train", 0, 1)[0]["image"]
    ex = {"image": png, "captions": {"text": np.asarray([b"one", b"two", b"three"], dtype=object)}}
    c = default_data_config()
    c.update(caption_key="captions/text", label_key="")

    def tok(texts):  # the caption's length, so the test can see which one was picked
        return np.full((len(texts), 77), len(texts[0]), np.int32)

    train = _Preprocess(c, tok, True, {"image": None, "captions": None})
    picked = {int(train.random_map(ex, np.random.default_rng(i))["input_ids"][0]) for i in range(30)}
    assert picked == {3, 5}  # one/two (3 letters) and three (5): every caption gets used
    c.crop, c.flip = "center", False
    evaluation = _Preprocess(c, tok, False, {"image": None, "captions": None})
    assert {int(evaluation.random_map(ex, np.random.default_rng(i))["input_ids"][0]) for i in range(5)} == {3}


def test_same_batches_on_any_mesh(cfg, tok):
    """Sharded over (data, fsdp), replicated over tensor, or on one device: the same values."""
    single = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    want = _take(make_dataset(cfg, mesh=single, global_batch_size=B, tokenizer=tok, seed=2), 2)
    for shape in ((2, 2, 2), (1, 1, 8)):
        it = make_dataset(cfg, mesh=make_mesh(shape), global_batch_size=B, tokenizer=tok, seed=2)
        for w, got in zip(want, [next(it) for _ in range(2)]):
            assert got["image"].sharding.mesh.shape == dict(zip(("data", "fsdp", "tensor"), shape))
            for k in w:
                np.testing.assert_array_equal(np.asarray(got[k]), w[k])
        it.close()


def test_repeat_captions_reads_matching_examples_that_many_times_per_epoch(cfg, mesh):
    assert parse_repeat_captions(" small circle:4, square:2 ") == [(frozenset({"small", "circle"}), 4),
                                                                   (frozenset({"square"}), 2)]
    for bad in ("small circle", "circle:0", ":3", "circle:x"):
        with pytest.raises(ValueError, match="repeat_captions item"):
            parse_repeat_captions(bad)
    source = [{"caption": c} for c in ("a small red circle at the top", "a large red circle at the top",
                                       "a small blue square", "a small green triangle")]
    factors = repeat_factors(source, "caption", parse_repeat_captions("small circle:4,square:2,small:3"))
    np.testing.assert_array_equal(factors, [4, 1, 3, 3])  # the largest factor among the patterns matched
    rep = Repeated(source, factors)
    assert len(rep) == 11 and [rep[i]["caption"] for i in range(4)] == [source[0]["caption"]] * 4
    assert [e["caption"] for e in rep.__getitems__([3, 4, 10])] == [source[0]["caption"], source[1]["caption"],
                                                                     source[3]["caption"]]
    from ldm_jax.data.builders import DataError

    with pytest.raises(DataError, match="needs captions"):
        repeat_factors([{"image": b""}], "caption", parse_repeat_captions("circle:2"))

    # through make_dataset: one epoch holds every "small circle" example 3 times, the others once
    c = cfg.copy_and_resolve_references()
    c.repeat_captions = "small circle:3"
    c.caption_key = ""  # an autoencoder's data: no captions in the batch, the weights still read them
    c.num_epochs = 1
    spec = shapes_spec(c)
    captions = [e["caption"] for e in S.generate(spec, c.shapes.seed, "train", 0, c.shapes.num_train)]
    small_circles = sum("small" in t.split() and "circle" in t.split() for t in captions)
    assert 0 < small_circles < len(captions)
    it = make_dataset(c, mesh=mesh, global_batch_size=8, seed=1)
    assert it.meta["num_examples_repeated"] == len(captions) + 2 * small_circles
    seen = [np.round((img + 1) * 127.5).astype(np.uint8).tobytes() for b in it for img in np.asarray(b["image"])]
    it.close()
    total = len(captions) + 2 * small_circles
    assert len(seen) == total // 8 * 8
    want = {}
    for i, text in enumerate(captions):
        key = S.render(S.sample_attributes(spec, c.shapes.seed, "train", i), spec.resolution).tobytes()
        want[key] = want.get(key, 0) + (3 if "small" in text.split() and "circle" in text.split() else 1)
    got = {}
    for key in seen:
        got[key] = got.get(key, 0) + 1
    assert set(got) <= set(want) and all(got[k] <= want[k] for k in got)
    assert sum(want.values()) - sum(got.values()) == total % 8  # only the last partial batch is dropped
    c.buckets = True
    with pytest.raises(ValueError, match="repeat_captions does not work with data.buckets"):
        make_dataset(c, mesh=mesh, global_batch_size=8)
