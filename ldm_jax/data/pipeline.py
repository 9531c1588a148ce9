"""Input pipeline: a tfds data source read by grain into global batches sharded over (data, fsdp).

    tfds.data_source (array_record, random access)
      -> grain MapDataset: shuffle (new order each epoch) -> repeat -> this process's slice
      -> decode + LDM preprocessing (resize smaller side, crop, flip) + tokenize, in threads
      -> batch (per-process share, uint8) -> jax.make_array_from_process_local_data -> [-1, 1] on
         device, a few batches ahead in a background thread.

Every random choice is a function of (seed, element index), so the stream is fixed by the seed, and
the iterator state (grain's next index) restores it exactly.
"""
from __future__ import annotations

import io
import logging
import queue
import threading
import weakref
from typing import Any, Callable

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from ldm_jax.data import buckets, builders
from ldm_jax.data.config import shapes_spec
from ldm_jax.sharding import batch_sharding

log = logging.getLogger(__name__)
STATE_VERSION = 1


def load_builder(data_config: ml_collections.ConfigDict):
    """The prepared tfds builder for the configured source (prepares it on first use).

    With several processes, process 0 prepares first while the others wait; they then find its files
    (shared data_dir) or prepare their own copy (per-host disks), never racing on one directory.
    """
    if jax.process_count() == 1:
        return _load_builder(data_config)
    from jax.experimental import multihost_utils

    if jax.process_index() != 0:
        multihost_utils.sync_global_devices("ldm_jax.data: process 0 prepared the dataset")
    builder = _load_builder(data_config)
    if jax.process_index() == 0:
        multihost_utils.sync_global_devices("ldm_jax.data: process 0 prepared the dataset")
    return builder


def _load_builder(data_config: ml_collections.ConfigDict):
    c = data_config
    if c.source == "shapes":
        s = c.shapes
        return builders.prepare_shapes(c.data_dir, shapes_spec(c), seed=s.seed, num_train=s.num_train,
                                       num_test=s.num_test, num_heldout=s.num_heldout)
    if c.source == "folder":
        if not c.path:
            raise builders.DataError("data.source='folder' needs data.path, the folder of images")
        return builders.prepare_folder(c.data_dir, c.path, require_captions=bool(c.caption_key))
    if c.source == "tfds":
        if not c.name:
            raise builders.DataError("data.source='tfds' needs data.name, e.g. 'cifar10' or 'lsun/church_outdoor'")
        return builders.prepare_tfds(c.name, c.data_dir)
    raise builders.DataError(f"unknown data.source {c.source!r}; use 'shapes', 'folder' or 'tfds'")


def data_source(data_config: ml_collections.ConfigDict, split: str = "train", *, decode_images: bool = False):
    """Random-access source of raw examples; images stay encoded bytes unless decode_images."""
    import tensorflow_datasets as tfds

    builder = load_builder(data_config)
    features = builder.info.features
    if data_config.image_key not in features:
        raise builders.DataError(f"dataset {builder.name} has no feature {data_config.image_key!r}; it has "
                                 f"{list(features)} (set data.image_key)")
    tfds_split = data_config.train_split if split == "train" else split
    decoders = None if decode_images else {data_config.image_key: tfds.decode.SkipDecoding()}
    try:
        return builder.as_data_source(tfds_split, decoders=decoders)
    except (ValueError, KeyError) as e:
        raise builders.DataError(f"dataset {builder.name} has no split {tfds_split!r} "
                                 f"(splits: {list(builder.info.splits)}): {e}") from None


def dataset_captions(data_config: ml_collections.ConfigDict, split: str = "train") -> list[str]:
    """Every caption of a split (for training a tokenizer); images are not decoded."""
    if not data_config.caption_key:
        raise builders.DataError("the data config has no caption_key: there are no captions to read")
    source = data_source(data_config, split)
    return [_caption(source[i], data_config.caption_key, None) for i in range(len(source))]


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _caption(ex: dict, key: str, rng: np.random.Generator | None) -> str:
    """The caption at `key` ("captions/text" walks nested features); one at random when there are
    several (COCO has five per image), the first when there is no rng (evaluation)."""
    value: Any = ex
    for part in key.split("/"):
        value = value[part]
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) == 0:
            return ""
        value = value[int(rng.integers(len(value)))] if rng is not None else value[0]
    return _text(value)


def decode_image(data: bytes | np.ndarray, min_side: int = 0) -> np.ndarray:
    """uint8 (H, W, 3) RGB from encoded bytes; big JPEGs are decoded at a reduced scale >= min_side."""
    if isinstance(data, np.ndarray):
        image = data
    else:
        from PIL import Image, UnidentifiedImageError

        try:  # our builders store only PNG/JPEG: probing just those two saves a third of a small decode
            im = Image.open(io.BytesIO(data), formats=("PNG", "JPEG"))
        except UnidentifiedImageError:
            im = Image.open(io.BytesIO(data))
        with im:
            if im.format == "JPEG" and min_side:
                w, h = im.size
                scale = min_side / min(w, h)
                im.draft("RGB", (int(w * scale + 1), int(h * scale + 1)))  # DCT scaling: 2-8x faster decode
            im.load()
            image = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image[:, :, :3]


def crop_and_flip(image: np.ndarray, resolution: int, rng: np.random.Generator | None, *,
                  random_crop: bool, flip: bool) -> np.ndarray:
    """LDM preprocessing on uint8: resize the smaller side to `resolution`, crop a square, maybe flip."""
    return buckets.resize_and_crop(image, (resolution, resolution), rng, random_crop=random_crop, flip=flip)[0]


def to_unit_range(image: Any) -> Any:
    """uint8 [0, 255] -> float32 [-1, 1] (numpy or jax)."""
    return image.astype(np.float32) * (1 / 127.5) - 1.0


_normalize = jax.jit(to_unit_range)  # on device; keeps the input's (data, fsdp) sharding; one compile cache


def preprocess_image(image: np.ndarray, resolution: int, rng: np.random.Generator | None, *,
                     random_crop: bool, flip: bool) -> np.ndarray:
    """LDM preprocessing: resize the smaller side to `resolution`, crop a square, flip, scale to [-1, 1]."""
    return to_unit_range(crop_and_flip(image, resolution, rng, random_crop=random_crop, flip=flip))


class _Preprocess(grain.transforms.RandomMap):
    """Decode, crop, flip, tokenize one example; None (dropped by grain) for a too-small image in skip mode."""

    def __init__(self, c: ml_collections.ConfigDict, tokenizer: Callable | None, train: bool,
                 features: Any = None):
        # plain attributes: ConfigDict lookups cost more than decoding a 32-px PNG
        self.image_key, self.caption_key, self.label_key = c.image_key, c.caption_key, c.label_key
        for field in ("caption_key", "label_key"):
            key = getattr(self, field)
            if key and features is not None and key.split("/")[0] not in features:
                log.warning("the dataset has no %r feature (data.%s); its batches will have no %s. Features: %s",
                            key, field, "input_ids" if field == "caption_key" else "label", list(features))
                setattr(self, field, "")
        self.resolution, self.skip_small = c.resolution, c.small_images == "skip"
        self.train, self.random_crop, self.flip = train, train and c.crop == "random", train and c.flip
        self.tokenizer = tokenizer if self.caption_key else None
        self.record_sizes = bool(c.get("record_sizes", False) or c.get("buckets", False))
        self.skipped = self.upscaled = 0
        self._lock = threading.Lock()

    def random_map(self, ex: dict, rng: np.random.Generator) -> dict | None:
        image = decode_image(ex[self.image_key], self.resolution)
        if not self.skip_small and min(image.shape[:2]) < self.resolution:
            with self._lock:
                self.upscaled += 1
                if self.upscaled <= 3:
                    log.warning("upscaling image %s of size %s to resolution %d (data.small_images='upscale'; "
                                "'skip' drops such images)", _text(ex.get("file_name", b"?")), image.shape[:2],
                                self.resolution)
        elif self.skip_small and min(image.shape[:2]) < self.resolution:
            with self._lock:
                self.skipped += 1
                if self.skipped <= 20 or self.skipped % 1000 == 0:
                    name = _text(ex.get("file_name", b"?"))
                    log.warning("skipping image %s of size %s smaller than resolution %d (%d skipped so far)",
                                name, image.shape[:2], self.resolution, self.skipped)
            return None
        return self.example(ex, (self.resolution, self.resolution), rng, decoded=image)

    def example(self, ex: dict, size: tuple[int, int], rng: np.random.Generator | None,
                decoded: np.ndarray | None = None) -> dict:
        """One example cropped to `size` (h, w): image (uint8 until it reaches the device: 4x less to stack and
        copy; `DataIterator` scales it there), input_ids, label, and with data.record_sizes SDXL's
        micro-conditioning (original_size, crop_top_left, target_size; see data/buckets.py)."""
        image = decode_image(ex[self.image_key], min(size)) if decoded is None else decoded
        crop, top_left = buckets.resize_and_crop(image, size, rng, random_crop=self.random_crop, flip=self.flip)
        out = {"image": crop}
        if self.record_sizes:
            # the size on disk (a JPEG may have been decoded at a reduced scale above)
            out["original_size"] = np.asarray(buckets.image_size(ex[self.image_key]), np.int32)
            out["crop_top_left"] = np.asarray(top_left, np.int32)
            out["target_size"] = np.asarray(size, np.int32)
        if self.tokenizer is not None:
            text = _caption(ex, self.caption_key, rng if self.train else None)
            out["input_ids"] = np.asarray(self.tokenizer([text])[0], np.int32)
        if self.label_key:
            out["label"] = np.int32(ex[self.label_key])
        return out


class DataIterator:
    """Iterator of global batches with an exact, JSON-serializable position (`get_state`/`set_state`)."""

    def __init__(self, grain_dataset: Any, mesh: Mesh, global_batch_size: int, prefetch: int, meta: dict):
        self._dataset, self._mesh, self.global_batch_size = grain_dataset, mesh, global_batch_size
        self._prefetch = max(1, prefetch)
        self.meta = meta
        self._iter = iter(grain_dataset)
        self._state = self._iter.get_state()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue(self._prefetch)
        self._stop = threading.Event()
        self._normalize = _normalize
        self.preprocess: _Preprocess | None = None
        # The producer thread holds no reference to `self`, so an iterator that is simply dropped
        # (an evaluation that reads a few batches) is collected, and this stops its thread.
        self._control = {"stop": self._stop}
        weakref.finalize(self, lambda control: control["stop"].set(), self._control)

    @property
    def num_skipped(self) -> int:
        """Examples dropped so far because their image was smaller than the resolution (small_images='skip')."""
        return self.preprocess.skipped if self.preprocess is not None else 0

    # -- producer ------------------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None:
            self._stop = self._control["stop"] = threading.Event()
            args = (self._iter, self._mesh, self._normalize, self._queue, self._stop)
            self._thread = threading.Thread(target=_produce, args=args, name="ldm_jax-data", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stops the prefetch thread; batches already prefetched are dropped (the state is unaffected)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._queue = queue.Queue(self._prefetch)

    # -- consumer ------------------------------------------------------------------------------
    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> dict[str, jax.Array]:
        self._start()
        item = self._queue.get()
        if item is StopIteration:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self._state = item
        return batch

    def get_state(self) -> dict:
        """Position after the last batch returned (JSON-serializable)."""
        return {"version": STATE_VERSION, "grain": self._state, **self.meta}

    def set_state(self, state: dict) -> None:
        """Continue right after the batch at which `state` was taken."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')} != {STATE_VERSION}")
        grain_state = dict(state["grain"])
        saved_procs, procs = int(state.get("num_processes", 1)), self.meta["num_processes"]
        if saved_procs != procs and "next_index" in grain_state:
            # Each process reads every procs-th element of one global stream, so the position in that
            # stream carries over to another process count: same examples, rows in another order.
            consumed = int(grain_state["next_index"]) * saved_procs
            if consumed % procs:
                log.warning("restoring a data position of %d examples onto %d processes: rounding down to a "
                            "multiple of %d", consumed, procs, procs)
            grain_state["next_index"] = consumed // procs
            log.info("data iterator saved on %d process(es) restored on %d", saved_procs, procs)
        topology = ("num_processes", "global_batch_size")
        changed = {k: (state.get(k), v) for k, v in self.meta.items() if state.get(k) != v and k not in topology}
        if changed:
            log.warning("data iterator restored across a changed pipeline %s (saved, now): the stream will "
                        "not match the original run exactly", changed)
        self.close()
        self._iter.set_state(grain_state)
        self._state = self._iter.get_state()


def _produce(it: Any, mesh: Mesh, normalize: Callable, out: queue.Queue, stop: threading.Event) -> None:
    """Prefetch thread: local batches -> global arrays (image scaled on device), each with the state after it."""
    while not stop.is_set():
        try:
            local = next(it)
            batch = {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
                     for k, v in local.items()}
            batch["image"] = normalize(batch["image"])
            item: Any = (batch, it.get_state())
        except StopIteration:
            item = StopIteration
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            item = e
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        if not isinstance(item, tuple):
            return


def make_dataset(data_config: ml_collections.ConfigDict, *, mesh: Mesh, global_batch_size: int,
                 tokenizer: Callable | None = None, seed: int = 0, split: str = "train",
                 num_epochs: int | None = None) -> DataIterator:
    """Global batches {"image" (B,H,W,3) float32 in [-1,1], "input_ids" (B,77), "label" (B,)} sharded over (data, fsdp).

    The training split is shuffled and augmented per the config; other splits are read in order,
    center-cropped, not flipped. `num_epochs` (default: data.num_epochs for train, 0 otherwise)
    of 0 repeats forever. Captions are tokenized only when a tokenizer is given.
    """
    c = data_config
    train = split == "train"
    shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
    nproc = jax.process_count()
    if global_batch_size <= 0 or global_batch_size % shards or global_batch_size % nproc:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of the "
                         f"data x fsdp mesh size {shards} and of the process count {nproc}")
    if c.crop not in ("random", "center") or c.small_images not in ("upscale", "skip"):
        raise ValueError(f"data.crop must be 'random'|'center' (got {c.crop!r}), "
                         f"data.small_images 'upscale'|'skip' (got {c.small_images!r})")
    source = data_source(c, split)
    if len(source) < global_batch_size:
        raise builders.DataError(f"split {split!r} has {len(source)} examples, fewer than one global batch "
                                 f"({global_batch_size})")
    epochs = (c.num_epochs if train else 0) if num_epochs is None else num_epochs
    preprocess = _Preprocess(c, tokenizer, train, source.dataset_info.features)
    meta = {"seed": seed, "split": split, "global_batch_size": global_batch_size, "num_processes": nproc,
            "num_examples": len(source)}
    if c.get("buckets", False) and c.get("repeat_captions", ""):
        raise ValueError("data.repeat_captions does not work with data.buckets yet: turn one of them off")
    if c.get("buckets", False):
        ds, meta["buckets"] = _bucketed(c, source, preprocess, seed=seed, global_batch_size=global_batch_size,
                                        shuffle=train and c.shuffle, num_epochs=epochs)
        it = DataIterator(ds, mesh, global_batch_size, c.prefetch, meta)
        it.preprocess = preprocess
        return it
    repeats = parse_repeat_captions(c.get("repeat_captions", "")) if train else []
    if repeats:
        key = c.get("repeat_caption_key", "") or c.caption_key or "caption"
        source = Repeated(source, repeat_factors(source, key, repeats))
        meta["num_examples_repeated"] = len(source)
    ds = local_dataset(source, seed=seed, shuffle=train and c.shuffle, num_epochs=epochs,
                       process_index=jax.process_index(), process_count=nproc)
    ds = ds.random_map(preprocess, seed=seed)
    read = grain.ReadOptions(num_threads=max(1, c.num_threads), prefetch_buffer_size=max(1, c.read_buffer))
    ds = ds.to_iter_dataset(read).batch(global_batch_size // nproc, drop_remainder=True)
    it = DataIterator(ds, mesh, global_batch_size, c.prefetch, meta)
    it.preprocess = preprocess
    return it


def parse_repeat_captions(text: str) -> list[tuple[frozenset[str], int]]:
    """"small circle:4,small square:4" -> [({"small", "circle"}, 4), ({"small", "square"}, 4)]."""
    out = []
    for item in filter(None, (part.strip() for part in str(text or "").split(","))):
        words, sep, factor = item.rpartition(":")
        try:
            k = int(factor)
        except ValueError:
            k = 0
        if not sep or not words.split() or k < 1:
            raise ValueError(f"data.repeat_captions item {item!r} must be 'word [word ...]:N' with a whole N >= 1")
        out.append((frozenset(words.lower().split()), k))
    return out


def repeat_factors(source: Any, key: str, repeats: list[tuple[frozenset[str], int]]) -> np.ndarray:
    """How many times each example of `source` is read per epoch: the largest factor whose words its caption holds."""
    factors = np.ones(len(source), np.int64)
    for i in range(len(source)):
        ex = source[i]
        try:
            words = set(_caption(ex, key, None).lower().replace(",", " ").replace(".", " ").split())
        except (KeyError, TypeError) as e:
            raise builders.DataError(f"data.repeat_captions needs captions, but example {i} has no {key!r} "
                                     f"(set data.repeat_caption_key)") from e
        factors[i] = max([k for need, k in repeats if need <= words], default=1)
    if (factors == 1).all():
        log.warning("data.repeat_captions %s matched no caption: every example is read once",
                    [" ".join(sorted(w)) + f":{k}" for w, k in repeats])
    return factors


class Repeated:
    """`source` with example i appearing `factors[i]` times (a random-access source for grain)."""

    def __init__(self, source: Any, factors: np.ndarray):
        self.source = source
        self.index = np.repeat(np.arange(len(source)), np.asarray(factors, np.int64))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Any:
        return self.source[int(self.index[i])]

    def __getitems__(self, indices: Any) -> list[Any]:  # grain's batched read (ArrayRecord reads many at once)
        picked = [int(self.index[i]) for i in indices]
        if hasattr(self.source, "__getitems__"):
            return list(self.source.__getitems__(picked))
        return [self.source[i] for i in picked]


def local_dataset(source: Any, *, seed: int, shuffle: bool, num_epochs: int, process_index: int,
                  process_count: int) -> grain.MapDataset:
    """This process's share of the example stream: shuffled anew each epoch, then every
    `process_count`-th element, so processes read disjoint examples that together make the stream."""
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs or None)
    return ds[process_index::process_count]


def _bucketed(c: ml_collections.ConfigDict, source: Any, preprocess: "_Preprocess", *, seed: int,
              global_batch_size: int, shuffle: bool, num_epochs: int) -> tuple[Any, str]:
    """grain dataset of this process's share of aspect-bucketed global batches (data/buckets.py)."""
    sizes = buckets.make_buckets(c.resolution, int(c.get("bucket_step", 64)), float(c.get("bucket_max_aspect", 2.0)))
    dims = [buckets.image_size(source[i][c.image_key]) for i in range(len(source))]
    assignment = np.asarray([buckets.nearest_bucket(sizes, h, w) for h, w in dims])
    if c.small_images == "skip":  # images that would have to be enlarged to cover their bucket
        small = [max(sizes[b][0] / h, sizes[b][1] / w) > 1 for (h, w), b in zip(dims, assignment)]
        assignment[np.asarray(small, bool)] = -1
        if any(small):
            log.warning("skipping %d image(s) smaller than their aspect bucket (data.small_images='skip')", sum(small))
    plan = buckets.BucketPlan(assignment, len(sizes), global_batch_size, seed, shuffle)
    if plan.per_epoch == 0:
        raise builders.DataError(f"no aspect bucket holds a whole global batch of {global_batch_size} images "
                                 f"(images per bucket: {[len(m) for m in plan.members]}); lower the batch size "
                                 "or turn data.buckets off")
    unused = [sizes[b] for b, n in enumerate(plan.batches_per_bucket) if n == 0 and len(plan.members[b])]
    if unused:
        log.warning("aspect buckets %s hold fewer images than one global batch and are never trained on", unused)
    log.info("aspect buckets (h, w): %s", {sizes[b]: len(m) for b, m in enumerate(plan.members) if len(m)})
    total = plan.per_epoch * num_epochs if num_epochs else 1 << 40
    loader = buckets.BucketBatchLoader(source, plan, sizes, preprocess.example, jax.process_index(),
                                       jax.process_count(), seed)
    read = grain.ReadOptions(num_threads=max(1, c.num_threads), prefetch_buffer_size=max(1, c.prefetch))
    ds = grain.MapDataset.range(total).map(loader).to_iter_dataset(read)
    return ds, ",".join(f"{h}x{w}" for h, w in sizes)
