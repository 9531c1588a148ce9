"""Makes tests/goldens/text_{sd1,sd2}.safetensors from transformers' CLIPTextModel (random weights).

Needs torch + transformers (requirements-dev.txt). Run from the repo root:
    python3 tests/goldens/make_text_goldens.py
Each file holds the reference weights (transformers keys), `input_ids`, and the reference outputs:
- sd1: quick_gelu, legacy eos_token_id=2 (pool at argmax), last layer after final LayerNorm.
- sd2: gelu, eos_token_id set (pool at the first EOS, padding reuses it), hidden_states[-2] then
  final_layer_norm (SD2's penultimate layer), CLIPTextModelWithProjection's text_embeds.
"""
import pathlib

import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

OUT = pathlib.Path(__file__).parent
VOCAB, EOS = 512, 511


def _ids(rng: np.random.Generator, eos_lengths: list[int], pad: int) -> np.ndarray:
    ids = np.full((len(eos_lengths), 77), pad, np.int64)
    for b, n in enumerate(eos_lengths):
        ids[b, 0] = 0  # bos
        ids[b, 1:n] = rng.integers(2, EOS, n - 1)
        ids[b, n] = EOS
    return ids


def main() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  max_position_embeddings=77, projection_dim=16, bos_token_id=0)

    # SD1 style: quick_gelu, legacy eos id -> argmax(input_ids); padding with EOS as SD1's tokenizer does
    cfg = CLIPTextConfig(**common, num_hidden_layers=2, hidden_act="quick_gelu", eos_token_id=2)
    model = CLIPTextModel(cfg).eval()
    ids = _ids(rng, [5, 76, 20], pad=EOS)
    with torch.no_grad():
        out = model(torch.from_numpy(ids))
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    tensors.update(input_ids=ids.astype(np.int32), last_hidden_state=out.last_hidden_state.numpy(),
                   pooler_output=out.pooler_output.numpy())
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(OUT / "text_sd1.safetensors"))

    # SD2 style: gelu, explicit eos id (first occurrence), penultimate layer + final LN, projection
    cfg = CLIPTextConfig(**common, num_hidden_layers=3, hidden_act="gelu", eos_token_id=EOS, pad_token_id=0)
    model = CLIPTextModelWithProjection(cfg).eval()
    ids = _ids(rng, [3, 40, 76], pad=EOS)
    ids[0, 10] = EOS + 0  # pad reuses EOS; first EOS is at 3
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
        penult = model.text_model.final_layer_norm(out.hidden_states[-2])
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    tensors.update(input_ids=ids.astype(np.int32), penultimate_normed=penult.numpy(),
                   text_embeds=out.text_embeds.numpy())
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(OUT / "text_sd2.safetensors"))
    for f in sorted(OUT.glob("text_*.safetensors")):
        print(f, f.stat().st_size)


if __name__ == "__main__":
    main()
