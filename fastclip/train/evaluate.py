"""Evaluation: zero-shot classification and image–text retrieval.

Zero-shot: each class name is put into every prompt template ("a photo of a {}"), the normalised
text features of a class are averaged and normalised again; an image's class scores are cosines
with these class vectors. Retrieval: recall@k of the paired caption among all captions (i2t) and of
the paired image among all images (t2i); items with identical captions count as the same pair.

    metrics = evaluate(model, tokenizer, eval_set)   # {"zeroshot_top1": ..., "i2t_r1": ..., ...}
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def encode_images(model, images: torch.Tensor, batch_size: int, device, dtype) -> torch.Tensor:
    out = [
        model.encode_image(images[i : i + batch_size].to(device=device, dtype=dtype), normalize=True).float()
        for i in range(0, images.shape[0], batch_size)
    ]
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int, device) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch_size):
        ids = tokenizer(list(texts[i : i + batch_size])).to(device)
        out.append(model.encode_text(ids, normalize=True).float())
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def zeroshot_classifier(model, tokenizer, classnames, templates, batch_size, device) -> torch.Tensor:
    """(num_classes, D): mean of the normalised prompt features of each class, normalised."""
    if not classnames:
        raise ValueError(f"classnames: expected a non-empty list, got {classnames!r}")
    if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ValueError(f"templates: expected a non-empty list of strings with '{{}}', got {templates!r}")
    prompts = [t.format(c) for c in classnames for t in templates]
    feats = encode_texts(model, tokenizer, prompts, batch_size, device)
    feats = feats.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(feats, dim=-1)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """scores (N, C), labels (N,) -> {k: fraction of rows whose label is among the k best}."""
    if scores.dim() != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(
            f"labels: expected shape ({scores.shape[0]},) for scores {tuple(scores.shape)}, got {tuple(labels.shape)}"
        )
    out = {}
    for k in ks:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices
        out[k] = float((top == labels[:, None]).any(dim=1).float().mean())
    return out


def retrieval_recall(
    image_f: torch.Tensor, text_f: torch.Tensor, groups: torch.Tensor | None = None, ks=(1, 5, 10)
) -> dict:
    """Recall@k both ways for paired rows of ``image_f`` (N, D) and ``text_f`` (N, D).

    ``groups`` (N,) marks interchangeable pairs (e.g. identical captions): a retrieved item counts
    when its group equals the query's. Default: every pair is its own group.
    """
    n = image_f.shape[0]
    if text_f.shape[0] != n:
        raise ValueError(f"text_f: expected {n} rows (as image_f), got {text_f.shape[0]}")
    groups = torch.arange(n) if groups is None else groups
    sim = image_f @ text_f.T  # (N, N), evaluation sets are small
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        for k in ks:
            top = s.topk(min(k, n), dim=1).indices  # (N, k)
            hit = (groups[top] == groups[:, None]).any(dim=1)
            out[f"{name}_r{k}"] = float(hit.float().mean())
    return out


@torch.no_grad()
def evaluate(model, tokenizer, eval_set, *, batch_size: int = 256, device=None, dtype=torch.float32) -> dict:
    """Zero-shot top-1/top-5 (when the set has labels) and retrieval R@1/5/10 of one evaluation set.

    Keys are prefixed with the set's name unless it is the main set ("eval" or "heldout"):
    ``zeroshot_top1``, ``zeroshot_top5``, ``zeroshot_chance``, ``i2t_r1`` ... and e.g.
    ``seen_zeroshot_top1`` for the synthetic set of seen combinations.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        image_f = encode_images(model, eval_set.images, batch_size, device, dtype)
        text_f = encode_texts(model, tokenizer, eval_set.captions, batch_size, device)
        _, groups = _unique_groups(eval_set.captions)
        metrics = retrieval_recall(image_f, text_f, groups)
        if eval_set.labels is not None:
            classifier = zeroshot_classifier(
                model, tokenizer, eval_set.classnames, eval_set.templates, batch_size, device
            )
            acc = topk_accuracy(image_f @ classifier.T, eval_set.labels.to(image_f.device))
            metrics.update(
                zeroshot_top1=acc[1], zeroshot_top5=acc[5], zeroshot_chance=1.0 / len(eval_set.classnames)
            )
    finally:
        model.train(was_training)
    prefix = "" if eval_set.name in ("eval", "heldout") else f"{eval_set.name}_"
    return {prefix + k: v for k, v in metrics.items()}


def _unique_groups(captions):
    index, groups = {}, []
    for c in captions:
        groups.append(index.setdefault(c, len(index)))
    return index, torch.tensor(groups)


def evaluate_sets(model, tokenizer, eval_sets, *, batch_size: int, device, dtype) -> dict:
    """:func:`evaluate` over every set, merged, plus ``eval_seconds``."""
    import time

    t0 = time.time()
    metrics = {}
    for s in eval_sets:
        metrics.update(evaluate(model, tokenizer, s, batch_size=batch_size, device=device, dtype=dtype))
    metrics["eval_seconds"] = time.time() - t0
    return metrics
