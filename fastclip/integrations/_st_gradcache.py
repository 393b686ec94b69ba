"""The cached (GradCache) losses' gradient in ONE backward: what makes them work under DeepSpeed ZeRO.

sentence-transformers' cached losses hand their gradient to the model in a backward hook on the loss:
inside the trainer's ``engine.backward(loss)``, the hook re-embeds every mini-batch and calls
``surrogate.backward()`` once per mini-batch. Every parameter therefore receives one gradient per
mini-batch, each in a backward of its own. DeepSpeed ZeRO-2 and ZeRO-3 reduce (and partition) a
parameter's gradient when its accumulation hook fires and accept one reduction per parameter per
backward, so the second mini-batch stops the step: ``AssertionError: The parameter ... has already
been reduced. Gradient computed twice for this partition`` under ZeRO-2, a bare ``AssertionError``
in ``__reduce_and_partition_ipg_grads`` under ZeRO-3 (sentence-transformers issue 3173).

Here (``gradcache_backward="graph"``, the default under DeepSpeed) the mini-batches join the trainer's
one backward instead:

1. each mini-batch is embedded once WITH a graph, under non-reentrant activation checkpointing
   (``torch.utils.checkpoint(use_reentrant=False)``): its activations are dropped, only its inputs
   and graph stay, so the memory is still one mini-batch of activations at a time;
2. the loss over the whole batch is computed on detached copies of the embeddings and back-propagated
   to them (sentence-transformers' ``calculate_loss(..., with_backward=True)``): the cached gradients;
3. the returned loss is ``loss + sum_mb <reps_mb, cache_mb> - (the same, detached)``: its value is the
   loss, its gradient flows into every mini-batch's embeddings. ``engine.backward`` then recomputes each
   mini-batch's activations (the checkpoint; the RNG state of step 1 is replayed, so dropout draws the
   same masks) and back-propagates it, and autograd sums the mini-batches' contributions to a parameter
   before its accumulation node runs: ONE gradient per parameter per backward, which is what DeepSpeed
   (and any other hook on gradient accumulation) expects.

Compute: two forwards and one backward per mini-batch, as sentence-transformers' hook. The recomputation
calls the engine's ``module`` (ZeRO-3 gathers the parameters in its module hooks), never the engine
itself, whose ``forward`` resets its backward bookkeeping and must not run inside its own backward.

Plain PyTorch (no DeepSpeed): ``gradcache_backward="hook"`` (sentence-transformers' path) by default;
both give the same loss and gradients (``tests/test_st_deepspeed.py``).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

GRADCACHE_BACKWARDS = ("auto", "hook", "graph")


def is_deepspeed_engine(model: Any) -> bool:
    """Whether ``model`` is a ``deepspeed.DeepSpeedEngine`` (never imports deepspeed)."""
    ds = sys.modules.get("deepspeed")
    engine_cls = getattr(ds, "DeepSpeedEngine", None) if ds is not None else None
    return engine_cls is not None and isinstance(getattr(model, "_orig_mod", model), engine_cls)


def use_graph(loss: Any) -> bool:
    """The path ``loss.gradcache_backward`` asks for: True for one backward through the graph."""
    mode = loss.gradcache_backward
    if mode not in GRADCACHE_BACKWARDS:
        raise ValueError(f"gradcache_backward: expected one of {GRADCACHE_BACKWARDS}, got {mode!r}")
    if mode == "auto":
        return is_deepspeed_engine(loss.model)
    return mode == "graph"


def _st_minibatching():
    """sentence-transformers' mini-batch boundaries and slicing (``base.losses.gradcache``, >= 6.0)."""
    try:
        from sentence_transformers.base.losses.gradcache import _create_minibatch, _minibatch_ranges
    except ImportError as exc:  # 5.7 has no shared GradCache module
        raise ImportError(
            "gradcache_backward='graph' (the default under DeepSpeed) needs sentence-transformers >= 6.0 "
            f"(sentence_transformers.base.losses.gradcache: {exc})"
        ) from exc
    return _create_minibatch, _minibatch_ranges


def _checkpointed_embedding(
    model: Any, recompute_model: Any, features: dict[str, Any], state: dict
) -> Tensor:
    """(rows, D) embeddings of one mini-batch, with a graph but without activations (see the module doc).

    The feature tensors are the checkpoint's arguments, not the closure's: checkpoint stashes the RNG
    state of the devices its tensor arguments live on (CUDA dropout replays only then). They are
    cloned inside: a module may edit its inputs in place (``Pooling(include_prompt=False)`` zeroes
    prompt tokens of the attention mask), and the recomputation must see the originals.
    """
    keys = [k for k, v in features.items() if isinstance(v, Tensor)]
    rest = {k: v for k, v in features.items() if not isinstance(v, Tensor)}

    def embed(*tensors: Tensor) -> Tensor:
        inputs = {**rest, **{k: t.clone() for k, t in zip(keys, tensors)}}
        # first pass: the model as the trainer gave it (a DeepSpeed engine: its forward bookkeeping);
        # recomputation, inside the backward: the bare module
        run = recompute_model if state["recompute"] else model
        return run(inputs)["sentence_embedding"]

    return checkpoint(embed, *[features[k] for k in keys], use_reentrant=False)


def _surrogate(reps: list[list[Tensor]], cache: list[list[Tensor]]) -> Tensor:
    """sum over mini-batches of <embeddings, cached gradient>, at least in fp32 (as sentence-transformers)."""
    total = None
    for column, grads in zip(reps, cache):
        for rep, grad in zip(column, grads):
            dtype = torch.promote_types(rep.dtype, grad.dtype)
            if dtype in (torch.float16, torch.bfloat16):
                dtype = torch.float32
            term = torch.dot(rep.flatten().to(dtype), grad.flatten().to(dtype))
            total = term if total is None else total + term
    return total


def forward_graph(
    loss: Any, sentence_features: list[dict[str, Any]], labels: Tensor | None, guide: bool
) -> Tensor:
    """The cached loss's forward with its gradient in the caller's one backward (module doc).

    ``guide``: a GIST loss (``loss.guide`` embeds each mini-batch without gradient, and
    ``calculate_loss`` takes the guide's embeddings where the MNRL losses take the labels)."""
    create_minibatch, minibatch_ranges = _st_minibatching()
    model = loss.model
    recompute_model = model.module if is_deepspeed_engine(model) else model
    state = {"recompute": False}
    reps: list[list[Tensor]] = []
    guide_reps: list[list[Tensor]] = []
    for feature in sentence_features:
        ranges = minibatch_ranges(feature, loss.mini_batch_size, getattr(loss, "mini_batch_num_tokens", None))
        column, guide_column = [], []
        for begin, end in ranges:
            minibatch = create_minibatch(feature, begin, end)
            column.append(_checkpointed_embedding(model, recompute_model, minibatch, state))
            if guide:
                guide_column.append(_guide_embedding(loss, minibatch))
        reps.append(column)
        guide_reps.append(guide_column)
    state["recompute"] = True  # from here on only the backward embeds, through the bare module

    leaves = [[rep.detach().requires_grad_() for rep in column] for column in reps]
    second = guide_reps if guide else labels
    value = loss.calculate_loss(leaves, second, with_backward=True)
    cache = [[leaf.grad for leaf in column] for column in leaves]
    unused = [str(i) for i, grads in enumerate(cache) if any(g is None for g in grads)]
    if unused:
        raise ValueError(
            f"The loss computation of {type(loss).__name__} did not use input column(s) {', '.join(unused)}: "
            "their embeddings received no gradient. Remove the unused column(s) from the dataset."
        )
    surrogate = _surrogate(reps, cache)
    # value: the loss; gradient: into every mini-batch's embeddings, scaled by what the backward hands in
    return value.detach() + (surrogate - surrogate.detach()).to(value.dtype)


def _guide_embedding(loss: Any, minibatch: dict[str, Any]) -> Tensor:
    """The GIST guide's embeddings of one mini-batch, without gradient (re-tokenized if it must be)."""
    from fastclip.integrations.sentence_transformers import _guide_features

    with torch.no_grad():
        features = _guide_features(loss, minibatch) if loss.must_retokenize else dict(minibatch)
        return loss.guide(features)["sentence_embedding"].detach()
