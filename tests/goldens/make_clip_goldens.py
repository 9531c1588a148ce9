"""Makes tests/goldens/tiny_clip/ (a random tiny transformers CLIPModel folder) and clip_score.npz.

Reference: transformers' `CLIPModel.get_image_features` / `get_text_features` (pooler_output, projected),
`CLIPImageProcessorPil` (the PIL backend of CLIPImageProcessor) and torchmetrics 1.9's CLIP score reduction
(`_clip_score_update`: 100·cos per pair; `clip_score`: max(mean, 0)), run on the tiny model. The tokenizer is
tests/goldens/tiny_sd/tokenizer (CLIP BPE, 668 tokens). Runs with the system python (torch, transformers);
torchmetrics' own function is used when it imports (it needs the venv of make_fid_goldens.py):

    /work/venv-fid/bin/pip install --no-deps torchmetrics==1.9.0 lightning-utilities
    /work/venv-fid/bin/python tests/goldens/make_clip_goldens.py
"""
from __future__ import annotations

import pathlib
import shutil
import sys
import types

import numpy as np
import torch

sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer  # noqa: E402
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

HERE = pathlib.Path(__file__).parent
OUT = HERE / "tiny_clip"
PROMPTS = ["a red circle", "a large blue square at the top left", "a green triangle on a white background"]


def main() -> None:
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=668, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, bos_token_id=666, eos_token_id=667, pad_token_id=667),
        vision_config=dict(hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=24)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # transformers initialises LayerNorms to identity: perturb them so the test sees them
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    if OUT.exists():
        shutil.rmtree(OUT)
    model.save_pretrained(OUT, safe_serialization=True)
    for f in (HERE / "tiny_sd" / "tokenizer").iterdir():
        shutil.copy(f, OUT / f.name)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    image_processor.save_pretrained(OUT)
    tokenizer = CLIPTokenizer.from_pretrained(OUT)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 45, 38, 3), dtype=np.uint8)  # portrait: resized to 32 wide, cropped
    pixels = image_processor(images=[im for im in images], return_tensors="pt")["pixel_values"]
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).pooler_output
    try:
        from torchmetrics.functional.multimodal.clip_score import _clip_score_update

        processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
        per, _ = _clip_score_update([torch.from_numpy(im).permute(2, 0, 1) for im in images], PROMPTS, model,
                                    processor)
        source = "torchmetrics"
    except Exception as e:  # torchmetrics 1.9 expects get_*_features to return tensors (transformers < 5)
        print(f"torchmetrics' _clip_score_update does not run here ({type(e).__name__}: {e}); same formula inline")
        unit = lambda t: t / t.norm(p=2, dim=-1, keepdim=True)  # noqa: E731
        per = 100 * (unit(img) * unit(txt)).sum(axis=-1)
        source = "torchmetrics formula"
    score = torch.max(per.mean(0), torch.zeros_like(per.mean(0)))
    np.savez_compressed(HERE / "clip_score.npz", images=images, pixel_values=pixels.permute(0, 2, 3, 1).numpy(),
                        input_ids=ids["input_ids"].numpy().astype(np.int32), image_embeds=img.numpy(),
                        text_embeds=txt.numpy(), per_sample=per.double().numpy(), clip_score=score.double().numpy(),
                        prompts=np.asarray(PROMPTS))
    print("wrote", OUT, "clip score", float(score), "via", source)


if __name__ == "__main__":
    main()
