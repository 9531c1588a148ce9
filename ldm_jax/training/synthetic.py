"""A deterministic random-batch iterator with the data pipeline's interface (tests, benchmarks, dry runs)."""
from __future__ import annotations

from typing import Any

import numpy as np
from jax.sharding import Mesh

from ldm_jax import sharding as shd


class SyntheticBatches:
    """Batch i is a function of (seed, i) only, so runs on any mesh or process count see the same data."""

    def __init__(self, mesh: Mesh, global_batch_size: int, image_size: int, *, text_length: int = 0,
                 vocab_size: int = 1000, num_classes: int = 0, seed: int = 0):
        self.mesh, self.b, self.size = mesh, global_batch_size, image_size
        self.text_length, self.vocab, self.num_classes, self.seed = text_length, vocab_size, num_classes, seed
        self.index = 0

    def host_batch(self, index: int) -> dict[str, np.ndarray]:
        """The numpy batch number `index` (identical on every process)."""
        rng = np.random.default_rng([self.seed, index])
        batch: dict[str, Any] = {"image": rng.uniform(-1, 1, (self.b, self.size, self.size, 3)).astype(np.float32)}
        if self.text_length:
            batch["input_ids"] = rng.integers(1, self.vocab, (self.b, self.text_length)).astype(np.int32)
        if self.num_classes:
            batch["label"] = rng.integers(0, self.num_classes, (self.b,)).astype(np.int32)
        return batch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = shd.host_to_global(self.host_batch(self.index), self.mesh)
        self.index += 1
        return batch

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])
