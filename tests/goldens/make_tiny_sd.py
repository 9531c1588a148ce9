"""Makes tests/goldens/tiny_sd/: a random-weight Stable Diffusion v1-style diffusers folder (about 1 MB).

Needs torch + diffusers + transformers (requirements-dev.txt). Run from the repo root:
    python3 tests/goldens/make_tiny_sd.py
The folder is what `StableDiffusionPipeline.save_pretrained` writes (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/), with weights in float16 to stay small: 8x8x4 latents, 32x32
images (VAE f4), a 2-layer width-32 CLIP text encoder, and a CLIP BPE tokenizer over a few hundred
tokens (the 512 byte symbols, merges that spell a small English word list, and the specials).
"""
import json
import pathlib
import shutil
import tempfile

import torch

OUT = pathlib.Path(__file__).parent / "tiny_sd"

WORDS = """a an the of on in with and or two three four small large big tiny red green blue yellow white black
orange purple pink gray circle circles square squares triangle triangles star shape shapes background photo
painting of cat dog house tree sky sun left right top bottom near far""".split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer(folder: pathlib.Path) -> int:
    """Writes a CLIP BPE tokenizer (vocab.json, merges.txt, configs) and returns its vocabulary size."""
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for w in dict.fromkeys(WORDS):  # left-to-right merges that build each word
        sym = list(w[:-1]) + [w[-1] + "</w>"]
        cur = sym[0]
        for s in sym[1:]:
            if (cur, s) not in merges:
                merges.append((cur, s))
            cur = cur + s
            if cur not in vocab:
                vocab.append(cur)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (pathlib.Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (pathlib.Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
        tok = CLIPTokenizer(str(pathlib.Path(tmp) / "vocab.json"), str(pathlib.Path(tmp) / "merges.txt"),
                            model_max_length=77)
        tok.save_pretrained(str(folder))
        for name in ("vocab.json", "merges.txt"):  # the slow-tokenizer files older tools and ours read
            shutil.copy(pathlib.Path(tmp) / name, folder / name)
    return len(vocab)


def main() -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    if OUT.exists():
        shutil.rmtree(OUT)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tokenizer(pathlib.Path(tmp))
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(tmp)
        tok_files = {f.name: f.read_bytes() for f in pathlib.Path(tmp).iterdir()}
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8, sample_size=32,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    ))
    # random weights with a non-trivial scale, so that outputs depend on every tensor
    with torch.no_grad():
        for m in (unet, vae, text):
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(str(OUT))
    for name, data in tok_files.items():  # keep vocab.json/merges.txt next to tokenizer.json
        (OUT / "tokenizer" / name).write_bytes(data)
    total = 0
    for f in sorted(OUT.rglob("*")):
        if f.is_file():
            total += f.stat().st_size
            print(f.relative_to(OUT), f.stat().st_size)
    print("total", total)


if __name__ == "__main__":
    main()
