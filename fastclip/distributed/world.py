"""The process group of a multi-rank loss: its checks (one way, at the boundary) and open_clip's gather.

A module's ``rank``/``world_size``/``group`` are checked at construction (:func:`resolve_world`); before
each multi-rank forward :func:`check_world` checks that torch.distributed is up and agrees with them;
the functional forms check ``group`` with :func:`require_process_group`. A missing process group is a
usage error: :class:`ProcessGroupError`, a ``ValueError`` (as every bad argument) that is also a
``RuntimeError`` (what earlier versions raised).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastclip import _checks, comm
from fastclip.comm import all_gather_rows, all_gather_with_grad

__all__ = [
    "ProcessGroupError",
    "Signature",
    "agree_across_ranks",
    "check_dist_impl",
    "check_world",
    "checked_on_every_rank",
    "pair_fields",
    "gather_like_open_clip",
    "require_process_group",
    "resolve_world",
    "tensor_fields",
]


class ProcessGroupError(ValueError, RuntimeError):
    """A multi-rank loss without an initialized torch.distributed."""


def require_process_group(name: str, needed_for: str) -> None:
    """Raise :class:`ProcessGroupError` naming argument ``name`` unless torch.distributed is initialized."""
    if not dist.is_available() or not dist.is_initialized():
        raise ProcessGroupError(
            f"{name}: expected an initialized torch.distributed for {needed_for}, but torch.distributed "
            "is not initialized: call torch.distributed.init_process_group(...) before the first forward"
        )


def resolve_world(group, rank, world_size) -> tuple[int, int]:
    """Checked ``(rank, world_size)``: the explicit pair, or the group's when ``group`` is given (an
    explicit pair must then be the defaults (0, 1) or agree with the group)."""
    _checks.check_int("world_size", world_size, minimum=1)
    _checks.check_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(
            f"rank: expected an int in [0, {world_size}) for world_size={world_size}, got {rank}"
        )
    if group is None:
        return rank, world_size
    require_process_group("group", "a process group")
    g_rank = dist.get_rank(group)  # -1 when this process is not a member
    if g_rank < 0:
        raise ValueError(
            f"group: expected a group that contains this process (global rank {dist.get_rank()})"
        )
    g_size = dist.get_world_size(group)
    if (rank, world_size) != (0, 1) and (rank, world_size) != (g_rank, g_size):
        raise ValueError(
            f"rank/world_size: expected the group's ({g_rank}, {g_size}) or the defaults (0, 1) when group "
            f"is given, got ({rank}, {world_size})"
        )
    return g_rank, g_size


def check_world(group, rank: int, world_size: int) -> None:
    """Before a module's multi-rank forward: torch.distributed is up and agrees with rank/world_size."""
    if group is not None:
        return  # checked by resolve_world (rank and world size came from the group)
    require_process_group("world_size", f"world_size={world_size}")
    if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise ValueError(
            f"rank/world_size: expected the default group's ({dist.get_rank()}, {dist.get_world_size()}), "
            f"got ({rank}, {world_size}); pass group= to use another process group"
        )


def check_dist_impl(dist_impl, table: tuple[str, ...]) -> str:
    """``dist_impl`` checked against the strategies of one loss (``table``)."""
    if not isinstance(dist_impl, str) or dist_impl not in table:
        raise ValueError(f"dist_impl: expected one of {table}, got {dist_impl!r}")
    return dist_impl


def gather_like_open_clip(a, b, *, local_loss, gather_with_grad, rank, group):
    """open_clip's ``gather_features`` for one (image, text) pair: ``(W·n, D)`` each, in rank order.

    With grad: a differentiable all-gather (gradients summed over ranks). Without: a plain gather,
    and for the global loss the local slot is the local tensor itself (gradients of the own rows only).
    One collective for both tensors (concatenated along the feature dim).
    """
    d = a.shape[1]
    both = torch.cat([a, b], dim=1)
    if gather_with_grad:
        gathered = all_gather_with_grad(both, group)
    else:
        gathered = all_gather_rows(both, group)
        if not local_loss:
            n = a.shape[0]
            gathered = torch.cat([gathered[: rank * n], both, gathered[(rank + 1) * n :]], dim=0)
    return gathered[:, :d], gathered[:, d:]


# ----------------------------------------------------------------------------------------------------
# the call's shape, agreed once across ranks

_SIGNATURE_SLOTS = 16  # fixed: ranks making different calls still exchange equal-sized tensors


@dataclass(frozen=True)
class Signature:
    """One integer of a call's shape that every rank must share: ``what`` names the argument (the
    user's name for it), ``show`` turns the integer back into words for the message, ``hint`` says
    what to do about a disagreement."""

    what: str
    value: int
    show: Callable[[int], str] = str
    hint: str = ""


def agree_across_ranks(
    entry: str, fields: Sequence[Signature], *, device, group=None, refused: BaseException | None = None
) -> None:
    """Raise the same ``ValueError`` on every rank of ``group`` unless all ranks pass the same ``fields``.

    Ranks whose calls differ in shape (the number of negative groups, which ids are given, the guide's
    dim, the directions, the dtype, the feature dim, the local batch ...) would otherwise run different
    collectives: a hang until the process group's timeout, a finite loss from mismatched collectives,
    or an abort inside gloo. One all-gather of ``16`` int64 per rank and one host sync; every rank
    reads the same table, so every rank raises the same message (naming every disagreeing field, by
    group rank) at the same point, and the group stays usable.

    ``refused``: this rank's own argument checks failed with that error (pass no ``fields``). It still
    joins the exchange, then raises it; the other ranks raise a ``ValueError`` naming the refusing
    ranks instead of waiting for them in the collectives that would follow.
    """
    if len(fields) >= _SIGNATURE_SLOTS - 1:
        raise AssertionError(f"agree_across_ranks: at most {_SIGNATURE_SLOTS - 2} fields, got {len(fields)}")
    world = dist.get_world_size(group)
    mine = [zlib.crc32(entry.encode()) & 0x7FFFFFFF, int(refused is not None)]
    mine += [0 if refused is not None else int(f.value) for f in fields]
    mine += [0] * (_SIGNATURE_SLOTS - len(mine))
    mine_t = torch.tensor(mine, dtype=torch.int64, device=device).reshape(1, _SIGNATURE_SLOTS)
    table = torch.empty((world, _SIGNATURE_SLOTS), dtype=torch.int64, device=device)
    comm._ALL_GATHER(table, mine_t, group=group)
    nbytes = (world - 1) * _SIGNATURE_SLOTS * 8
    comm._count("check_batch_sizes", nbytes, nbytes)
    rows = table.tolist()
    if len({r[0] for r in rows}) != 1:
        raise ValueError(
            f"{entry}: the ranks of the group are not all in {entry} (another fastclip loss on some "
            "ranks): every rank must make the same call"
        )
    refusing = [r for r, row in enumerate(rows) if row[1]]
    if refused is not None:
        raise refused
    if refusing:
        raise ValueError(
            f"{entry}: group rank(s) {refusing} refused their arguments (the error raised there says why); "
            "this rank stops too rather than wait for them in the collectives that would follow"
        )
    bad = []
    for j, f in enumerate(fields, start=2):
        values = [r[j] for r in rows]
        if len(set(values)) != 1:
            shown = "[" + ", ".join(f.show(v) for v in values) + "]"
            bad.append(f"{f.what}: {shown} by group rank" + (f" ({f.hint})" if f.hint else ""))
    if bad:
        raise ValueError(
            f"{entry}: the ranks of the group disagree on " + "; ".join(bad) + ". Every rank must make "
            "the same kind of call (only the rows' values may differ), or the collectives that follow "
            "would not match"
        )


def show_table(table):
    """A :class:`Signature`'s ``show`` for an index into ``table``."""
    return lambda v: str(table[v]) if 0 <= v < len(table) else "other"


def show_bits(names):
    """A :class:`Signature`'s ``show`` for a bit set; ``names(j)`` names bit ``j``."""

    def show(v):
        return "(" + ", ".join(str(names(j)) for j in range(v.bit_length()) if v >> j & 1) + ")"

    return show


def show_given(v):
    return "given" if v else "None"


def tensor_fields(name: str, t: torch.Tensor) -> list[Signature]:
    """The fields every rank's ``(n, D)`` rows must share: local batch, feature dim, dtype, device type."""
    n, d = t.shape
    return [
        Signature(f"{name}: local batch (rows)", n, hint="drop the last incomplete batch (drop_last=True) or pad it"),
        Signature(f"{name}: feature dim", d),
        Signature(f"{name}: dtype", comm._code(t.dtype, comm._DTYPE_CODES), show_table(comm._DTYPE_CODES),
                  hint="cast the features to one dtype on every rank"),
        Signature(f"{name}: device type", comm._code(t.device.type, comm._DEVICE_CODES),
                  show_table(comm._DEVICE_CODES)),
    ]  # fmt: skip


def pair_fields(a, dist_impl: str, impls: tuple[str, ...], **flags: bool) -> list[Signature]:
    """The fields of an (image, text) pair loss's call (CLIP, SigLIP): the image rows, whether a bias is
    given, the strategy among ``impls`` and open_clip's flags (``local_loss``, ``gather_with_grad``)."""
    return [
        *tensor_fields("image_features", a.x),
        Signature("logit_bias", int(a.bias is not None), show_given),
        Signature("dist_impl", impls.index(dist_impl), show_table(impls)),
        *(Signature(name, int(value)) for name, value in flags.items()),
    ]


def checked_on_every_rank(entry: str, build: Callable[[], tuple], *, anchor, group, check: bool):
    """The one wrapper of every multi-rank entry: ``build()`` runs the call's own checks and returns
    ``(checked, fields)``; then every rank agrees on ``fields`` (:func:`agree_across_ranks`: one
    all-gather of a few integers, skipped with ``check=False`` or a single rank). A rank whose own
    checks fail still joins the exchange and raises its error; the other ranks raise a ``ValueError``
    naming it, instead of waiting for it in the collectives that would follow. ``anchor``: the user's
    first tensor argument (its device carries the exchange when the checks refused it). Returns
    ``checked``."""
    if not check or dist.get_world_size(group) == 1:
        return build()[0]
    try:
        checked, fields = build()
    except Exception as e:
        usable = isinstance(anchor, torch.Tensor) and anchor.device.type != "meta"
        agree_across_ranks(entry, [], device=anchor.device if usable else "cpu", group=group, refused=e)
        raise  # agree_across_ranks raised e already
    agree_across_ranks(entry, fields, device=anchor.device, group=group)
    return checked
