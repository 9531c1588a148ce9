"""Makes tests/goldens/lpips_vgg.npz from the `lpips` package (net='vgg', v0.1) with a random VGG16 trunk.

    python3 tests/goldens/make_lpips_goldens.py

The trunk's weights come from `vgg16_random_state_dict()` (numpy's frozen legacy RandomState, so the test
rebuilds them bit for bit instead of storing 59 MB); the linear heads are the real ones shipped inside the
pip package (lpips/weights/v0.1/vgg.pth, 1,472 floats), stored in the golden file.
torchvision is only used by lpips to build `vgg16().features`; the installed torchvision does not import
against this torch, so an identical `features` Sequential is built here instead (same layer indices).
"""
from __future__ import annotations

import pathlib
import sys
import types

import numpy as np

OUT = pathlib.Path(__file__).parent / "lpips_vgg.npz"
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """torchvision-layout `features.N.weight|bias` with He-scaled normal weights from RandomState(seed)."""
    rs = np.random.RandomState(seed)
    out, idx, cin = {}, 0, 3
    for item in VGG16_CFG:
        if item == "M":
            idx += 1
            continue
        w = rs.standard_normal((item, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))
        out[f"features.{idx}.weight"] = w.astype(np.float32)
        out[f"features.{idx}.bias"] = (0.01 * rs.standard_normal(item)).astype(np.float32)
        cin, idx = item, idx + 2
    return out


def inputs(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Two NHWC batches in [-1, 1]; 40x36 makes every max-pool floor an odd size like torch does."""
    rs = np.random.RandomState(seed)
    x0 = rs.uniform(-1, 1, (2, 40, 36, 3)).astype(np.float32)
    x1 = np.clip(x0 + 0.3 * rs.standard_normal(x0.shape), -1, 1).astype(np.float32)
    return x0, x1


def _stub_torchvision() -> None:
    import torch

    def vgg16(pretrained: bool = False, **_):
        layers, cin = [], 3
        for item in VGG16_CFG:
            if item == "M":
                layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [torch.nn.Conv2d(cin, item, 3, padding=1), torch.nn.ReLU(inplace=True)]
                cin = item
        return types.SimpleNamespace(features=torch.nn.Sequential(*layers))

    tv = types.ModuleType("torchvision")
    tv.models = types.ModuleType("torchvision.models")
    tv.models.vgg16 = vgg16
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.models"] = tv.models


def main() -> None:
    import torch

    _stub_torchvision()
    import lpips

    model = lpips.LPIPS(pretrained=True, net="vgg", version="0.1", pnet_rand=True, verbose=False).eval()
    trunk = vgg16_random_state_dict()
    for s in range(1, 6):
        sl = getattr(model.net, f"slice{s}")
        sl.load_state_dict({k.split(".", 1)[1]: torch.from_numpy(v) for k, v in trunk.items()
                            if k.split(".")[1] in {n for n, _ in sl.named_children()}})
    heads = {f"lin{k}.model.1.weight": getattr(model, f"lin{k}").model[1].weight.detach().numpy().copy() for k in range(5)}
    x0, x1 = inputs()
    t0, t1 = (torch.from_numpy(x).permute(0, 3, 1, 2) for x in (x0, x1))
    with torch.no_grad():
        dist, per_layer = model(t0, t1, retPerLayer=True)
    np.savez_compressed(
        OUT,
        x0=x0,
        x1=x1,
        dist=dist.numpy().reshape(-1),
        per_layer=np.stack([r.numpy().reshape(-1) for r in per_layer]),
        **{k.replace(".", "/"): v for k, v in heads.items()},
    )
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): dist={dist.numpy().reshape(-1)}")


if __name__ == "__main__":
    main()
