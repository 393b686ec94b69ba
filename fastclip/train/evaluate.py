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

from fastclip import _checks


@torch.no_grad()
def encode_images(model, images: torch.Tensor, batch_size: int, device, dtype) -> torch.Tensor:
    """(N, D) float32 normalised image features, ``batch_size`` images at a time on ``device``."""
    _checks.check_int("batch_size", batch_size, minimum=1)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a non-empty (N, C, H, W) tensor, got {got}")
    out = [
        model.encode_image(images[i : i + batch_size].to(device=device, dtype=dtype), normalize=True).float()
        for i in range(0, images.shape[0], batch_size)
    ]
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int, device) -> torch.Tensor:
    """(N, D) float32 normalised text features, ``batch_size`` texts at a time on ``device``."""
    _checks.check_int("batch_size", batch_size, minimum=1)
    if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) == 0:
        raise ValueError(f"texts: expected a non-empty list of str, got {type(texts).__name__}")
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


def _check_ks(ks) -> tuple:
    if not isinstance(ks, (tuple, list)) or not ks:
        raise ValueError(f"ks: expected a non-empty tuple of positive ints, got {ks!r}")
    for k in ks:
        _checks.check_int("ks", k, minimum=1)
    return tuple(ks)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """scores (N, C), labels (N,) -> {k: fraction of rows whose label is among the k best}.

    ``labels`` may live on another device than ``scores`` (host labels beside GPU scores): they are
    moved to the scores' device."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores: expected a 2-D (N, C) tensor, got {got}")
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex:
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"labels: expected an integer tensor of class indices, got {got}")
    if labels.shape != (scores.shape[0],):
        raise ValueError(
            f"labels: expected shape ({scores.shape[0]},) for scores {tuple(scores.shape)}, got {tuple(labels.shape)}"
        )
    ks = _check_ks(ks)
    labels = labels.to(scores.device)
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
    when its group equals the query's. Default: every pair is its own group. ``groups`` may live on
    another device than the features (host groups beside GPU features): it is moved to theirs, and
    every tensor made here is made on the features' device.
    """
    _checks.check_features(image_f, text_f, name_a="image_f", name_b="text_f")
    n = image_f.shape[0]
    if groups is None:
        groups = torch.arange(n, device=image_f.device)
    elif not isinstance(groups, torch.Tensor):
        raise TypeError(f"groups: expected a tensor of shape ({n},) or None, got {type(groups).__name__}")
    elif groups.shape != (n,):
        raise ValueError(f"groups: expected shape ({n},) (one group per pair), got {tuple(groups.shape)}")
    ks = _check_ks(ks)
    groups = groups.to(image_f.device)
    sim = image_f @ text_f.T  # (N, N), evaluation sets are small
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        for k in ks:
            top = s.topk(min(k, n), dim=1).indices  # (N, k), on the features' device
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
    _checks.check_int("batch_size", batch_size, minimum=1)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    _check_eval_set(eval_set)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        image_f = encode_images(model, eval_set.images, batch_size, device, dtype)
        text_f = encode_texts(model, tokenizer, eval_set.captions, batch_size, device)
        # built where the features are: the model's device, whatever the default device
        _, groups = _unique_groups(eval_set.captions, image_f.device)
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


def _check_eval_set(eval_set) -> None:
    images, captions = getattr(eval_set, "images", None), getattr(eval_set, "captions", None)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not isinstance(captions, (list, tuple)):
        raise TypeError(
            "eval_set: expected an EvalSet (images (N, C, H, W) tensor, captions list of N str), got "
            f"{type(eval_set).__name__}"
        )
    if images.shape[0] != len(captions) or not captions:
        raise ValueError(
            f"eval_set: expected as many images as captions (> 0), got {images.shape[0]} images and "
            f"{len(captions)} captions"
        )


def _unique_groups(captions, device=None):
    """(caption -> group, groups (N,) int64 on ``device``): identical captions share a group."""
    index, groups = {}, []
    for c in captions:
        groups.append(index.setdefault(c, len(index)))
    return index, torch.tensor(groups, dtype=torch.int64, device=device)


def evaluate_sets(model, tokenizer, eval_sets, *, batch_size: int, device, dtype) -> dict:
    """:func:`evaluate` over every set, merged, plus ``eval_seconds``."""
    import time

    if not isinstance(eval_sets, (list, tuple)):
        raise TypeError(f"eval_sets: expected a list of EvalSet, got {type(eval_sets).__name__}")
    t0 = time.time()
    metrics = {}
    for s in eval_sets:
        metrics.update(evaluate(model, tokenizer, s, batch_size=batch_size, device=device, dtype=dtype))
    metrics["eval_seconds"] = time.time() - t0
    return metrics
