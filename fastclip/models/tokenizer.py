"""Tokenizers: a small built-in word-level tokenizer for synthetic data and tests, and a loader for
Hugging Face tokenizers saved in a local directory (nothing is downloaded).

    tok = WordTokenizer(["red", "green", "square", "circle"], context_length=16)
    ids = tok(["a red square", "green circle"])      # LongTensor (2, 16)

WordTokenizer ids: 0 = pad, 1 = unk, 2 = start of text, 3.. = the words in the order given, and the
end-of-text token last (``vocab_size - 1``), so it is the largest id in every row and argmax pooling
finds it. Text is lower-cased and split on whitespace and punctuation. A text with more words than
fit is truncated: the row keeps start, the first ``context_length - 2`` words and the end token.
"""

from __future__ import annotations

import html
import json
import os
import re
import string
from typing import Iterable, Sequence

import torch

_SPLIT = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")


class WordTokenizer:
    PAD, UNK, SOT = 0, 1, 2

    def __init__(self, words: Iterable[str], context_length: int = 16):
        if isinstance(words, str):
            raise TypeError("words: expected an iterable of words, got a single str")
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise ValueError(
                f"context_length: expected an int >= 2 (start and end tokens), got {context_length!r}"
            )
        vocab: dict[str, int] = {}
        for w in words:
            if not isinstance(w, str) or not w:
                raise TypeError(f"words: expected non-empty str entries, got {w!r}")
            w = w.lower()
            if w not in vocab:
                vocab[w] = 3 + len(vocab)
        self.vocab = vocab
        self.context_length = context_length
        self.eot_id = 3 + len(vocab)
        self.vocab_size = self.eot_id + 1
        self.pad_id, self.unk_id, self.sot_id = self.PAD, self.UNK, self.SOT

    def encode(self, text: str) -> list[int]:
        """Ids of one text without padding: [start, words..., end], truncated to the context."""
        if not isinstance(text, str):
            raise TypeError(f"texts: expected str entries, got {type(text).__name__}")
        ids = [self.vocab.get(w, self.UNK) for w in _SPLIT.findall(text.lower())]
        return [self.SOT, *ids[: self.context_length - 2], self.eot_id]

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts: expected a list of str, got {type(texts).__name__}")
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = self.encode(t)
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids) -> str:
        inv = {v: k for k, v in self.vocab.items()}
        words = []
        for i in ids.tolist() if isinstance(ids, torch.Tensor) else ids:
            if i == self.eot_id:
                break
            if i in (self.PAD, self.SOT):
                continue
            words.append(inv.get(i, "<unk>"))
        return " ".join(words)


_PUNCT = str.maketrans("", "", string.punctuation)


def clean_text(text: str, mode: str) -> str:
    """open_clip's text cleaning before tokenizing: "none"; "whitespace" (HTML entities unescaped, runs of
    whitespace collapsed); "lower" (and lower-cased); "canonicalize" (and punctuation removed, "_" read as a
    space, as big_vision and open_clip's SigLIP tokenizers do). open_clip also runs ``ftfy`` when
    installed; fastclip does not."""
    if mode == "none":
        return text
    text = html.unescape(html.unescape(text)).strip()
    if mode == "canonicalize":
        text = text.replace("_", " ").translate(_PUNCT)
    if mode in ("lower", "canonicalize"):
        text = text.lower()
    return " ".join(text.split())


class HFTokenizer:
    """A Hugging Face tokenizer from a local directory, called like WordTokenizer: list[str] -> (B, context_length)
    LongTensor, padded to the context length with the tokenizer's pad id (else 0) and truncated (the
    tokenizer's own truncation keeps its special tokens, so the end token stays the last id). ``clean``:
    see :func:`clean_text`."""

    def __init__(self, path: str, context_length: int, clean: str = "none"):
        if not os.path.isdir(path) and not os.path.isfile(path):
            raise ValueError(
                f"path: expected a local tokenizer directory or tokenizer.json, got {path!r} (not found)"
            )
        if clean not in ("none", "whitespace", "lower", "canonicalize"):
            raise ValueError(
                f"clean: expected 'none', 'whitespace', 'lower' or 'canonicalize', got {clean!r}"
            )
        self.clean = clean
        self.context_length = context_length
        self._hf = None
        self._tok = None
        tok_json = path if os.path.isfile(path) else os.path.join(path, "tokenizer.json")
        if os.path.isfile(tok_json):  # a broken file is named here, not as a parser's bare message
            from fastclip.models.jsonfile import read_json_object

            read_json_object(tok_json, "a tokenizer (a JSON object, as tokenizers' Tokenizer.save writes)")
        try:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(
                path if os.path.isdir(path) else os.path.dirname(path), local_files_only=True
            )
        except Exception as exc:  # transformers missing or an unusual directory: fall back to `tokenizers`
            if not os.path.isfile(tok_json):
                raise ValueError(f"path: could not load a tokenizer from {path!r}: {exc}") from exc
            from tokenizers import Tokenizer

            try:
                self._tok = Tokenizer.from_file(tok_json)
            except Exception as exc:  # tokenizers raises a bare Exception for files it cannot read
                raise ValueError(
                    f"{tok_json}: not a tokenizer file the tokenizers library reads ({exc})"
                ) from exc
            self._tok.enable_truncation(context_length)
            pad = self._tok.token_to_id(_pad_token(os.path.dirname(tok_json)) or "<pad>")
            self._tok.enable_padding(length=context_length, pad_id=0 if pad is None else pad)
        self.vocab_size = len(self._hf) if self._hf is not None else self._tok.get_vocab_size()

    def __call__(self, texts) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts: expected a str or a list of str, got {type(texts).__name__}")
        texts = [clean_text(t, self.clean) for t in texts]
        if self._hf is not None:
            rows = self._hf(list(texts), truncation=True, max_length=self.context_length)["input_ids"]
            pad = self._hf.pad_token_id if self._hf.pad_token_id is not None else 0
            out = torch.full((len(rows), self.context_length), pad, dtype=torch.long)
            for i, r in enumerate(rows):
                out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            return out
        return torch.tensor([e.ids for e in self._tok.encode_batch(list(texts))], dtype=torch.long)


def _pad_token(directory: str) -> str | None:
    """The pad token named by a saved tokenizer's special_tokens_map.json / tokenizer_config.json."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            with open(os.path.join(directory, name)) as f:
                pad = json.load(f).get("pad_token")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str):
            return pad
    return None


# a training run's word vocabulary (data.tokenizer auto): one word per line, in id order
WORD_VOCAB = "vocab.txt"


def has_word_vocab(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, WORD_VOCAB))


def load_word_tokenizer(directory: str, context_length: int | None = None) -> WordTokenizer:
    """The :class:`WordTokenizer` a ``fastclip train`` run used (synthetic or CSV data with
    ``data.tokenizer: auto``): the words of ``DIR/vocab.txt`` in their order (ids 3, 4, ...), and the
    context length of the run's ``model_config.json`` unless ``context_length`` is given."""
    path = os.path.join(os.fspath(directory), WORD_VOCAB)
    try:
        with open(path, encoding="utf-8") as f:
            words = [w for w in f.read().split("\n") if w]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable word vocabulary ({exc})") from None
    if not words or any(w != w.strip() or w.lower() != w for w in words) or len(set(words)) != len(words):
        raise ValueError(
            f"{path}: expected distinct lower-case words, one per line, as fastclip train writes"
        )
    if context_length is None:
        config = os.path.join(os.fspath(directory), "model_config.json")
        try:
            with open(config, encoding="utf-8") as f:
                context_length = json.load(f)["text"]["context_length"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path}: the context length comes from {config}, which is missing or unreadable "
                f"({type(exc).__name__}: {exc}); pass context_length="
            ) from None
    return WordTokenizer(words, context_length=context_length)


def load_tokenizer(path: str, context_length: int = 77) -> HFTokenizer:
    """A tokenizer saved by Hugging Face (``save_pretrained`` directory or a ``tokenizer.json``), local only."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a path, got {type(path).__name__}")
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length: expected a positive int, got {context_length!r}")
    return HFTokenizer(os.fspath(path), context_length)
