"""The one extension point of the contrastive family: a named description of softmax blocks.

A loss of the family is a list of :class:`Block`\\ s over *operands* (feature tensors). Every block is
``n`` local rows (one row operand) against the columns of one column operand, logits
``L = s * R @ C.T``, and row ``i``'s *own* column is ``i + offset`` (``offset`` = the rank's global
row offset for gathered columns, 0 for local ones). A block says, per row, from indices alone:

* ``positive``: the own column is row i's positive (the query->document block of the positives);
* ``exclude_own``: the own column is removed (query->query self, document->document same query);
* ``shift``: which columns get the hardness shift ``alpha * stop_grad(S)`` (``"all"``,
  ``"all_but_own"``, ``"own_only"``, ``"none"``);
* ``ids``: columns whose id equals the row's id are duplicates (removed, or positives in
  ``positive_capable`` blocks under the ``"positive"`` policy); the own positive is never removed;
* ``guide``: GIST's rule: a column is removed where the guide similarity exceeds the row's threshold
  (the own positive is never removed); the threshold is the row's own cell of the first guide block
  (which must be the positive block) minus the row's margin (the op's ``thr``), read from the same
  guide tile, so that a duplicate of the positive ties with it exactly;
* ``part``: the log-sum-exp the block joins (one per row in ``"joint"``, one per direction in
  ``"per_direction"``, averaged with ``weights``).

Row i's loss is ``sum_P w_P lse_P(i) - sum_j t_ij L'_ij`` with ``L'`` the shifted logits and the target
``t = (1 - eps) * uniform(positives_i) + eps * uniform(valid columns_i)``; the loss is the mean over
rows (``coef``). Nothing here holds a tensor: the description is frozen, hashable and serialisable
(the custom op takes it as a string, ``to_text``), and the torch chunks, the Triton epilogue and every
distributed strategy consume the same one. The materialized reference in
``fastclip/reference_family.py`` is written from the maths in docs/design.md, not from this file.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

SHIFTS = ("none", "all", "all_but_own", "own_only")


@dataclass(frozen=True)
class Block:
    row: int  # index of the row operand (n local rows)
    col: int  # index of the column operand
    part: int = 0  # which log-sum-exp the block joins
    local: bool = False  # own column is i (local columns), not i + offset (gathered columns)
    own: bool = True  # the columns have an own column per row (False: a bank, a shared pool)
    positive: bool = False  # the own column is the row's positive
    positive_capable: bool = False  # same-id columns are positives under duplicates="positive"
    exclude_own: bool = False  # the own column is removed
    shift: str = "none"  # hardness shift on: "all", "all_but_own", "own_only" columns, or "none"
    ids: bool = False  # duplicate masking by ids (row operand's and column operand's id vectors)
    guide: bool = False  # GIST guide mask (row operand's and column operand's guide features)

    def __post_init__(self):
        assert self.shift in SHIFTS, self.shift
        assert not (self.positive and self.exclude_own), "a positive cannot be excluded"
        assert self.own or not (
            self.positive or self.exclude_own or self.shift in ("all_but_own", "own_only")
        )


@dataclass(frozen=True)
class FamilySpec:
    """The whole loss: blocks, per-part weights and the scalars every block shares."""

    blocks: tuple[Block, ...]
    weights: tuple[float, ...] = (1.0,)  # one per part
    offset: int = 0  # global index of local row 0 in gathered column operands
    coef: float = 1.0  # loss = coef * sum_i loss_i (1/n: the mean)
    hardness: float = 0.0  # alpha of the hardness shift
    smoothing: float = 0.0  # label smoothing eps
    duplicates: str = "ignore"  # "ignore" | "positive"

    def __post_init__(self):
        parts = {b.part for b in self.blocks}
        assert parts == set(range(len(self.weights))), (parts, self.weights)
        assert sum(b.positive for b in self.blocks) >= 1, "a loss needs a positive block"
        assert self.duplicates in ("ignore", "positive")

    def to_text(self) -> str:
        """A compact text form (the custom op's argument). Plain ``str``/``join`` of the fields, which
        ``torch.compile`` traces (``json.dumps`` it does not); ``str(float)`` round-trips exactly."""
        blocks = ";".join(
            ",".join(
                (
                    str(b.row),
                    str(b.col),
                    str(b.part),
                    str(int(b.local)),
                    str(int(b.own)),
                    str(int(b.positive)),
                    str(int(b.positive_capable)),
                    str(int(b.exclude_own)),
                    b.shift,
                    str(int(b.ids)),
                    str(int(b.guide)),
                )
            )  # fmt: skip
            for b in self.blocks
        )
        head = "|".join(
            (":".join(str(float(w)) for w in self.weights), str(self.offset), str(float(self.coef)),
             str(float(self.hardness)), str(float(self.smoothing)), self.duplicates)
        )  # fmt: skip
        return head + "|" + blocks

    @property
    def n_parts(self) -> int:
        return len(self.weights)

    def row_groups(self, lengths, need=None) -> tuple[RowGroup, ...]:
        """The column model: the blocks of each (row operand, part) pair, in order of first appearance,
        as one column operand (their column operands end to end) described by segments. ``lengths``:
        rows of every operand. With ``need`` (per operand: does it need a gradient), the blocks whose
        column operand needs one come first in their group, so those columns are a prefix of it."""
        groups: dict[tuple[int, int], list[Block]] = {}
        for b in self.blocks:
            groups.setdefault((b.row, b.part), []).append(b)
        out = []
        for (row, part), blocks in groups.items():
            if need is not None:
                blocks = sorted(blocks, key=lambda b: not need[b.col])  # stable within each class
            segments, start = [], 0
            for b in blocks:
                segments.append(Segment(b, start, start + lengths[b.col]))
                start += lengths[b.col]
            out.append(RowGroup(row, part, tuple(segments)))
        return tuple(out)


@dataclass(frozen=True)
class Segment:
    """A block's columns inside its row group's column operand: ``[start, end)``."""

    block: Block
    start: int
    end: int


@dataclass(frozen=True)
class RowGroup:
    """Rows of one operand against the concatenated columns of its blocks, in one part: a call has at
    most three (queries; documents in the joint part; documents in their own part) whatever ``K``."""

    row: int
    part: int
    segments: tuple[Segment, ...]

    @property
    def width(self) -> int:
        return self.segments[-1].end


@functools.lru_cache(maxsize=256)
def spec_from_text(text: str) -> FamilySpec:
    weights, offset, coef, hardness, smoothing, duplicates, blocks = text.split("|")
    parsed = []
    for item in blocks.split(";"):
        row, col, part, local, own, pos, cap, excl, shift, ids, guide = item.split(",")
        parsed.append(
            Block(int(row), int(col), int(part), local == "1", own == "1", pos == "1", cap == "1", excl == "1",
                  shift, ids == "1", guide == "1")
        )  # fmt: skip
    return FamilySpec(
        blocks=tuple(parsed), weights=tuple(float(w) for w in weights.split(":")), offset=int(offset),
        coef=float(coef), hardness=float(hardness), smoothing=float(smoothing), duplicates=duplicates,
    )  # fmt: skip
