"""Input pipeline throughput: shapes at 256^2 and a folder of JPEGs at 256^2.

    python3 bench/bench_data.py [--n 1000] [--batch 32] [--resolution 256] [--threads 2]

Prints images/s delivered by `make_dataset` (decode, resize/crop, flip, tokenize, global jax.Array)
and, measured in the same run on the same files, a plain single-threaded loop doing the same work
(read, decode, preprocess, tokenize, stack, copy to the device, scale; what a map-style loader with
no workers does) as the reference, with their ratio. Dataset preparation (one-off) is timed too.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def make_jpeg_folder(root: Path, n: int, seed: int = 0) -> None:
    """n JPEGs of 320x288 (smooth gradients + rectangles, photo-like compressibility) with .txt captions."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:288, 0:320].astype(np.float32)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = rng.uniform(-1, 1, (3, 3))
        img = 128 + 60 * np.stack([np.sin(a[c, 0] * xx / 40 + a[c, 1] * yy / 50 + a[c, 2] * 6) for c in range(3)], -1)
        for _ in range(4):
            y0, x0 = rng.integers(0, 250), rng.integers(0, 280)
            img[y0:y0 + rng.integers(10, 60), x0:x0 + rng.integers(10, 60)] = rng.integers(0, 256, 3)
        img += rng.normal(0, 4, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"{i:05d}.jpg", quality=90)
        (root / f"{i:05d}.txt").write_text(f"picture number {i} with {rng.integers(1, 9)} boxes")


def timed_prepare(cfg, n: int) -> float:
    """Images/s of the one-off preparation (NaN when it was already prepared in data_dir)."""
    from ldm_jax.data.pipeline import load_builder

    t0 = time.perf_counter()
    load_builder(cfg)
    dt = time.perf_counter() - t0
    return n / dt if dt > 1.0 else float("nan")  # under a second: it was already there


def pipeline_rate(cfg, mesh, batch: int, tok, steps: int) -> float:
    from ldm_jax.data.pipeline import make_dataset

    it = make_dataset(cfg, mesh=mesh, global_batch_size=batch, tokenizer=tok, seed=0)
    for _ in range(2):  # warm-up: threads started, buffers filled once
        next(it)["image"].block_until_ready()
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)["image"].block_until_ready()
    dt = time.perf_counter() - t0
    it.close()
    return steps * batch / dt


def reference_rate(cfg, tok, batch: int, steps: int) -> float:
    """The same work done plainly, like a map-style loader with no workers feeding `.to(device)`:
    one thread reads, decodes, preprocesses and tokenizes `batch` examples, stacks them, copies the
    batch to the device and scales it there; no prefetch, no overlap."""
    import jax

    from ldm_jax.data.pipeline import _Preprocess, _normalize, data_source

    src = data_source(cfg, "train")
    prep = _Preprocess(cfg, tok, train=True)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for step in range(steps):
        items = [prep.random_map(src[(step * batch + i) % len(src)], rng) for i in range(batch)]
        stacked = {k: np.stack([x[k] for x in items]) for k in items[0]}
        _normalize(jax.device_put(stacked["image"])).block_until_ready()
        jax.device_put(stacked["input_ids"]).block_until_ready()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000, help="images per dataset")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="batches timed")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data_dir", default=None, help="default: a temporary directory")
    args = ap.parse_args()

    from ldm_jax.data import shapes as S
    from ldm_jax.data.config import default_data_config, shapes_spec
    from ldm_jax.data.tokenizers import train_bpe_tokenizer
    from ldm_jax.sharding import make_mesh

    import jax

    tmp = tempfile.TemporaryDirectory()
    data_dir = Path(args.data_dir or tmp.name)
    mesh = make_mesh((-1, 1, 1))
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}, cpu cores: {os.cpu_count()}, "
          f"load average: {os.getloadavg()[0]:.1f} (other jobs share these cores: expect noise)")

    t0 = time.perf_counter()
    from ldm_jax.data.builders import hide_accelerators_from_tf

    hide_accelerators_from_tf()  # imports TensorFlow, which preparing needs: timed apart from preparing
    print(f"TensorFlow import (once per process that prepares a dataset): {time.perf_counter() - t0:.1f} s")

    cfg = default_data_config()
    cfg.data_dir, cfg.resolution, cfg.num_threads, cfg.flip = str(data_dir), args.resolution, args.threads, True
    cfg.shapes.num_train, cfg.shapes.num_test, cfg.shapes.num_heldout = args.n, 0, 0
    build = timed_prepare(cfg, args.n)
    spec = shapes_spec(cfg)
    tok = train_bpe_tokenizer([S.caption(S.sample_attributes(spec, 0, "train", i)) for i in range(2000)], 1000)
    rows = [("shapes", build, pipeline_rate(cfg, mesh, args.batch, tok, args.steps),
             reference_rate(cfg, tok, args.batch, args.steps))]

    folder = data_dir / "jpegs"
    if not (folder / f"{args.n - 1:05d}.txt").is_file():
        make_jpeg_folder(folder, args.n)
    fcfg = default_data_config()
    fcfg.source, fcfg.path, fcfg.label_key = "folder", str(folder), ""
    fcfg.data_dir, fcfg.resolution, fcfg.num_threads, fcfg.flip = str(data_dir), args.resolution, args.threads, True
    build = timed_prepare(fcfg, args.n)
    ftok = train_bpe_tokenizer([(folder / f"{i:05d}.txt").read_text() for i in range(args.n)], 1000)
    rows.append((f"jpeg folder 320x288 -> {args.resolution}", build,
                 pipeline_rate(fcfg, mesh, args.batch, ftok, args.steps),
                 reference_rate(fcfg, ftok, args.batch, args.steps)))

    r = args.resolution
    print(f"\n{'dataset':<28} {'prepare img/s':>14} {'pipeline img/s':>15} {'plain loop img/s':>17} {'ratio':>6}")
    for name, build, rate, ref in rows:
        print(f"{name:<28} {build:>14.0f} {rate:>15.0f} {ref:>17.0f} {rate / ref:>6.2f}")
    print(f"(resolution {r}x{r}, global batch {args.batch}, {args.threads} reader threads, random crop + flip, "
          "tokenized captions)")


if __name__ == "__main__":
    main()
