"""The block primitives as ``torch.library`` custom ops, so ``torch.compile`` treats them as opaque calls.

``torch.ops.fastclip.clip_lse``, ``.clip_grad`` and ``.siglip_block`` run one implementation ("torch" or
"triton", chosen by the ``impl`` string argument) of the block primitives: ``fastclip.ops.torch_impl``
or the Triton launchers of ``fastclip.kernels``. Each has a fake (meta) implementation giving output shapes and dtypes, so
Dynamo and Inductor trace a training step that calls ``fastclip.clip_loss``/``siglip_loss`` without
stepping into Python chunk loops or Triton launchers. The autograd ``Function``s call these ops with
detached inputs; gradients are formed explicitly by ``clip_grad``/``siglip_block``.

``torch.ops.fastclip.distill_stats`` and ``.distill_grad`` are the two passes of the distillation loss
(``fastclip/ops/distill.py`` states the math) over ``fastclip.ops.distill_impl`` or
``fastclip.kernels.distill``, on the same terms.

Custom ops cannot return None: ``siglip_block`` returns empty ``(0,)`` tensors for ``dx, dy`` when
``need_grad`` is False, the distillation passes for absent outputs (column statistics of a row-only
block, gradients not asked for), and the Python wrappers in ``fastclip/ops/blocks.py`` turn them back
into None.
"""

import torch
from torch.library import custom_op

from fastclip.ops import distill_impl, torch_impl
from fastclip.ops.dispatch import acc_dtype


def clip_lse_impl(x, y, scale, impl, chunk_size):
    """The eager body of ``clip_lse``: the Triton launcher or the chunked PyTorch code."""
    if impl == "triton":
        from fastclip.kernels.clip import clip_lse

        return clip_lse(x, y, scale)
    return torch_impl.clip_lse_torch(x, y, scale, chunk_size)


def clip_grad_impl(x, y, scale, lse_row, lse_col, coef_row, coef_col, offset, pos_coef, impl, chunk_size):
    """The eager body of ``clip_grad``."""
    if impl == "triton":
        from fastclip.kernels.clip import clip_grad

        return clip_grad(x, y, scale, lse_row, lse_col, coef_row, coef_col, offset, pos_coef)
    return torch_impl.clip_grad_torch(
        x, y, scale, lse_row, lse_col, coef_row, coef_col, offset, pos_coef, chunk_size
    )


def siglip_block_impl(x, y, scale, bias, offset, need_grad, impl, chunk_size):
    """The eager body of ``siglip_block`` (``dx, dy`` None without ``need_grad``)."""
    if impl == "triton":
        from fastclip.kernels.siglip import siglip_block

        return siglip_block(x, y, scale, bias, offset, need_grad)
    return torch_impl.siglip_block_torch(x, y, scale, bias, offset, need_grad, chunk_size)


def _own(inputs, outputs):
    """Copy any output that shares storage with an input or an earlier output.

    Outputs of a custom op may not alias its inputs or each other, and the launchers may return
    views of one buffer (several scalars of one partial-sum tensor). Storage pointers, not ``_base``,
    decide: below autograd (as inside a compiled graph) views carry no ``_base``.
    """
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    owned = []
    for t in outputs:
        ptr = t.untyped_storage().data_ptr()
        if ptr != 0 and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        owned.append(t)
    return tuple(owned)


@custom_op("fastclip::clip_lse", mutates_args=())
def clip_lse_op(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, impl: str, chunk_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return _own((x, y, scale), clip_lse_impl(x, y, scale, impl, chunk_size))


@clip_lse_op.register_fake
def _clip_lse_fake(x, y, scale, impl, chunk_size):
    acc = acc_dtype(x.dtype)
    return x.new_empty((x.shape[0],), dtype=acc), y.new_empty((y.shape[0],), dtype=acc)


@custom_op("fastclip::clip_grad", mutates_args=())
def clip_grad_op(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    lse_row: torch.Tensor | None,
    lse_col: torch.Tensor | None,
    coef_row: float,
    coef_col: float,
    offset: int | None,
    pos_coef: float,
    impl: str,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dy, ds = clip_grad_impl(
        x, y, scale, lse_row, lse_col, coef_row, coef_col, offset, pos_coef, impl, chunk_size
    )
    return _own((x, y, scale, lse_row, lse_col), (dx, dy, ds))


@clip_grad_op.register_fake
def _clip_grad_fake(x, y, scale, lse_row, lse_col, coef_row, coef_col, offset, pos_coef, impl, chunk_size):
    acc = acc_dtype(x.dtype)
    return x.new_empty(x.shape, dtype=acc), y.new_empty(y.shape, dtype=acc), x.new_empty((), dtype=acc)


@custom_op("fastclip::siglip_block", mutates_args=())
def siglip_block_op(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    offset: int | None,
    need_grad: bool,
    impl: str,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    total, dx, dy, ds, db = siglip_block_impl(x, y, scale, bias, offset, need_grad, impl, chunk_size)
    if dx is None:
        acc = acc_dtype(x.dtype)
        dx, dy = x.new_empty((0,), dtype=acc), x.new_empty((0,), dtype=acc)
    return _own((x, y, scale, bias), (total, dx, dy, ds, db))


@siglip_block_op.register_fake
def _siglip_block_fake(x, y, scale, bias, offset, need_grad, impl, chunk_size):
    acc = acc_dtype(x.dtype)
    if need_grad:
        dx, dy = x.new_empty(x.shape, dtype=acc), y.new_empty(y.shape, dtype=acc)
    else:
        dx, dy = x.new_empty((0,), dtype=acc), x.new_empty((0,), dtype=acc)
    return x.new_empty((), dtype=acc), dx, dy, x.new_empty((), dtype=acc), x.new_empty((), dtype=acc)


def distill_stats_impl(x, y, s, xt, yt, t, both, impl, chunk_size):
    """The eager body of ``distill_stats`` (pass 1): ``(lse_s_row, lse_t_row, m_row, lse_s_col,
    lse_t_col, m_col)``, the column entries None unless ``both``."""
    if impl == "triton":
        from fastclip.kernels.distill import distill_stats

        return distill_stats(x, y, s, xt, yt, t, both)
    return distill_impl.distill_stats_torch(x, y, s, xt, yt, t, both, chunk_size)


def distill_grad_impl(
    x, y, s, xt, yt, t, lse_s_row, lse_t_row, m_row, lse_s_col, lse_t_col, m_col, coefs, offset,
    need_student, need_teacher, impl, chunk_size,
):  # fmt: skip
    """The eager body of ``distill_grad`` (pass 2): ``(dx, dy, ds, dxt, dyt, dt)``, None where not needed."""
    stats = (lse_s_row, lse_t_row, m_row, lse_s_col, lse_t_col, m_col)
    if impl == "triton":
        from fastclip.kernels.distill import distill_grad

        return distill_grad(x, y, s, xt, yt, t, stats, coefs, offset, need_student, need_teacher)
    return distill_impl.distill_grad_torch(
        x, y, s, xt, yt, t, stats, coefs, offset, need_student, need_teacher, chunk_size
    )


def _distill_acc(x: torch.Tensor, impl: str) -> torch.dtype:
    # The distillation kernels accumulate in float32 whatever the input dtype.
    return torch.float32 if impl == "triton" else acc_dtype(x.dtype)


def _distill_empty(x: torch.Tensor, impl: str) -> torch.Tensor:
    return x.new_empty((0,), dtype=_distill_acc(x, impl))


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
    out = distill_stats_impl(x, y, s, xt, yt, t, both, impl, chunk_size)
    out = tuple(_distill_empty(x, impl) if v is None else v for v in out)
    return _own((x, y, s, xt, yt, t), out)


@distill_stats_op.register_fake
def _distill_stats_fake(x, y, s, xt, yt, t, both, impl, chunk_size):
    acc = _distill_acc(x, impl)
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
    out = distill_grad_impl(
        x, y, s, xt, yt, t, *stats, coefs, offset, need_student, need_teacher, impl, chunk_size
    )
    out = tuple(_distill_empty(x, impl) if v is None else v for v in out)
    return _own((x, y, s, xt, yt, t, *(v for v in stats if v is not None), coefs), out)


@distill_grad_op.register_fake
def _distill_grad_fake(
    x, y, s, xt, yt, t, lse_s_row, lse_t_row, m_row, lse_s_col, lse_t_col, m_col, coefs, offset,
    need_student, need_teacher, impl, chunk_size,
):  # fmt: skip
    acc = _distill_acc(x, impl)

    def shaped(shape, need):
        return x.new_empty(shape if need else (0,), dtype=acc)

    return (
        shaped(x.shape, need_student), shaped(y.shape, need_student), shaped((), need_student),
        shaped(xt.shape, need_teacher), shaped(yt.shape, need_teacher), shaped((), need_teacher),
    )  # fmt: skip


def family_impl(spec_json, ts, ids, guides, thr, scale, need, need_scale, impl, chunk_size):
    """The eager body of ``family``: ``[loss, ds, *grads]`` (an empty ``(0,)`` tensor where an operand
    needs no gradient), in the accumulation dtype."""
    from fastclip.ops.family_spec import FamilySpec, spec_from_text

    # Eager calls hand the typed spec over as it is; the custom op (torch.compile) carries its text.
    spec = spec_json if isinstance(spec_json, FamilySpec) else spec_from_text(spec_json)
    if impl == "triton":
        from fastclip.kernels.family import family_triton

        loss, ds, grads = family_triton(spec, ts, ids, guides, thr, scale, need, need_scale, chunk_size)
    else:
        from fastclip.ops.family_impl import family_torch

        loss, ds, grads = family_torch(spec, ts, ids, guides, thr, scale, need, need_scale, chunk_size)
    acc = acc_dtype(ts[0].dtype)
    empty = [g if g is not None else ts[0].new_empty((0,), dtype=acc) for g in grads]
    return [loss, ds, *empty]


@custom_op("fastclip::family", mutates_args=())
def family_op(
    spec_json: str,
    ts: list[torch.Tensor],
    ids: list[torch.Tensor | None],
    guides: list[torch.Tensor | None],
    thr: torch.Tensor | None,
    scale: torch.Tensor,
    need: list[bool],
    need_scale: bool,
    impl: str,
    chunk_size: int | None,
) -> list[torch.Tensor]:
    inputs = [*ts, *(t for t in ids if t is not None), *(t for t in guides if t is not None), thr, scale]
    return list(
        _own(inputs, family_impl(spec_json, ts, ids, guides, thr, scale, need, need_scale, impl, chunk_size))
    )


@family_op.register_fake
def _family_fake(spec_json, ts, ids, guides, thr, scale, need, need_scale, impl, chunk_size):
    acc = acc_dtype(ts[0].dtype)
    grads = [
        t.new_empty(t.shape, dtype=acc) if want else t.new_empty((0,), dtype=acc) for t, want in zip(ts, need)
    ]
    return [ts[0].new_empty((), dtype=acc), ts[0].new_empty((), dtype=acc), *grads]
