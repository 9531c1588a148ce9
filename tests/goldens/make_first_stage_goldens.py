"""Makes tests/goldens/first_stage_disc.npz: taming-transformers' NLayerDiscriminator (ndf 8, 3 layers, BatchNorm)
rebuilt layer for layer in PyTorch (taming is not installed), its weights, an input and its logits.

    python3 tests/goldens/make_first_stage_goldens.py
"""
import pathlib

import numpy as np
import torch
from torch import nn

OUT = pathlib.Path(__file__).parent / "first_stage_disc.npz"


def nlayer_discriminator(input_nc=3, ndf=8, n_layers=3):
    """taming/modules/discriminator/model.py NLayerDiscriminator with use_actnorm=False."""
    kw, padw = 4, 1
    seq = [nn.Conv2d(input_nc, ndf, kw, 2, padw), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers):
        prev, mult = mult, min(2**n, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, kw, 2, padw, bias=False), nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
    prev, mult = mult, min(2**n_layers, 8)
    seq += [nn.Conv2d(ndf * prev, ndf * mult, kw, 1, padw, bias=False), nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
    seq += [nn.Conv2d(ndf * mult, 1, kw, 1, padw)]
    return nn.Sequential(*seq)


def main():
    torch.manual_seed(0)
    d = nlayer_discriminator()
    for m in d.modules():  # taming's weights_init, plus non-trivial BN biases so they are checked
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.normal_(m.bias, 0.0, 0.1)
    x = np.random.RandomState(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    convs = [m for m in d if isinstance(m, nn.Conv2d)]
    norms = [m for m in d if isinstance(m, nn.BatchNorm2d)]
    out = {"x": x}
    for i, c in enumerate(convs):
        out[f"conv_{i}/weight"] = c.weight.detach().numpy().copy()
        if c.bias is not None:
            out[f"conv_{i}/bias"] = c.bias.detach().numpy().copy()
    for i, n in enumerate(norms, start=1):
        out[f"norm_{i}/weight"] = n.weight.detach().numpy().copy()
        out[f"norm_{i}/bias"] = n.bias.detach().numpy().copy()
    d.train()
    with torch.no_grad():
        out["logits_train"] = d(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    out["norm_1/running_mean"] = norms[0].running_mean.numpy().copy()
    for n in norms:  # eval mode with fresh running stats (mean 0, var 1), as the test sets them
        n.reset_running_stats()
    d.eval()
    with torch.no_grad():
        out["logits_eval"] = d(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes), logits {out['logits_train'].shape}")


if __name__ == "__main__":
    main()
