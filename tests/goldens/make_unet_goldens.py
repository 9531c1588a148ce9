"""Makes tests/goldens/unet_*.npz from diffusers' PyTorch UNets (needs torch + diffusers; run by hand).

    python3 tests/goldens/make_unet_goldens.py

Weights are not stored: they are drawn by `random_state_dict` (numpy only, seeded, in the state dict's key
order), which the test calls again on the stored key/shape list. Each golden holds the diffusers config, the
key/shape list, the inputs (NHWC) and diffusers' fp32 output (NHWC). Also prints the SD1/SD2 parameter counts
of diffusers' UNet2DConditionModel (built on the meta device).
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

HERE = pathlib.Path(__file__).parent

# Small configs: SD1 style (head count, conv proj), SD2 style (head width, linear proj, depth 2, concat input
# channel), and a class-conditional UNet2DModel with plain attention, scale-shift norm and resblock up/down.
CONFIGS = {
    "sd1": dict(
        _class_name="UNet2DConditionModel", sample_size=8, in_channels=4, out_channels=4,
        block_out_channels=[32, 64, 64], layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        attention_head_dim=2, cross_attention_dim=24, norm_num_groups=32,
    ),
    "sd2": dict(
        _class_name="UNet2DConditionModel", sample_size=8, in_channels=5, out_channels=4,
        block_out_channels=[32, 64, 64], layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        attention_head_dim=[1, 2, 2], cross_attention_dim=24, use_linear_projection=True,
        transformer_layers_per_block=2, norm_num_groups=32,
    ),
    "cls": dict(
        _class_name="UNet2DModel", sample_size=8, in_channels=3, out_channels=3,
        block_out_channels=[32, 64], layers_per_block=1,
        down_block_types=["AttnDownBlock2D", "ResnetDownsampleBlock2D"],
        up_block_types=["ResnetUpsampleBlock2D", "AttnUpBlock2D"],
        attention_head_dim=16, resnet_time_scale_shift="scale_shift", num_class_embeds=10,
        downsample_type="resnet", upsample_type="resnet", attn_norm_num_groups=32, norm_num_groups=32,
    ),
    # SDXL base structure: no attention at the top level, per-level transformer depth, head width 16,
    # linear projections, text_time added conditioning; 8 GroupNorm groups and another eps (issue 18)
    "sdxl": dict(
        _class_name="UNet2DConditionModel", sample_size=8, in_channels=4, out_channels=4,
        block_out_channels=[32, 64, 64], layers_per_block=1,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[2, 4, 4], cross_attention_dim=24, use_linear_projection=True,
        transformer_layers_per_block=[1, 1, 2], addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=8, norm_eps=1e-6,
    ),
    # SDXL refiner structure: attention at the middle levels only, one depth everywhere, 5 micro-conditioning ids
    "refiner": dict(
        _class_name="UNet2DConditionModel", sample_size=8, in_channels=4, out_channels=4,
        block_out_channels=[16, 32, 32, 32], layers_per_block=1,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[1, 2, 2, 2], cross_attention_dim=16, use_linear_projection=True,
        transformer_layers_per_block=2, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 5 * 8, norm_num_groups=16,
    ),
    # a plain-attention UNet2DModel with 8 groups (the attention's GroupNorm takes the same count)
    "g8": dict(
        _class_name="UNet2DModel", sample_size=8, in_channels=3, out_channels=3,
        block_out_channels=[16, 32], layers_per_block=1,
        down_block_types=["AttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "AttnUpBlock2D"],
        attention_head_dim=8, norm_num_groups=8, norm_eps=1e-6,
    ),
}
# the published SDXL UNet configs (stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0, unet/config.json)
SDXL_BASE = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280], layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
    transformer_layers_per_block=[1, 2, 10], addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
SDXL_REFINER = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=[384, 768, 1536, 1536], layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[6, 12, 24, 24], cross_attention_dim=1280, use_linear_projection=True,
    transformer_layers_per_block=4, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560, norm_num_groups=32,
)
SD2_FULL = dict(
    sample_size=96, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
)


def random_state_dict(spec: list[tuple[str, list[int]]], seed: int) -> dict[str, np.ndarray]:
    """Seeded float32 weights for a torch key/shape list: ~U-free normal, 1/sqrt(fan_in) for matrices."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in spec:
        w = rng.standard_normal(shape).astype(np.float32)
        if len(shape) >= 2 and "embedding" not in key:
            w /= np.sqrt(np.prod(shape[1:]))
            if "time_emb_proj" in key:
                # the time embedding is ~100 in size: at full scale it is added to features and then cancelled by
                # GroupNorm, which makes even PyTorch fp32 vs fp64 differ by 1e-3; keep the goldens well-conditioned
                w *= 0.05
        elif len(shape) == 1 and ("norm" in key and key.endswith("weight")):
            w = 1.0 + 0.1 * w
        elif len(shape) == 1:
            w *= 0.1
        out[key] = w
    return out


def make_inputs(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """NHWC inputs: x, timesteps, and context or class labels."""
    rng = np.random.default_rng(seed + 1)
    inputs = {
        "x": rng.standard_normal((2, 8, 8, cfg["in_channels"])).astype(np.float32),
        "timesteps": np.array([3, 917], np.int32),
    }
    if "cross_attention_dim" in cfg:
        inputs["context"] = rng.standard_normal((2, 5, cfg["cross_attention_dim"])).astype(np.float32)
    if cfg.get("num_class_embeds"):
        inputs["y"] = np.array([1, 7], np.int32)
    if cfg.get("addition_embed_type") == "text_time":
        n_ids = 5 if cfg["cross_attention_dim"] == 16 else 6  # the refiner config: aesthetic score, not target size
        pooled = cfg["projection_class_embeddings_input_dim"] - cfg["addition_time_embed_dim"] * n_ids
        inputs["text_embeds"] = rng.standard_normal((2, pooled)).astype(np.float32)
        ids = [[64, 64, 0, 0, 64, 64], [1024, 768, 16, 8, 1024, 1024]] if n_ids == 6 else [[64, 64, 0, 0, 6.0],
                                                                                              [1024, 768, 16, 8, 2.5]]
        inputs["time_ids"] = np.array(ids, np.float32)
    return inputs


def _count(cls, cfg: dict) -> int:
    import torch

    with torch.device("meta"):
        model = cls.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    import diffusers
    import torch

    torch.set_num_threads(2)
    for seed, (name, cfg) in enumerate(CONFIGS.items()):
        cls = getattr(diffusers, cfg["_class_name"])
        model = cls.from_config({k: v for k, v in cfg.items() if k != "_class_name"}).eval()
        spec = [(k, list(v.shape)) for k, v in model.state_dict().items()]
        model.load_state_dict({k: torch.from_numpy(v) for k, v in random_state_dict(spec, seed).items()})
        inputs = make_inputs(cfg, seed)
        kw = {}
        if "context" in inputs:
            kw["encoder_hidden_states"] = torch.from_numpy(inputs["context"])
        if "y" in inputs:
            kw["class_labels"] = torch.from_numpy(inputs["y"]).long()
        if "time_ids" in inputs:
            kw["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(inputs["text_embeds"]),
                                       "time_ids": torch.from_numpy(inputs["time_ids"])}
        outs = []
        for dtype in (torch.float32, torch.float64):  # fp64 tells how well-conditioned the golden is
            model.to(dtype)
            cast = lambda v: {k: cast(u) for k, u in v.items()} if isinstance(v, dict) else (  # noqa: E731
                v.to(dtype) if v.is_floating_point() else v)
            kw_dt = {k: cast(v) for k, v in kw.items()}
            with torch.no_grad():
                x = torch.from_numpy(inputs["x"]).permute(0, 3, 1, 2).to(dtype)
                out = model(x, torch.from_numpy(inputs["timesteps"]), **kw_dt).sample
            outs.append(out.permute(0, 2, 3, 1).numpy())
        out, out64 = outs
        np.savez_compressed(
            HERE / f"unet_{name}.npz", config=json.dumps(cfg), spec=json.dumps(spec), seed=seed, out=out,
            out64=out64.astype(np.float32), **inputs,
        )
        err = np.abs(out - out64).max() / np.abs(out64).max()
        print(f"unet_{name}: {len(spec)} tensors, max|out| {np.abs(out).max():.4f}, torch fp32 vs fp64 {err:.2e}")
    counts = {name: _count(diffusers.UNet2DConditionModel, cfg) for name, cfg in
              (("sd1", {"cross_attention_dim": 768}), ("sd2", SD2_FULL), ("sdxl-base", SDXL_BASE),
               ("sdxl-refiner", SDXL_REFINER))}
    (HERE / "unet_param_counts.json").write_text(json.dumps(counts, indent=1) + "\n")
    print("diffusers UNet2DConditionModel params:", counts)


if __name__ == "__main__":
    main()
