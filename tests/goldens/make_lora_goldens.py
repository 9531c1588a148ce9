"""Makes tests/goldens/lora_peft.safetensors + lora_peft.npz: a LoRA made with peft on tiny_sd/, and outputs.

Needs torch + diffusers + peft (requirements-dev.txt). Run from the repo root:
    python3 tests/goldens/make_lora_goldens.py
The UNet adapter (r=4, alpha=8, random A and B: peft's init_lora_weights=False) covers Linear layers
(to_q/k/v, to_out.0, ff.net.2), the 1x1-conv proj_in of SD1 and 3x3 convs (resnets' conv1, LoCon);
the text-encoder adapter (r=2, alpha=4) covers q/k/v/out_proj and mlp.fc1. The file is what
`StableDiffusionPipeline.save_lora_weights` writes (peft config in the safetensors metadata); the npz
holds UNet inputs (NHWC) and diffusers' outputs with the LoRA applied, and the text encoder's last hidden
state for a few token ids, with and without the LoRA.
"""
import pathlib

import numpy as np
import torch

OUT = pathlib.Path(__file__).parent
TINY = OUT / "tiny_sd"


def main() -> None:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(str(TINY), safety_checker=None, requires_safety_checker=False,
                                                   dtype=torch.float32)
    unet, te = pipe.unet, pipe.text_encoder
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([10, 700], np.int64)
    ctx = rng.standard_normal((2, 5, 32)).astype(np.float32)
    ids = np.array([[49406 % 668, 5, 17, 667, 667, 667, 667]], np.int64)
    with torch.no_grad():
        base_text = te(torch.from_numpy(ids))[0].numpy()
    ucfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                      target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"])
    tcfg = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"])
    unet.add_adapter(ucfg)
    te = inject_adapter_in_model(tcfg, te)  # transformers' add_adapter wants peft >= 0.22; peft's own call
    with torch.no_grad():  # peft's kaiming init of B is large for rank 4; shrink so outputs stay O(1)
        for name, p in list(unet.named_parameters()) + list(te.named_parameters()):
            if "lora_B" in name:
                p.mul_(0.2)
        out = unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
        lora_text = te(torch.from_numpy(ids))[0].numpy()
    StableDiffusionPipeline.save_lora_weights(
        str(OUT), unet_lora_layers=get_peft_model_state_dict(unet), text_encoder_lora_layers=get_peft_model_state_dict(te),
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict(),
        weight_name="lora_peft.safetensors")
    np.savez_compressed(OUT / "lora_peft.npz", x=x.transpose(0, 2, 3, 1), t=t, ctx=ctx, out=out.transpose(0, 2, 3, 1),
                        ids=ids, base_text=base_text, lora_text=lora_text)
    for f in ("lora_peft.safetensors", "lora_peft.npz"):
        print(OUT / f, (OUT / f).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
