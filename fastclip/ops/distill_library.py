"""The two passes of the distillation loss as ``torch.library`` custom ops, so ``torch.compile`` treats
them as opaque calls (as ``fastclip/ops/library.py`` does for the CLIP and SigLIP block primitives).

``torch.ops.fastclip.distill_stats`` and ``.distill_grad`` run one implementation ("torch" or "triton",
by the ``impl`` argument) of ``fastclip.ops.distill_impl.distill_stats_eager`` / ``distill_grad_eager``.
Each has a fake implementation giving output shapes and dtypes, so Dynamo and Inductor trace a
training step without stepping into the Python chunk loops or the Triton launchers. Custom ops cannot
return None: absent outputs (column statistics of a row-only block, gradients not asked for) are
empty ``(0,)`` tensors, turned back into None by the Python wrappers in ``fastclip/ops/distill.py``.
"""

from __future__ import annotations

import torch
from torch.library import custom_op

from fastclip.ops.dispatch import acc_dtype
from fastclip.ops.distill_impl import distill_grad_eager, distill_stats_eager
from fastclip.ops.library import _own


def _acc(x: torch.Tensor, impl: str) -> torch.dtype:
    return torch.float32 if impl == "triton" else acc_dtype(x.dtype)


def _empty(x: torch.Tensor, impl: str) -> torch.Tensor:
    return x.new_empty((0,), dtype=_acc(x, impl))


@custom_op("fastclip::distill_stats", mutates_args=())
def distill_stats_op(
    x: torch.Tensor,
    y: torch.Tensor,
    s: torch.Tensor,
    xt: torch.Tensor,
    yt: torch.Tensor,
    t: torch.Tensor,
    both: bool,
    impl: str,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out = distill_stats_eager(x, y, s, xt, yt, t, both, impl, chunk_size)
    out = tuple(_empty(x, impl) if v is None else v for v in out)
    return _own((x, y, s, xt, yt, t), out)


@distill_stats_op.register_fake
def _distill_stats_fake(x, y, s, xt, yt, t, both, impl, chunk_size):
    acc = _acc(x, impl)
    n, N = x.shape[0], y.shape[0]
    rows = [x.new_empty((n,), dtype=acc) for _ in range(3)]
    cols = [x.new_empty((N,) if both else (0,), dtype=acc) for _ in range(3)]
    return (*rows, *cols)


@custom_op("fastclip::distill_grad", mutates_args=())
def distill_grad_op(
    x: torch.Tensor,
    y: torch.Tensor,
    s: torch.Tensor,
    xt: torch.Tensor,
    yt: torch.Tensor,
    t: torch.Tensor,
    lse_s_row: torch.Tensor,
    lse_t_row: torch.Tensor,
    m_row: torch.Tensor,
    lse_s_col: torch.Tensor | None,
    lse_t_col: torch.Tensor | None,
    m_col: torch.Tensor | None,
    coefs: torch.Tensor,
    offset: int,
    need_student: bool,
    need_teacher: bool,
    impl: str,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    stats = (lse_s_row, lse_t_row, m_row, lse_s_col, lse_t_col, m_col)
    out = distill_grad_eager(
        x, y, s, xt, yt, t, stats, coefs, offset, need_student, need_teacher, impl, chunk_size
    )
    out = tuple(_empty(x, impl) if v is None else v for v in out)
    return _own((x, y, s, xt, yt, t, *(v for v in stats if v is not None), coefs), out)


@distill_grad_op.register_fake
def _distill_grad_fake(
    x, y, s, xt, yt, t, lse_s_row, lse_t_row, m_row, lse_s_col, lse_t_col, m_col, coefs, offset,
    need_student, need_teacher, impl, chunk_size,
):  # fmt: skip
    acc = _acc(x, impl)

    def shaped(shape, need):
        return x.new_empty(shape if need else (0,), dtype=acc)

    return (
        shaped(x.shape, need_student), shaped(y.shape, need_student), shaped((), need_student),
        shaped(xt.shape, need_teacher), shaped(yt.shape, need_teacher), shaped((), need_teacher),
    )  # fmt: skip
