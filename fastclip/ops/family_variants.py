"""Each loss of the contrastive family as a composition of blocks (``fastclip/ops/family_spec.py``).

A variant is a function from validated options and an operand layout to a :class:`FamilySpec`. The
layout names the operand indices: in one process the column operands are the row operands
themselves (``Q is q``); in a gathered multi-process run they are the all-gathered tensors and
``offset`` is the rank's first global row. Adding a variant means adding its builder here, its
float64 reference in ``fastclip/reference_family.py`` and its tests (docs/design.md, "Adding a
variant").
"""

from __future__ import annotations

from dataclasses import dataclass

from fastclip._checks import check_bool, check_choice, check_real
from fastclip.ops.family_spec import Block, FamilySpec

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
PARTITIONS = ("joint", "per_direction")
HARDNESS = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
DUPLICATES = ("ignore", "positive")
SIMILARITIES = ("cos", "dot")
MARGIN_STRATEGIES = ("absolute", "relative")

# Which columns of the query->document blocks get the hardness shift, per mode: (positives, hard
# negatives, bank). "Own" columns are the row's positive and the row's own hard negatives.
_SHIFTS = {
    None: ("none", "none", "none"),
    "in_batch_negatives": ("all_but_own", "all_but_own", "all"),
    "hard_negatives": ("none", "own_only", "none"),
    "all_negatives": ("all_but_own", "all", "all"),
}


@dataclass(frozen=True)
class Layout:
    """Operand indices: local rows (``q``, ``p``), columns (``Q``, ``P``, ``N``: one per negative group,
    ``bank``), and which operands carry ids / guide features."""

    q: int
    p: int
    Q: int
    P: int
    N: tuple[int, ...] = ()
    bank: int | None = None
    with_ids: frozenset = frozenset()
    offset: int = 0


@dataclass(frozen=True)
class InfoNCEOptions:
    """The options of :func:`fastclip.info_nce_loss`, defined once: names, defaults and checks (every
    construction checks them). The function's, the module's and the distributed entry's signatures are
    derived from these fields (``fastclip/ops/signatures.py``), and the float64 reference takes them by
    the same names."""

    directions: tuple[str, ...] = ("query_to_doc",)
    partition: str = "joint"
    hardness: str | None = None
    hardness_strength: float = 0.0
    duplicates: str = "ignore"
    label_smoothing: float = 0.0
    similarity: str = "cos"

    def __post_init__(self):
        directions = self.directions
        if isinstance(directions, str) or not isinstance(directions, (tuple, list)):
            raise TypeError(
                f"directions: expected a tuple of direction names, got {type(directions).__name__}"
            )
        directions = tuple(directions)
        for d in directions:
            check_choice("directions", d, DIRECTIONS)
        if "query_to_doc" not in directions:
            raise ValueError(
                f"directions: expected 'query_to_doc' among them (it holds the positives), got {directions}"
            )
        if len(set(directions)) != len(directions):
            raise ValueError(f"directions: expected each direction once, got {directions}")
        check_choice("partition", self.partition, PARTITIONS)
        if self.partition == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
            raise ValueError(
                f"partition: 'per_direction' needs every direction to contain the positive pair, but "
                f"{directions} includes query_to_query/doc_to_doc (same-type similarities); use partition='joint'"
            )
        check_choice("hardness", self.hardness, HARDNESS)
        strength = check_real("hardness_strength", self.hardness_strength, lo=0.0)
        check_choice("duplicates", self.duplicates, DUPLICATES)
        eps = check_real("label_smoothing", self.label_smoothing, lo=0.0, hi=1.0, hi_open=True)
        check_choice("similarity", self.similarity, SIMILARITIES)
        object.__setattr__(self, "directions", directions)
        object.__setattr__(self, "hardness_strength", strength)
        object.__setattr__(self, "label_smoothing", eps)


def info_nce_spec(o: InfoNCEOptions, lay: Layout, n: int) -> FamilySpec:
    """InfoNCE with sentence-transformers' directions, partitions and hardness modes, hard negatives,
    duplicate ids, label smoothing and a no-gradient bank."""
    alpha = o.hardness_strength if o.hardness is not None else 0.0
    s_pos, s_neg, s_bank = _SHIFTS[o.hardness if alpha else None]
    ids = lay.with_ids

    def has_ids(r, c):
        return r in ids and c in ids

    per_dir = o.partition == "per_direction"
    blocks = [
        Block(lay.q, lay.P, 0, positive=True, positive_capable=True, shift=s_pos, ids=has_ids(lay.q, lay.P))
    ]
    blocks += [Block(lay.q, c, 0, positive_capable=True, shift=s_neg, ids=has_ids(lay.q, c)) for c in lay.N]
    if lay.bank is not None:
        blocks.append(Block(lay.q, lay.bank, 0, own=False, shift=s_bank))
    weights = [1.0]
    if "query_to_query" in o.directions:  # joint only (checked at the boundary)
        blocks.append(Block(lay.q, lay.Q, 0, exclude_own=True, ids=has_ids(lay.q, lay.Q)))
    if "doc_to_query" in o.directions:
        part = len(weights) if per_dir else 0
        if per_dir:
            weights.append(1.0)
        blocks.append(Block(lay.p, lay.Q, part, ids=has_ids(lay.p, lay.Q)))
    if "doc_to_doc" in o.directions:
        blocks += [Block(lay.p, c, 0, exclude_own=True, ids=has_ids(lay.p, c)) for c in (lay.P, *lay.N)]
    weights = tuple(w / len(weights) for w in weights)
    return FamilySpec(
        blocks=tuple(blocks),
        weights=weights,
        offset=lay.offset,
        coef=1.0 / n,
        hardness=float(alpha),
        smoothing=float(o.label_smoothing),
        duplicates=o.duplicates,
    )


@dataclass(frozen=True)
class GistOptions:
    """The options of :func:`fastclip.gist_loss`, defined once (as :class:`InfoNCEOptions`)."""

    margin_strategy: str = "absolute"
    margin: float = 0.0
    contrast_anchors: bool = True
    contrast_positives: bool = True

    def __post_init__(self):
        check_choice("margin_strategy", self.margin_strategy, MARGIN_STRATEGIES)
        object.__setattr__(self, "margin", check_real("margin", self.margin))
        check_bool("contrast_anchors", self.contrast_anchors)
        check_bool("contrast_positives", self.contrast_positives)


def gist_spec(o: GistOptions, lay: Layout, n: int) -> FamilySpec:
    """GISTEmbed: one softmax per anchor over anchor->positives, anchor->anchors (this process's),
    positive->positives and anchor->negatives, columns removed by the guide's rule (``thr`` per row).
    The anchor's own column of anchor->anchors and the positive's own column of positive->positives
    are always removed, whatever the guide says (sentence-transformers >= 6: "no self-negative")."""
    blocks = [Block(lay.q, lay.P, 0, positive=True, guide=True)]
    if o.contrast_anchors:
        blocks.append(Block(lay.q, lay.q, 0, local=True, exclude_own=True, guide=True))
    if o.contrast_positives:
        blocks.append(Block(lay.p, lay.P, 0, exclude_own=True, guide=True))
    blocks += [Block(lay.q, c, 0, own=False, guide=True) for c in lay.N]
    return FamilySpec(blocks=tuple(blocks), weights=(1.0,), offset=lay.offset, coef=1.0 / n)
