"""Tokenizers: CLIP BPE from a folder (vs transformers' own padding/truncation), the caption-trained BPE."""
import json
import logging
import pathlib
import shutil
import time

import numpy as np
import pytest

from ldm_jax.data import shapes as S
from ldm_jax.data.tokenizers import (BPETokenizer, CLIPTokenizer, load_or_train_tokenizer, load_tokenizer,
                                     train_bpe_tokenizer)

TINY_SD = pathlib.Path(__file__).parent / "goldens" / "tiny_sd"
PROMPTS = ["a red circle", "A  Photo of an astronaut, riding a horse!", "", "Ünïcode 123 ok's"]
LONG = " ".join(["red circle"] * 60)


@pytest.fixture(scope="module")
def captions():
    spec = S.ShapesSpec()
    return [S.caption(S.sample_attributes(spec, 0, "train", i)) for i in range(2000)]


def test_clip_matches_transformers_padding_and_truncation(caplog):
    from transformers import CLIPTokenizer as HF

    tok = load_tokenizer(TINY_SD)  # a diffusers folder: its tokenizer/ is used
    assert isinstance(tok, CLIPTokenizer)
    ref = HF.from_pretrained(str(TINY_SD / "tokenizer"))
    with caplog.at_level(logging.WARNING, logger="ldm_jax.data.tokenizers"):
        ids = tok(PROMPTS + [LONG])
    want = np.asarray(ref(PROMPTS + [LONG], padding="max_length", max_length=77, truncation=True)["input_ids"])
    assert ids.dtype == np.int32 and ids.shape == (5, 77)
    np.testing.assert_array_equal(ids, want)
    assert (ids[:, 0] == tok.bos_id).all() and ids[-1, -1] == tok.eos_id
    assert ids[2, 1] == tok.eos_id and (ids[2, 2:] == tok.pad_id).all()  # "" -> BOS EOS PAD...
    assert "1 prompt(s) longer than the 77-token context were truncated" in caplog.text
    assert tok.vocab_size == len(ref)
    assert tok.decode(ids[0]) == "a red circle"
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer"):
        CLIPTokenizer(TINY_SD / "unet")


def _tokenizer_folder(dst: pathlib.Path, layout: str, pad: str | None) -> pathlib.Path:
    """tiny_sd's tokenizer as transformers 5 saves it (tokenizer.json + tokenizer_config.json) or as older
    versions did (vocab.json + merges.txt, with or without configs); `pad` overrides the config's pad token."""
    src = TINY_SD / "tokenizer"
    files = {"hf5": ["tokenizer.json", "tokenizer_config.json"], "hf4": ["vocab.json", "merges.txt",
             "tokenizer_config.json"], "bare": ["vocab.json", "merges.txt"]}[layout]
    dst.mkdir(parents=True)
    for name in files:
        shutil.copy(src / name, dst / name)
    if pad is not None:
        config = json.loads((dst / "tokenizer_config.json").read_text())
        config["pad_token"] = pad
        (dst / "tokenizer_config.json").write_text(json.dumps(config))
        if layout == "hf4":  # transformers 4 also wrote the special tokens to their own file
            specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
            (dst / "special_tokens_map.json").write_text(json.dumps(specials))
    return dst


# pad None: SD1 (pads with EOS); "!": SD2 (id 0, in the vocabulary); "<pad>": a special token not in the
# vocabulary, which transformers appends after it (id 668 here)
@pytest.mark.parametrize("layout,pad", [("hf5", None), ("hf5", "!"), ("hf5", "<pad>"), ("hf4", None),
                                        ("hf4", "!"), ("hf4", "<pad>"), ("bare", None)])
def test_transformers_folders_of_both_generations_give_transformers_ids(tmp_path, layout, pad):
    from transformers import AutoTokenizer
    from transformers import CLIPTokenizer as HF

    folder = _tokenizer_folder(tmp_path / "sd" / "tokenizer", layout, pad)
    ref = (HF if layout == "bare" else AutoTokenizer).from_pretrained(str(folder))
    texts = PROMPTS + [LONG, "a <|endoftext|> red circle"]
    want = np.asarray(ref(texts, padding="max_length", max_length=77, truncation=True)["input_ids"])
    for where in (folder, folder.parent):  # the tokenizer folder itself or the diffusers folder above it
        tok = load_tokenizer(where)
        assert isinstance(tok, CLIPTokenizer)
        np.testing.assert_array_equal(tok(texts), want)
        assert (tok.pad_id, tok.vocab_size) == (ref.pad_token_id, len(ref))
    assert tok.pad_id == {None: 667, "!": 0, "<pad>": 668}[pad]


def test_diffusers_folder_saved_by_transformers5_loads_and_samples_its_tokens(tmp_path):
    from transformers import AutoTokenizer

    from ldm_jax.pipeline import load_pretrained

    shutil.copytree(TINY_SD, tmp_path / "sd")
    for name in ("vocab.json", "merges.txt"):  # what save_pretrained writes with transformers 5
        (tmp_path / "sd" / "tokenizer" / name).unlink()
    pipe = load_pretrained(tmp_path / "sd")
    ref = AutoTokenizer.from_pretrained(str(tmp_path / "sd" / "tokenizer"))
    want = np.asarray(ref(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"])
    np.testing.assert_array_equal(pipe.tokenizer(PROMPTS), want)


def test_bpe_trains_fast_deterministically_in_clip_layout(captions):
    t0 = time.perf_counter()
    tok = train_bpe_tokenizer(captions, vocab_size=1000)
    assert time.perf_counter() - t0 < 5.0
    again = train_bpe_tokenizer(list(reversed(captions)), vocab_size=1000)  # order does not matter
    assert tok._tok.to_str() == again._tok.to_str()
    assert (tok.bos_id, tok.eos_id) == (tok.vocab_size - 2, tok.vocab_size - 1)  # highest ids, as CLIP
    ids = tok(captions[:64])
    assert ids.shape == (64, 77) and ids.dtype == np.int32
    for row, text in zip(ids, captions[:64]):
        n = int(np.argmax(row == tok.eos_id))
        assert n == len(text.split()) + 1  # every caption word is a single token after training
        assert tok.decode(row) == text
    # any text encodes (byte-level): unseen words and characters come back intact, lowercased
    odd = "A purple HEXAGON!! 東京 — naïve"
    assert tok.decode(tok([odd])[0]) == "a purple hexagon !! 東京 — naïve"
    assert tok([LONG])[0, -1] == tok.eos_id


def test_bpe_saved_and_reloaded_on_resume(tmp_path, captions):
    tok = load_or_train_tokenizer(tmp_path, lambda: captions, vocab_size=800)
    path = tmp_path / "tokenizer.json"
    assert path.is_file()

    def must_not_train():
        raise AssertionError("a resumed run must reload the saved tokenizer, not train a new one")

    again = load_or_train_tokenizer(tmp_path, must_not_train, vocab_size=800)
    np.testing.assert_array_equal(again(captions[:32]), tok(captions[:32]))
    for loaded in (load_tokenizer(path), load_tokenizer(tmp_path), BPETokenizer.load(path)):
        assert isinstance(loaded, BPETokenizer) and loaded.vocab_size == tok.vocab_size
        np.testing.assert_array_equal(loaded(PROMPTS), tok(PROMPTS))
    with pytest.raises(ValueError, match="empty"):
        train_bpe_tokenizer([])
    with pytest.raises(ValueError, match="vocab_size 300 is too small"):
        train_bpe_tokenizer(captions, vocab_size=300)
    small = train_bpe_tokenizer(captions, vocab_size=530)  # room for 15 merges: never more ids than asked
    assert small.vocab_size <= 530 and int(small(captions[:200]).max()) < 530
