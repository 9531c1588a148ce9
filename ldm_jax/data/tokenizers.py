"""Tokenizers with one interface: `tok(texts) -> np.int32 (B, max_length)`, `.vocab_size`, `.pad_id`, `.eos_id`.

Sequences are `[BOS] tokens [EOS] [PAD]...` as CLIP expects; a text longer than the context is cut
to `max_length - 1` tokens plus EOS, with a warning. Two kinds:
- `CLIPTokenizer`: any tokenizer folder transformers opens (a diffusers folder's `tokenizer/`, saved by
  transformers 4 or 5), via transformers, so ids equal transformers'.
- `BPETokenizer`: a byte-level BPE in CLIP's layout trained on a dataset's captions with the
  `tokenizers` library, saved as WORKDIR/tokenizer.json and reloaded from there on resume.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "<pad>"
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class _Base:
    """Adds BOS/EOS, truncates (warning once per call) and pads the ids of a subclass' `_encode`."""

    max_length: int
    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int

    def _encode(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """int32 (B, max_length) token ids."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        out = np.full((len(texts), self.max_length), self.pad_id, np.int32)
        room = self.max_length - 2
        too_long = []
        for i, ids in enumerate(self._encode(texts)):
            if len(ids) > room:
                too_long.append((texts[i], len(ids)))
                ids = ids[:room]
            row = [self.bos_id, *ids, self.eos_id]
            out[i, :len(row)] = row
        if too_long:
            text, n = too_long[0]
            log.warning("%d prompt(s) longer than the %d-token context were truncated, e.g. %r (%d tokens, "
                        "kept %d)", len(too_long), self.max_length, text[:120], n + 2, self.max_length)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of one row of ids (special tokens dropped)."""
        raise NotImplementedError


# Files that make a folder a transformers tokenizer: transformers >= 5 saves tokenizer.json + tokenizer_config.json
# only; older versions (and SD folders made with them) have vocab.json + merges.txt, with or without the config.
_HF_MARKERS = ("tokenizer_config.json", "vocab.json")


def _is_transformers_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in _HF_MARKERS)


class CLIPTokenizer(_Base):
    """A tokenizer folder that transformers opens (a diffusers folder or its tokenizer/), with transformers' ids.

    With a tokenizer_config.json the folder's own class, special tokens and pad token are used through
    `AutoTokenizer` (SD1 pads with EOS, SD2 with "!"; a special token missing from the vocabulary is
    added after it, as transformers does); a bare vocab.json + merges.txt is CLIP's BPE with its defaults.
    """

    def __init__(self, path: str | os.PathLike, max_length: int = 77):
        from transformers import AutoTokenizer
        from transformers import CLIPTokenizer as HFCLIPTokenizer

        path = Path(path).expanduser()
        if not _is_transformers_folder(path) and _is_transformers_folder(path / "tokenizer"):
            path = path / "tokenizer"
        if (path / "tokenizer_config.json").is_file():
            self._tok = AutoTokenizer.from_pretrained(os.fspath(path))
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            self._tok = HFCLIPTokenizer.from_pretrained(os.fspath(path))
        else:
            raise FileNotFoundError(f"no CLIP tokenizer in {path}: expected tokenizer.json + tokenizer_config.json "
                                    "(transformers >= 5) or vocab.json + merges.txt (there or in its tokenizer/ "
                                    "subfolder)")
        self.max_length = max_length
        self.bos_id, self.eos_id = self._tok.bos_token_id, self._tok.eos_token_id
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"tokenizer in {path} has no BOS or EOS token (bos={self._tok.bos_token!r}, "
                             f"eos={self._tok.eos_token!r}); a CLIP text encoder needs both")
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self._tok)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self._tok(texts, add_special_tokens=False, truncation=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


class BPETokenizer(_Base):
    """A `tokenizers.Tokenizer` in CLIP's layout; BOS and EOS are the two highest ids (like CLIP's)."""

    def __init__(self, tokenizer, max_length: int = 77):
        self._tok = tokenizer
        self.max_length = max_length
        ids = {t: tokenizer.token_to_id(t) for t in (BOS, EOS, PAD)}
        if None in ids.values():
            raise ValueError(f"tokenizer lacks special tokens {[t for t, i in ids.items() if i is None]}")
        self.bos_id, self.eos_id, self.pad_id = ids[BOS], ids[EOS], ids[PAD]
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def load(cls, path: str | os.PathLike, max_length: int = 77) -> "BPETokenizer":
        """Loads a tokenizer.json written by `save`."""
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(os.fspath(path)), max_length)

    def save(self, path: str | os.PathLike) -> None:
        """Writes tokenizer.json atomically (a crash never leaves half a file for the resume to read)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        self._tok.save(os.fspath(tmp))
        os.replace(tmp, path)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True).replace("</w>", " ").strip()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters (the BPE base alphabet, in CLIP's order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 8192, max_length: int = 77) -> BPETokenizer:
    """Byte-level BPE in CLIP's layout trained on `texts`; stops early once every word is one token.

    The trainer only learns the merges: the vocabulary is then laid out as CLIP's (256 byte symbols,
    the same with "</w>", one token per merge, then PAD, BOS, EOS), so every byte sequence is
    encodable and ids do not depend on the trainer's hash-map order: the same captions (in any
    order) always give the same tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    def fresh(model) -> Tokenizer:
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        return tok

    alphabet = list(bytes_to_unicode().values())
    if vocab_size < 2 * len(alphabet) + 3:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE: it needs at least "
                         f"{2 * len(alphabet) + 3} (256 byte symbols, the same ending a word, PAD, BOS, EOS)")
    corpus = sorted(set(texts))
    if not corpus:
        raise ValueError("cannot train a tokenizer on an empty list of captions")
    n_merges = max(vocab_size - 2 * len(alphabet) - 3, 0)
    trainer = trainers.BpeTrainer(vocab_size=2 * len(alphabet) + n_merges, min_frequency=1, initial_alphabet=alphabet,
                                  end_of_word_suffix="</w>", show_progress=False)
    learner = fresh(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    learner.train_from_iterator(corpus, trainer=trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(learner.to_str())["model"]["merges"]][:n_merges]
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for special in (PAD, BOS, EOS):
        vocab[special] = len(vocab)
    tok = fresh(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.add_special_tokens([PAD, BOS, EOS])
    return BPETokenizer(tok, max_length)


def load_or_train_tokenizer(workdir: str | os.PathLike, texts: Callable[[], Iterable[str]],
                            vocab_size: int = 8192, max_length: int = 77) -> BPETokenizer:
    """WORKDIR/tokenizer.json if it exists (resume), else one trained on `texts()` and saved there."""
    import jax

    path = Path(workdir).expanduser() / "tokenizer.json"
    if path.is_file():
        log.info("loading tokenizer %s", path)
        return BPETokenizer.load(path, max_length)
    tok = train_bpe_tokenizer(texts(), vocab_size, max_length)
    if jax.process_index() == 0:  # every process trains the same tokenizer; one writes it
        tok.save(path)
        log.info("trained a %d-token BPE tokenizer on the captions; saved %s", tok.vocab_size, path)
    return tok


def load_tokenizer(path: str | os.PathLike, max_length: int = 77) -> CLIPTokenizer | BPETokenizer:
    """A tokenizer from a folder transformers opens (see `CLIPTokenizer`), or our tokenizer.json (a file or a
    training workdir holding one, recognised by having no transformers config next to it)."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".json":
        return BPETokenizer.load(path, max_length)
    if (path / "tokenizer.json").is_file() and not _is_transformers_folder(path) \
            and not _is_transformers_folder(path / "tokenizer"):
        return BPETokenizer.load(path / "tokenizer.json", max_length)
    return CLIPTokenizer(path, max_length)
