"""ldm_jax.data: tfds builders (shapes, image folders), the grain input pipeline, tokenizers.

Names are imported lazily so that `ldm_jax.data.shapes` (numpy only) does not pull in tfds/grain.
"""
import importlib

_EXPORTS = {
    "make_dataset": "pipeline", "DataIterator": "pipeline", "dataset_captions": "pipeline",
    "default_data_config": "config", "DataError": "builders", "load_tokenizer": "tokenizers",
    "CLIPTokenizer": "tokenizers", "BPETokenizer": "tokenizers", "train_bpe_tokenizer": "tokenizers",
    "load_or_train_tokenizer": "tokenizers",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
