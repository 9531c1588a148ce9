"""Makes tests/goldens/fid_inception.npz and fid_stats_pytorch_fid.npz (references for tests/test_fid.py).

References: pytorch-fid 0.3.0 (InceptionV3 block 3 with the FID blocks, `calculate_frechet_distance`, its
.npz stats), torch-fidelity 0.4.0 (`kid_features_to_metric`), clean-fid 0.1.35 (`make_resizer`, its "clean" resize).

The Inception weights are random: `ldm_jax.interop.inception.random_state_dict(SEED)` draws them with NumPy
from a seed, so the test rebuilds the same 21.8M weights without storing them (they would be ~87 MB).

Environment: pytorch-fid, torch-fidelity and clean-fid import torchvision. PyPI's torchvision cannot load
its C extension beside the installed torch 2.13 CPU ("operator torchvision::nms does not exist"). Only the
operator registrations fail and none of the three needs torchvision's C ops (the FID blocks are pure-Python
torchvision `inception` modules), so this script stubs `torchvision._meta_registrations` before importing
it. Made in a venv on top of the system packages:

    python3 -m venv --system-site-packages /work/venv-fid
    /work/venv-fid/bin/pip install --no-deps torchvision==0.28.0 pytorch-fid==0.3.0 torch-fidelity==0.4.0 clean-fid==0.1.35
    /work/venv-fid/bin/python tests/goldens/make_fid_goldens.py
"""
from __future__ import annotations

import pathlib
import sys
import types

import numpy as np

sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
import torch  # noqa: E402
from cleanfid.resize import make_resizer  # noqa: E402
from pytorch_fid import inception as pfid_inception  # noqa: E402
from pytorch_fid.fid_score import calculate_frechet_distance  # noqa: E402
from torch_fidelity.metric_kid import kid_features_to_metric  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from ldm_jax.interop.inception import random_state_dict  # noqa: E402

HERE = pathlib.Path(__file__).parent
SEED = 0
CLEAN_SIZE = 29  # clean-fid resizes to 299; the golden uses a small output of the same resizer


def inception_features(state: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    pfid_inception.load_state_dict_from_url = lambda *a, **k: {k: torch.from_numpy(v) for k, v in state.items()}
    orig = torch.nn.Module.load_state_dict

    def load(self, sd, strict=True, assign=False):  # the random dict has no fc / num_batches_tracked
        missing, unexpected = orig(self, sd, strict=False)
        assert not unexpected and all(k.startswith("fc.") or k.endswith("num_batches_tracked") for k in missing), missing
        return missing, unexpected

    torch.nn.Module.load_state_dict = load
    try:
        model = pfid_inception.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    finally:
        torch.nn.Module.load_state_dict = orig
    x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        return model(x)[0][:, :, 0, 0].numpy()


def feature_sets(rng: np.random.Generator) -> dict[str, np.ndarray]:
    d = 64
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    b = rng.standard_normal((d, d)) / np.sqrt(d) + 0.3 * np.eye(d)
    return {
        "feats1": (rng.standard_normal((400, d)) @ a + 0.5).astype(np.float32),
        "feats2": (rng.standard_normal((300, d)) @ b + rng.uniform(0, 1, d)).astype(np.float32),
    }


def main() -> None:
    rng = np.random.default_rng(1234)
    up = rng.integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)  # upsampled to 299
    down = np.clip(rng.normal(128, 60, (1, 311, 305, 3)), 0, 255).astype(np.uint8)  # downsampled
    state = random_state_dict(SEED)
    out: dict[str, np.ndarray] = {"seed": np.int64(SEED), "images_up": up, "images_down": down,
                                  "features_up": inception_features(state, up)}
    # pytorch-fid's resize of the larger image (every 7th pixel of the 299x299 output, to keep the file small)
    x = torch.from_numpy(down.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    out["resized_down_every7"] = resized.permute(0, 2, 3, 1).numpy()[:, ::7, ::7]
    resize = make_resizer("PIL", False, "bicubic", (CLEAN_SIZE, CLEAN_SIZE))
    out["clean_up"] = resize(up[0])
    out["clean_down"] = resize(down[0])

    sets = feature_sets(rng)
    out.update(sets)
    stats = []
    for name in ("feats1", "feats2"):
        act = sets[name].astype(np.float64)
        stats.append((np.mean(act, axis=0), np.cov(act, rowvar=False)))  # pytorch-fid's calculate_activation_statistics
    out["fid"] = np.float64(calculate_frechet_distance(*stats[0], *stats[1]))
    # float64 in: torch-fidelity then computes the kernels in float64 (its float32 default differs ~1e-7)
    kid = kid_features_to_metric(torch.from_numpy(sets["feats1"].astype(np.float64)),
                                 torch.from_numpy(sets["feats2"].astype(np.float64)),
                                 kid_subsets=10, kid_subset_size=100, rng_seed=2020, verbose=False)
    out["kid_mean"] = np.float64(kid["kernel_inception_distance_mean"])
    out["kid_std"] = np.float64(kid["kernel_inception_distance_std"])
    np.savez_compressed(HERE / "fid_inception.npz", **out)
    # the file pytorch-fid's `--save-stats` writes (fid_score.save_fid_stats: np.savez_compressed(mu=, sigma=))
    np.savez_compressed(HERE / "fid_stats_pytorch_fid.npz", mu=stats[0][0], sigma=stats[0][1])
    print({k: (v.shape, v.dtype) for k, v in out.items()}, "fid", out["fid"], "kid", kid)


if __name__ == "__main__":
    main()
