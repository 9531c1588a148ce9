"""FID Inception feature throughput (img/s): ours under jax.jit vs pytorch-fid's InceptionV3 on the same CPU.

    /work/venv-fid/bin/python bench/bench_fid.py [--batch 16] [--size 64] [--reps 3]

Both get the same random weights (`ldm_jax.interop.inception.random_state_dict`); the timed work is what FID
does per image: uint8 -> [0, 1] -> bilinear resize to 299 -> the network -> 2048-d pool3 (ours on the host
array, pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)` under torch.no_grad). The features
are compared before timing. The two are alternated --reps times and the fastest of each kept.
ratio = ours / pytorch-fid in img/s (goal >= 1.0). Needs the venv of tests/goldens/make_fid_goldens.py
(pytorch-fid with torchvision; the same stub of torchvision's operator registrations).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pytorch_fid import inception as pfid  # noqa: E402

from ldm_jax.evaluation.features import InceptionFeatures  # noqa: E402
from ldm_jax.interop.inception import from_torch, random_state_dict  # noqa: E402


def _torch_model(state: dict[str, np.ndarray]) -> torch.nn.Module:
    pfid.load_state_dict_from_url = lambda *a, **k: {k: torch.from_numpy(v) for k, v in state.items()}
    orig = torch.nn.Module.load_state_dict
    torch.nn.Module.load_state_dict = lambda self, sd, strict=True, assign=False: orig(self, sd, strict=False)
    try:
        return pfid.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    finally:
        torch.nn.Module.load_state_dict = orig


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64, help="input image side (resized to 299 by both)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    state = random_state_dict(0)
    ref = _torch_model(state)
    ours = InceptionFeatures(from_torch(state), batch_size=args.batch)
    images = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)

    def theirs():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            return ref(x)[0][:, :, 0, 0].numpy()

    a, b = ours(images), theirs()  # also compiles ours
    rel = float(np.abs(a - b).max() / np.abs(b).max())
    t_ours, t_ref = [], []
    for _ in range(args.reps):
        t_ours.append(_seconds(lambda: ours(images)))
        t_ref.append(_seconds(theirs))
    ours_ips, ref_ips = args.batch / min(t_ours), args.batch / min(t_ref)
    print(f"torch threads {torch.get_num_threads()}, batch {args.batch}, {args.size}px -> 299, max rel diff {rel:.1e}")
    print(f"ours {ours_ips:.2f} img/s, pytorch-fid {ref_ips:.2f} img/s, ratio {ours_ips / ref_ips:.2f}")


if __name__ == "__main__":
    main()
