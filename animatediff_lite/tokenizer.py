"""CLIP byte-level BPE tokenizer on the ``tokenizers`` library, with the CLIP vocabulary shipped in ``assets/``.

Text handling is that of SD1.5's tokenizer (transformers' ``CLIPTokenizer`` without ftfy): NFC, runs of
whitespace collapsed to one space, lowercase, the CLIP regex split (contractions, letter runs, single digits,
punctuation runs; whitespace dropped), then byte-level BPE with ``</w>`` marking word ends. Like that
tokenizer (and unlike OpenAI's reference code) it does not run ftfy or ``html.unescape``, so ``&amp;`` stays
as written.
"""

from __future__ import annotations

import functools
import gzip
import itertools
import json
import os
from collections.abc import Sequence
from importlib import resources

import torch
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
# Pieces that BPE sees: the two special tokens, English contractions, letter runs, one digit at a time,
# runs of anything that is neither space, letter nor digit. Whitespace between pieces is dropped.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
VOCAB_ASSET = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps 49152 - 256 - 2 merges: with 2 * 256 byte symbols and 2 specials the vocab is 49408.
NUM_MERGES = 49152 - 256 - 2
MAX_LENGTH = 77


def byte_alphabet() -> list[str]:
    """The 256 printable characters that stand for the bytes 0..255, in CLIP's vocabulary order.

    Printable Latin-1 bytes map to themselves and come first; the rest (controls, space, ...) map to
    ``chr(256 + n)`` in byte order and follow.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in kept] + [chr(256 + n) for n in range(256 - len(kept))]


def parse_merges(text: str, limit: int | None = None) -> list[tuple[str, str]]:
    """Merge rules ``"a b"`` per line -> [("a", "b"), ...]; the first line is a version header and skipped."""
    lines = itertools.islice((line for line in text.split("\n")[1:] if line.strip()), limit)
    merges = [tuple(line.split()) for line in lines]
    bad = next((" ".join(m) for m in merges if len(m) != 2), None)
    if bad is not None:
        raise ValueError(f"merges: expected two symbols per line, got {bad!r}")
    return merges


def vocab_from_merges(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary: bytes, bytes + ``</w>``, one entry per merge, then ``<|startoftext|>``, ``<|endoftext|>``."""
    alphabet = byte_alphabet()
    tokens = alphabet + [c + END_OF_WORD for c in alphabet] + [a + b for a, b in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}


class Tokenizer:
    """Prompts -> CLIP token ids, padded and truncated to ``max_length`` (77).

    ``Tokenizer()`` uses the shipped CLIP vocabulary (works offline); ``Tokenizer.from_files`` reads a
    diffusers ``tokenizer/`` folder's ``vocab.json`` and ``merges.txt``.
    """

    def __init__(self, vocab: dict[str, int] | None = None, merges: Sequence[tuple[str, str]] | None = None,
                 max_length: int = MAX_LENGTH):
        if (vocab is None) != (merges is None):
            raise ValueError("vocab and merges: pass both or neither (neither = the shipped CLIP vocabulary)")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for the start and end tokens), got {max_length}")
        if vocab is None:
            vocab, merges = _shipped_vocab()
        for special in (BOS, EOS):
            if special not in vocab:
                raise ValueError(f"vocab: has no {special!r} entry; expected a CLIP vocabulary")
        self.max_length = max_length
        self.bos_id = vocab[BOS]
        self.eos_id = vocab[EOS]
        self.pad_id = self.eos_id  # SD1.5 pads with <|endoftext|>
        self.vocab_size = len(vocab)
        self._tok = _build(vocab, list(merges))

    @classmethod
    def from_files(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike,
                   max_length: int = MAX_LENGTH) -> Tokenizer:
        """Read a ``vocab.json`` ({token: id}) and ``merges.txt`` (``#version`` line, then ``a b`` per line)."""
        with open(vocab_json, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_txt, encoding="utf-8") as f:
            merges = parse_merges(f.read())
        return cls(vocab, merges, max_length=max_length)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens, padding or truncation."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """A prompt or a list of n prompts -> LongTensor (n, max_length).

        Each row is ``bos, tokens[:max_length - 2], eos`` padded with ``pad_id`` (= eos), so the end token
        is always present and last before the padding.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("texts: expected a prompt or a non-empty list of prompts, got an empty list")
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise ValueError(f"texts: every prompt must be a str, got {bad[0]}")
        room = self.max_length - 2
        out = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for row, enc in enumerate(self._tok.encode_batch(texts, add_special_tokens=False)):
            ids = [self.bos_id, *enc.ids[:room], self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Token ids (one row) -> text, special tokens dropped and word ends turned into spaces."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = self._tok.decode(list(ids), skip_special_tokens=True)
        return text.replace(END_OF_WORD, " ").strip()


def _build(vocab: dict[str, int], merges: list[tuple[str, str]]) -> _HFTokenizer:
    tok = _HFTokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD,
                           fuse_unk=False, unk_token=EOS))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    # ByteLevel's own GPT-2 split only changes a piece written like a special token in another case
    # ("<|EndOfText|>" -> "<|", "endoftext", "|>"); SD1.5's tokenizer does the same, so keep it.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    # Written in a prompt, the special tokens are matched before normalisation, as SD1.5's tokenizer does.
    tok.add_special_tokens([AddedToken(BOS, special=True, normalized=False),
                            AddedToken(EOS, special=True, normalized=False)])
    return tok


def _read_asset(name: str) -> str:
    data = resources.files("animatediff_lite").joinpath("assets").joinpath(name).read_bytes()
    return gzip.decompress(data).decode("utf-8")


@functools.cache
def _shipped_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    # Parsed once per process; callers only read it (_build copies into the Rust tokenizer).
    merges = parse_merges(_read_asset(VOCAB_ASSET), limit=NUM_MERGES)
    return vocab_from_merges(merges), merges
