"""The process group of a multi-rank loss: its checks (one way, at the boundary) and open_clip's gather.

A module's ``rank``/``world_size``/``group`` are checked at construction (:func:`resolve_world`); before
each multi-rank forward :func:`check_world` checks that torch.distributed is up and agrees with them;
the functional forms check ``group`` with :func:`require_process_group`. A missing process group is a
usage error: :class:`ProcessGroupError`, a ``ValueError`` (as every bad argument) that is also a
``RuntimeError`` (what earlier versions raised).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastclip import _checks
from fastclip.comm import all_gather_rows, all_gather_with_grad

__all__ = [
    "ProcessGroupError",
    "check_world",
    "gather_like_open_clip",
    "require_process_group",
    "resolve_world",
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
