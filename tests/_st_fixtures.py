"""Tiny offline sentence-transformers models and batches for the integration's parity tests.

A randomly initialised 2-layer BERT (hidden 32) with a word-level vocabulary written here, wrapped as
``SentenceTransformer(modules=[Transformer(dir), Pooling(32, "mean")])``: no download, a few ms per
forward. ``run_loss`` returns the loss and every parameter's gradient of one forward + backward.
"""

from __future__ import annotations

import os
import random

import torch

WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
    "quebec romeo sierra tango uniform victor whiskey xray yankee zulu red green blue black white grey "
    "cat dog bird fish horse cow sheep goat river lake sea hill tree stone road bridge house city town "
    "runs walks swims flies sleeps eats reads writes sings jumps big small old new fast slow warm cold"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_model_dir(
    path: str, seed: int = 0, hidden: int = 32, dropout: float = 0.0, vocab_order=None
) -> str:
    """Write a tokenizer and a random BertModel to ``path`` (``vocab_order``: a permutation of WORDS,
    giving a different vocabulary, so a guide model must re-tokenize)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    os.makedirs(path, exist_ok=True)
    words = list(WORDS) if vocab_order is None else list(vocab_order)
    vocab = {token: i for i, token in enumerate(SPECIAL + words)}
    BertTokenizerFast(vocab=vocab, do_lower_case=True).save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(SPECIAL) + len(words),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertModel(config).save_pretrained(path)
    return path


def load_model(path: str, hidden: int = 32):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    model = SentenceTransformer(
        modules=[Transformer(path, max_seq_length=32), Pooling(hidden, "mean")], device="cpu"
    )
    model.train()
    return model


def sentences(n: int, seed: int) -> list[str]:
    """``n`` distinct random sentences of 3-9 words (distinct: no exact ties in the guide's mask)."""
    rng = random.Random(seed)
    out: list[str] = []
    seen = set()
    while len(out) < n:
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def batch(model, n: int, columns: int, seed: int = 0) -> list[dict]:
    """``columns`` tokenized columns of ``n`` rows (anchor, positive, negatives...), all texts distinct."""
    texts = sentences(n * columns, seed)
    return [model.preprocess(texts[c * n : (c + 1) * n]) for c in range(columns)]


def run_loss(loss, model, features, seed: int = 0, backward: bool = True):
    """(loss value, {name: grad}) of one forward + backward of ``loss`` on fresh copies of ``features``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    random.seed(seed)  # AdaptiveLayerLoss and MatryoshkaLoss(n_dims_per_step) sample with Python's random
    value = loss([dict(f) for f in features], None)
    if backward:
        value.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return value.detach().double(), grads


def compare(name, got, ref, rtol: float, atol: float) -> list[str]:
    """Failure lines (empty when equal within tolerance): loss and every gradient, worst element."""
    g_loss, g_grads = got
    r_loss, r_grads = ref
    out = []
    if not torch.isfinite(r_loss):
        out.append(f"{name}: reference loss is not finite ({r_loss.item()})")
    if abs(g_loss.item() - r_loss.item()) > atol + rtol * abs(r_loss.item()):
        out.append(f"{name}: loss {g_loss.item():.9g} vs sentence-transformers {r_loss.item():.9g}")
    if set(g_grads) != set(r_grads):
        out.append(f"{name}: gradients of {sorted(set(g_grads) ^ set(r_grads))} on one side only")
    for key in sorted(set(g_grads) & set(r_grads)):
        g, r = g_grads[key].double(), r_grads[key].double()
        scale = r.abs().max().item()
        err = (g - r).abs()
        if err.max().item() > atol + rtol * scale:
            idx = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
            out.append(
                f"{name}: grad {key} max |diff| {err.max().item():.3g} at {idx} (grad max {scale:.3g})"
            )
    return out
