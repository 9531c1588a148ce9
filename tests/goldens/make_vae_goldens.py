"""Makes the autoencoder goldens from diffusers' PyTorch `AutoencoderKL` and `VQModel` (random weights, tiny configs).

Needs torch + diffusers (requirements-dev.txt); CI only reads the files this writes:
  vae_{kl,vq}_weights.safetensors  diffusers-layout weights, the diffusers config as JSON in the metadata
  vae_{kl,vq}_io.npz               inputs and reference outputs, NHWC
  vae_param_counts.json            parameter counts of every VAE_PRESETS entry built by diffusers

Also checks, without writing anything, that our CompVis export (`ldm_jax.interop.vae.to_compvis`) is what
diffusers' own single-file converter (`convert_ldm_vae_checkpoint`) maps back to the original diffusers
weights, key for key and value for value.

  python3 tests/goldens/make_vae_goldens.py
"""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import torch
from diffusers import AutoencoderKL, VQModel
from safetensors.numpy import save_file

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent))

KL_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
    block_out_channels=[8, 16, 16],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
)
VQ_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
    up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
    block_out_channels=[8, 16],
    layers_per_block=1,
    latent_channels=4,
    vq_embed_dim=3,
    num_vq_embeddings=16,
    norm_num_groups=4,
    sample_size=16,
)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Moves GroupNorm scales/biases off 1/0 and gives the codebook unit-scale entries, so every weight matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            elif "embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32)


def nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def save_weights(model: torch.nn.Module, config: dict, name: str) -> None:
    tensors = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    # diffusers' `_use_default_values` is a set in disguise: dropped so that re-running gives identical files.
    config = {k: v for k, v in model.config.items() if not k.startswith("_")} | {"_class_name": type(model).__name__}
    metadata = {"config": json.dumps(config, sort_keys=True)}
    save_file(tensors, str(HERE / f"vae_{name}_weights.safetensors"), metadata=metadata)


def make_kl() -> None:
    torch.manual_seed(0)
    model = AutoencoderKL(**KL_CONFIG).eval()
    randomize(model, 1)
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    z = rng.randn(2, 4, 4, 4).astype(np.float32)
    with torch.no_grad():
        post = model.encode(nchw(x)).latent_dist
        recon = model.decode(post.mode()).sample
        dec = model.decode(nchw(z)).sample
        kl = post.kl()
    np.savez_compressed(
        HERE / "vae_kl_io.npz", x=x, z=z, mean=nhwc(post.mean), logvar=nhwc(post.logvar), recon_mode=nhwc(recon),
        decoded_z=nhwc(dec), kl=kl.numpy().astype(np.float32),
    )  # fmt: skip
    save_weights(model, KL_CONFIG, "kl")


def make_vq() -> None:
    torch.manual_seed(0)
    model = VQModel(**VQ_CONFIG).eval()
    randomize(model, 2)
    rng = np.random.RandomState(1)
    x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        h = model.encode(nchw(x)).latents
        # Codebook entries drawn around the encoder's outputs, so that many codes are in use.
        flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        g = torch.Generator().manual_seed(4)
        pick = torch.randperm(flat.shape[0], generator=g)[: model.quantize.n_e]
        model.quantize.embedding.weight.copy_(flat[pick] + 0.5 * flat.std(0) * torch.randn(flat[pick].shape, generator=g))
        quant, loss, (_, _, indices) = model.quantize(h)
        out = model(nchw(x))
    # Near-ties would make the argmin depend on float rounding; report the smallest winning margin.
    d = torch.cdist(flat, model.quantize.embedding.weight.detach()).sort(dim=1).values
    print(f"vq: smallest best-vs-second codebook distance margin {float((d[:, 1] - d[:, 0]).min()):.4f}, "
          f"{len(set(indices.flatten().tolist()))} codes used")  # fmt: skip
    np.savez_compressed(
        HERE / "vae_vq_io.npz", x=x, latent=nhwc(h), quant=nhwc(quant), loss=np.float32(loss.item()),
        indices=indices.reshape(2, h.shape[2], h.shape[3]).numpy().astype(np.int32), recon=nhwc(out.sample),
        commit_loss=np.float32(out.commit_loss.item()),
    )  # fmt: skip
    save_weights(model, VQ_CONFIG, "vq")


def check_compvis_export() -> None:
    """Our CompVis export of a diffusers model, fed to diffusers' own ldm->diffusers converter, is the identity."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from ldm_jax.interop import vae as conv

    cfg = dict(KL_CONFIG, down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3)
    model = AutoencoderKL(**cfg)
    randomize(model, 3)
    ref = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    kwargs = conv.config_from_diffusers(dict(model.config))
    params = conv.from_diffusers(ref, kwargs)
    compvis = conv.to_compvis(params, kwargs, prefix="first_stage_model.")
    back = convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in compvis.items()}, cfg)
    assert set(back) == set(ref), (set(back) ^ set(ref))
    for k in ref:
        np.testing.assert_array_equal(np.asarray(back[k]).reshape(ref[k].shape), ref[k], err_msg=k)
    print(f"compvis export: diffusers' convert_ldm_vae_checkpoint recovers all {len(ref)} tensors exactly")


def count_presets() -> None:
    """Parameter counts of every preset as the diffusers PyTorch classes build them (vae_param_counts.json)."""
    from ldm_jax.interop import vae as conv
    from ldm_jax.models.autoencoder import VAE_PRESETS

    counts = {}
    for name, kwargs in VAE_PRESETS.items():
        cfg = conv.config_to_diffusers(kwargs)
        cls = VQModel if cfg.pop("_class_name") == "VQModel" else AutoencoderKL
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in cls(**cfg).parameters())
    (HERE / "vae_param_counts.json").write_text(json.dumps(counts, indent=1) + "\n")
    print("diffusers parameter counts:", counts)


if __name__ == "__main__":
    make_kl()
    make_vq()
    check_compvis_export()
    count_presets()
    for p in sorted(HERE.glob("vae_*")):
        print(f"{p.name}: {p.stat().st_size / 1024:.1f} KiB")
