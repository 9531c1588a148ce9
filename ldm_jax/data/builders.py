"""tfds builders: the generated `shapes` dataset and a local image folder with captions.

Both write array_record files (what `tfds.data_source` reads by random access) under the data
directory, once; later runs find them there. TensorFlow is needed only while writing, and is kept
off accelerators (see `hide_accelerators_from_tf`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from ldm_jax.data import shapes as shapes_lib

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FILE_FORMAT = "array_record"


def hide_accelerators_from_tf() -> None:
    """Keep TensorFlow (used by tfds to write datasets) off GPUs/TPUs so JAX keeps all their memory."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # already initialised, or no such device type: nothing to hide
        pass


class DataError(ValueError):
    """Bad user data (folder layout, captions, dataset name); the message says what to fix."""


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of our builders: tfds' default `code_path` needs the undeclared `importlib_resources`
    package for classes outside tensorflow_datasets; the file that defines the class is all it needs."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # noqa: D102
        from etils import epath

        return epath.Path(inspect.getfile(cls))


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """A shapes dataset: what to draw, how many of each split, and the seed."""

    spec: shapes_lib.ShapesSpec = dataclasses.field(default_factory=shapes_lib.ShapesSpec)
    seed: int = 0
    num_train: int = 10000
    num_test: int = 1000
    num_heldout: int = 1000


def shapes_config(spec: shapes_lib.ShapesSpec, seed: int, num_train: int, num_test: int,
                  num_heldout: int) -> ShapesConfig:
    """A builder config whose name identifies its contents (one cache directory per variant)."""
    key = repr((dataclasses.astuple(spec), seed, num_train, num_test, num_heldout))
    name = f"r{spec.resolution}_n{num_train}_s{seed}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    return ShapesConfig(name=name, description=f"shapes at {spec.resolution} px", spec=spec, seed=seed,
                        num_train=num_train, num_test=num_test, num_heldout=num_heldout)


class Shapes(_LocalBuilder):
    """Colored geometric shapes with captions, generated from a seed (no download)."""

    VERSION = tfds.core.Version("1.1.0")
    BUILDER_CONFIGS = [shapes_config(shapes_lib.ShapesSpec(), 0, 10000, 1000, 1000)]

    def _info(self) -> tfds.core.DatasetInfo:
        spec: shapes_lib.ShapesSpec = self.builder_config.spec
        r = spec.resolution
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
                "caption": tfds.features.Text(),
                # color * len(shapes) + shape; the other attributes are in the caption (shapes.parse_caption).
                # Few features keep both writing and reading fast (tfds pays per feature and example).
                "label": tfds.features.ClassLabel(names=[f"{c} {s}" for c, s in spec.classes]),
            }),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        cfg: ShapesConfig = self.builder_config
        sizes = {"train": cfg.num_train, "test": cfg.num_test, "heldout": cfg.num_heldout}
        return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

    def _generate_examples(self, split: str, num: int):
        cfg: ShapesConfig = self.builder_config
        # In this process on purpose: a spawned helper would re-run unguarded user scripts.
        for start in range(0, num, 500):
            for i, ex in enumerate(shapes_lib.encoded_examples(cfg.spec, cfg.seed, split, start, min(start + 500, num))):
                yield start + i, ex


def prepare_shapes(data_dir: str | os.PathLike, spec: shapes_lib.ShapesSpec, *, seed: int = 0,
                   num_train: int = 10000, num_test: int = 1000, num_heldout: int = 1000) -> Shapes:
    """The prepared shapes builder, generating its files under data_dir on first use."""
    builder = Shapes(config=shapes_config(spec, seed, num_train, num_test, num_heldout),
                     data_dir=os.fspath(Path(data_dir).expanduser()), file_format=FILE_FORMAT)
    _prepare(builder)
    return builder


def _prepare(builder: tfds.core.DatasetBuilder) -> None:
    if builder.is_prepared():
        log.info("using prepared dataset %s", builder.data_dir)
        return
    hide_accelerators_from_tf()
    log.info("preparing dataset %s", builder.data_dir)
    builder.download_and_prepare(file_format=FILE_FORMAT,
                                 download_config=tfds.download.DownloadConfig(try_download_gcs=False))


# ---------------------------------------------------------------------------------------------
# image folder
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
    """A folder of images; captions from `<image>.txt` beside each image or a metadata.jsonl."""

    path: str = ""
    require_captions: bool = True


def find_images(root: Path) -> list[Path]:
    """Image files under root, sorted (a stable order makes the prepared dataset reproducible)."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def read_captions(root: Path, images: list[Path]) -> dict[Path, str]:
    """Captions by image path, from metadata.jsonl files (file_name, text) or <stem>.txt files."""
    captions: dict[Path, str] = {}
    for meta in sorted(root.rglob("metadata.jsonl")):
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[(meta.parent / row["file_name"]).resolve()] = str(row.get("text", row.get("caption")))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{meta}:{n}: expected a JSON object with 'file_name' and 'text' ({e})") from None
    for image in images:
        txt = image.with_suffix(".txt")
        if image.resolve() not in captions and txt.is_file():
            captions[image.resolve()] = txt.read_text(encoding="utf-8").strip()
    return {image: captions[image.resolve()] for image in images if image.resolve() in captions}


def _load_image(path: Path) -> bytes:
    """The file's bytes if it is a JPEG/PNG in RGB, else re-encoded as PNG; raises on unreadable files."""
    from PIL import Image

    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # decodes every pixel: truncated or corrupt files fail here, not during training
        if im.format in ("JPEG", "PNG") and im.mode == "RGB":
            return data
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
        return buf.getvalue()


class ImageFolder(_LocalBuilder):
    """A local folder of captioned images, prepared once into array_record files."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [FolderConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "caption": tfds.features.Text(),
                "file_name": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        root = Path(self.builder_config.path)
        images = find_images(root)
        if not images:
            raise DataError(f"no images in {root} (looked for {', '.join(IMAGE_EXTENSIONS)} files, recursively)")
        captions = read_captions(root, images)
        missing = [str(p.relative_to(root)) for p in images if p not in captions]
        if missing and self.builder_config.require_captions:
            raise DataError(
                f"{len(missing)} of {len(images)} images in {root} have no caption, e.g. {missing[:5]}; "
                "put the caption in <image name>.txt beside each image or in a metadata.jsonl with "
                "'file_name' and 'text' per line (or set caption_key=None to train without captions)")
        return {"train": self._generate_examples(root, images, captions)}

    def _generate_examples(self, root: Path, images: list[Path], captions: dict[Path, str]):
        skipped = []
        for path in images:
            try:
                data = _load_image(path)
            except Exception as e:  # noqa: BLE001 - any decoder error means "skip this file"
                skipped.append(str(path.relative_to(root)))
                log.warning("skipping unreadable image %s: %s", path, e)
                continue
            name = str(path.relative_to(root))
            yield name, {"image": data, "caption": captions.get(path, ""), "file_name": name}
        if skipped:
            log.warning("skipped %d unreadable image(s) of %d in %s: %s", len(skipped), len(images), root,
                        ", ".join(skipped[:20]) + (" ..." if len(skipped) > 20 else ""))
        if len(skipped) == len(images):
            raise DataError(f"none of the {len(images)} images in {root} could be decoded")


def prepare_folder(data_dir: str | os.PathLike, path: str | os.PathLike, *,
                   require_captions: bool = True) -> ImageFolder:
    """The image-folder builder for `path`, prepared under data_dir/image_folder/<name> on first use.

    The cache key is the folder's absolute path; delete that directory to pick up changed files.
    """
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    digest = hashlib.sha1(f"{root}|{require_captions}".encode()).hexdigest()[:10]
    stem = "".join(c if c.isalnum() else "_" for c in root.name)[:40] or "root"
    config = FolderConfig(name=f"{stem}_{digest}", description=str(root), path=str(root),
                          require_captions=require_captions)
    builder = ImageFolder(config=config, data_dir=os.fspath(Path(data_dir).expanduser()), file_format=FILE_FORMAT)
    _prepare(builder)
    return builder


# ---------------------------------------------------------------------------------------------
# any registered tfds dataset
# ---------------------------------------------------------------------------------------------

def prepare_tfds(name: str, data_dir: str | os.PathLike | None) -> tfds.core.DatasetBuilder:
    """A registered tfds dataset by name ("cifar10", "lsun/church_outdoor"), prepared as array_record."""
    data_dir = os.fspath(Path(data_dir).expanduser()) if data_dir else None
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format=FILE_FORMAT)
    except tfds.core.registered.DatasetNotFoundError as e:
        first = str(e).strip().splitlines()[0]
        raise DataError(f"unknown tfds dataset {name!r} ({first}); for a local folder of images use "
                        "source='folder' and path=..., for the built-in dataset source='shapes'") from None
    if builder.is_prepared() and builder.info.file_format != tfds.core.file_adapters.FileFormat.ARRAY_RECORD:
        raise DataError(f"tfds dataset {name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}; "
                        "random access needs array_record: re-prepare it with "
                        f"tfds.builder({name!r}, file_format='array_record').download_and_prepare()")
    try:
        _prepare(builder)
    except ModuleNotFoundError as e:
        raise DataError(f"preparing tfds dataset {name!r} needs the Python package {e.name!r}, which "
                        f"tensorflow-datasets imports without declaring it: pip install {e.name}") from e
    except Exception as e:  # noqa: BLE001 - downloads fail in many ways; say which dataset and where
        raise DataError(f"tfds dataset {name!r} is not prepared in {builder.data_dir} and preparing it failed "
                        f"({type(e).__name__}: {str(e)[:300]}). Datasets that need a download or a manual "
                        "download must be prepared on a machine that has them.") from e
    return builder
