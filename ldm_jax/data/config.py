"""The `data` block of a training config."""
from __future__ import annotations

import ml_collections

from ldm_jax.data.shapes import ShapesSpec


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults: the built-in shapes dataset at 32 px, random crop, no flip, captions and labels kept.

    Lists are comma-separated strings so that they can be set from the command line
    (`--config.data.shapes.colors=red,green,blue`).
    """
    c = ml_collections.ConfigDict()
    c.source = "shapes"  # "shapes" | "folder" | "tfds"
    c.name = ""  # tfds dataset name for source="tfds", e.g. "cifar10", "lsun/church_outdoor"
    c.path = ""  # image folder for source="folder" (captions in <image>.txt or metadata.jsonl)
    c.data_dir = "~/tensorflow_datasets"  # where prepared datasets live (one subdirectory per variant)
    c.train_split = "train"  # tfds split string used when make_dataset(split="train")
    c.image_key = "image"
    c.caption_key = "caption"  # "" = no captions (unconditional, or class-conditional via label_key)
    c.label_key = "label"  # "" = no labels
    c.resolution = 32
    c.crop = "random"  # "random" | "center" (evaluation splits always use center)
    # Random horizontal flip (training split only). Off by default: it contradicts captions that say
    # "left"/"right" (as shapes' do); turn it on for unconditional or class-conditional data.
    c.flip = False
    # Aspect-ratio buckets (data/buckets.py): equal-area buckets of about resolution² in bucket_step-px steps, each
    # batch from one bucket; each example then records original_size / crop_top_left / target_size (SDXL).
    c.buckets = False
    c.bucket_step = 64
    c.bucket_max_aspect = 2.0
    c.record_sizes = False  # record original_size / crop_top_left / target_size also without buckets
    c.small_images = "upscale"  # images whose smaller side is below `resolution`: "upscale" | "skip"
    c.shuffle = True
    # Repeat-factor sampling of the training split (LVIS's, by caption): "small circle:4" reads each example whose
    # caption holds all of the words "small" and "circle" 4 times per epoch (the largest factor of the patterns it
    # matches; others once). Captions are read from `repeat_caption_key` ("" = `caption_key`, else "caption").
    c.repeat_captions = ""
    c.repeat_caption_key = ""
    c.num_epochs = 0  # 0 = repeat forever
    c.num_threads = 2  # grain reader threads (decode + preprocess)
    c.read_buffer = 64  # examples grain reads ahead
    c.prefetch = 2  # global batches assembled ahead on device
    # LDM training only: a folder for cached first-stage latents (ldm_jax.data.latent_cache); "" = encode every step
    c.cache = ""
    c.cache_chunk = 1024  # examples per cache file (the unit a resumed build skips)

    c.shapes = ml_collections.ConfigDict()
    c.shapes.seed = 0
    c.shapes.num_train = 10000
    c.shapes.num_test = 500
    c.shapes.num_heldout = 500
    c.shapes.colors = "red,green,blue,yellow,magenta,cyan"
    c.shapes.shapes = "circle,square,triangle"
    c.shapes.sizes = "small,large"
    c.shapes.positions = "top left,top,top right,left,center,right,bottom left,bottom,bottom right"
    c.shapes.backgrounds = "black,white,gray,blue"
    c.shapes.heldout = "red:triangle,green:square,blue:circle"  # color:shape pairs never in train
    return c


def shapes_spec(data_config: ml_collections.ConfigDict) -> ShapesSpec:
    """The ShapesSpec described by a data config (resolution comes from data_config.resolution)."""
    s = data_config.shapes
    return ShapesSpec(resolution=data_config.resolution, colors=s.colors, shapes=s.shapes, sizes=s.sizes,
                      positions=s.positions, backgrounds=s.backgrounds, heldout=s.heldout)
