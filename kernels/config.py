"""Block sizes and workspace budgets of the fused loss kernels, in one place.

Configurations are *fixed per architecture* rather than picked by ``@triton.autotune`` at run time:
the tile shape decides the order of every floating-point reduction, and a timing-based choice could
differ between processes, which would break the bitwise determinism the losses promise. To tune,
edit the tables below after measuring with ``AUTOTUNE_CANDIDATES`` on a GPU (``fastclip.kernels.tune``).

Under the Triton interpreter (CPU, ``TRITON_INTERPRET=1``) a program step costs ~1.5-2 ms whatever
the tile size, so the interpreter uses few, large tiles; only one configuration exists there
(``@triton.autotune`` with several configurations fails under the interpreter).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

# Programs of the tile kernels run in groups of GROUP_M row blocks that sweep the column tiles
# together (grid order as in the Triton matmul tutorial): the group's rows of X stay in L2 while
# each tile of Y is read once per group instead of once per row block. (``TileConfig.group_m``.)
GROUP_M = 16
EPILOGUES = ("exp", "exp2", "exp2-shared")


@dataclass(frozen=True)
class TileConfig:
    """One kernel launch configuration. ``block_m x block_n`` logits per program, ``block_k`` of D per step.

    The fields after ``num_stages`` select variants (docs/kernels.md, "Hopper analysis"); their
    defaults are the shipped kernels, so a configuration written with five fields means what it did.

    * ``epilogue``: ``"exp"`` (shipped: ``tl.exp``, natural units, column partials as
      ``max + log(sum)``); ``"exp2"``: logits in base-2 units with log2(e) folded into the scale (one
      ``MUFU.EX2`` per exponential instead of five instructions), positives tested once per tile,
      no masks on full tiles, and in ``lse`` column partials stored as (max, sum) with the log taken
      in the merge (no libdevice ``logf`` per column in the kernel); ``"exp2-shared"`` (``lse``
      only): as ``exp2``, and one exponential per logit shared by the row and column sums when the
      tile's logits span at most ``SHARED_SPREAD_LOG2`` (else the two-exponential form).
    * ``flatten`` (``lse``): the column-tile loop and the K loop fused into one software-pipelined
      loop (``tl.range(flatten=True)``), so the next tile's operand loads overlap this tile's epilogue.
    * ``tma``: operand tiles through TMA tensor descriptors (host ``TensorDescriptor``) instead of
      pointer loads (``cp.async``), where the operands allow it (16-byte aligned rows); else pointers.
    * ``group_m`` (``tile``, ``siglip``): row blocks per group of the grid order.
    * ``maxnreg``: register cap per thread (ptxas ``.maxnreg``; 0 = none), to fit more programs per SM.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    epilogue: str = "exp"
    flatten: bool = False
    tma: bool = False
    group_m: int = GROUP_M
    maxnreg: int = 0

    def __post_init__(self):
        if self.epilogue not in EPILOGUES:
            raise ValueError(f"epilogue: expected one of {EPILOGUES}, got {self.epilogue!r}")

    def launch(self) -> dict:
        """Keyword arguments of a kernel launch: warps, stages and, when set, the register cap."""
        kw = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg:
            kw["maxnreg"] = self.maxnreg
        return kw

    def name(self) -> str:
        """Short name, e.g. ``128x128x64w8s3`` or ``128x64x64w8s3+exp2+tma+r128``."""
        base = f"{self.block_m}x{self.block_n}x{self.block_k}w{self.num_warps}s{self.num_stages}"
        extra = [] if self.epilogue == "exp" else [self.epilogue]
        extra += ["flat"] * self.flatten + ["tma"] * self.tma
        extra += [f"g{self.group_m}"] * (self.group_m != GROUP_M) + [f"r{self.maxnreg}"] * bool(self.maxnreg)
        return "+".join([base, *extra])


# Largest spread (max - min, in log2 units) of a tile's logits for which "exp2-shared" uses one
# exponential exp2(L - max) for both the row and the column sums: every term within 2**-62 of its
# row's or column's largest term stays a normal fp32 number (2**-126 and up), so what flushes to zero
# is below 2**-62 relative, under fp32 rounding even summed over 2**31 columns.
SHARED_SPREAD_LOG2 = 64.0


# Tile kernels: one BM x BN tile of logits per program, recomputed from X and Y in steps of BK over D.
# "lse" walks a range of column tiles per program (row statistics online, column partials per tile);
# "tile" forms the CLIP gradient tile; "siglip" the SigLIP loss and gradient tile.
_CONFIGS = {
    # H100 / H200 (sm_90): 128x128 fp32 accumulator over 8 warps, 3-stage pipelined K loop (98 KiB of
    # shared memory). The SigLIP tile keeps more values alive per logit (S, L, exp(-|L|), G): at
    # 128x128 it spills (25 spill stores on sm_90, 50 on sm_80 in the AOT build), at 128x64 it does not.
    "hopper": {
        "lse": TileConfig(128, 128, 64, num_warps=8, num_stages=3),
        "tile": TileConfig(128, 128, 64, num_warps=8, num_stages=3),
        "siglip": TileConfig(128, 64, 64, num_warps=8, num_stages=3),
        **{
            f"family-{k}": c
            for k, c in (("lse", TileConfig(64, 64, 64, 8, 3)), ("grad", TileConfig(128, 64, 64, 8, 3)))
        },
        **{f"distill-{k}": TileConfig(64, 128, 64, 8, 3) for k in ("lse", "tile")},
    },
    # A100 / sm_8x: less shared memory per SM than Hopper.
    "ampere": {
        "lse": TileConfig(128, 128, 32, num_warps=8, num_stages=3),
        "tile": TileConfig(128, 128, 32, num_warps=8, num_stages=3),
        "siglip": TileConfig(128, 64, 32, num_warps=8, num_stages=3),
        **{
            f"family-{k}": c
            for k, c in (("lse", TileConfig(64, 64, 32, 8, 3)), ("grad", TileConfig(128, 64, 32, 8, 3)))
        },
        **{f"distill-{k}": TileConfig(64, 128, 32, 8, 3) for k in ("lse", "tile")},
    },
    # Anything older or unknown: small, safe tiles.
    "generic": {
        "lse": TileConfig(64, 64, 32, num_warps=4, num_stages=2),
        "tile": TileConfig(64, 64, 32, num_warps=4, num_stages=2),
        "siglip": TileConfig(64, 64, 32, num_warps=4, num_stages=2),
        **{
            k: TileConfig(64, 64, 32, num_warps=4, num_stages=2)
            for k in ("family-lse", "family-grad", "distill-lse", "distill-tile")
        },
    },
    # CPU interpreter: cost is per program step, so few large tiles; BK < 200 so that the tests'
    # D = 200 crosses a masked K tail.
    "interpreter": {
        "lse": TileConfig(64, 64, 128, num_warps=4, num_stages=1),
        "tile": TileConfig(64, 64, 128, num_warps=4, num_stages=1),
        "siglip": TileConfig(64, 64, 128, num_warps=4, num_stages=1),
        **{
            k: TileConfig(64, 64, 128, num_warps=4, num_stages=1)
            for k in ("family-lse", "family-grad", "distill-lse", "distill-tile")
        },
    },
}
KERNELS = ("lse", "tile", "siglip")  # CLIP's and SigLIP's: the tuning sweep's kernels
# The contrastive family's forward and gradient kernels (kernels/family_tiles.py) and the distillation
# passes (kernels/distill.py) own their entries: their tiles hold more per cell (masks, a guide tile, a
# teacher tile), so they run at most 64 rows (forward) / 64 columns (family gradient) per tile, and a
# tuned CLIP entry does not move them. Their values are what they ran with when they derived from
# CLIP's (AOT-checked, tests/test_kernels_aot.py).
OWN_KERNELS = ("family-lse", "family-grad", "distill-lse", "distill-tile")


# Candidates of the GPU tuning (``fastclip.kernels.tune``, the device check's ``tune`` part), at most 16
# per kernel, the shipped configuration first. Every one compiles for sm_90 without spills at D = 768
# in the AOT build (triton 3.6 and 3.9; docs/kernels.md, "Hopper analysis"); left out for spilling:
# lse 128x256 (11 spill instructions) and 128x128 exp2+tma capped at 128 registers (64), tile 128x256 /
# 256x128 and tile 128x128 capped at 128 registers (60-163), siglip 128x128 without TMA (47) and with a
# 168-register cap (121), siglip 128x64 on 4 warps without TMA (32).
def _variants(base: TileConfig, rows: list) -> list:
    return [base] + [dataclasses.replace(base, **r) for r in rows]


_E2, _SH = {"epilogue": "exp2"}, {"epilogue": "exp2-shared"}
_LSE = TileConfig(128, 128, 64, num_warps=8, num_stages=3)
_SIG = TileConfig(128, 64, 64, num_warps=8, num_stages=3)
_WIDE = {"block_m": 128, "block_n": 64, "num_warps": 4}  # three programs per SM
AUTOTUNE_CANDIDATES: dict[str, list[TileConfig]] = {
    "lse": _variants(_LSE, [
        _E2, _SH, {**_E2, "tma": True}, {**_SH, "tma": True}, {**_E2, "flatten": True},
        {**_SH, "flatten": True, "tma": True}, {**_SH, "tma": True, "num_stages": 4},
        {**_SH, "tma": True, "maxnreg": 128}, {**_SH, **_WIDE},
        {**_SH, "tma": True, **_WIDE}, {**_SH, "tma": True, **_WIDE, "num_stages": 4},
        {**_SH, "tma": True, "block_m": 64, "num_warps": 4}, {**_SH, "tma": True, "block_m": 256},
        {**_SH, "tma": True, "block_k": 128, "num_stages": 2}, {**_SH, "tma": True, "block_k": 32, "num_stages": 4},
    ]),
    "tile": _variants(_LSE, [
        _E2, {**_E2, "tma": True}, {**_E2, "tma": True, "num_stages": 4}, {**_E2, **_WIDE},
        {**_E2, "tma": True, **_WIDE}, {**_E2, "tma": True, "block_n": 64},
        {**_E2, "tma": True, "block_n": 64, "num_stages": 4}, {**_E2, "tma": True, "block_m": 64, "num_warps": 4},
        {**_E2, "tma": True, "group_m": 8}, {**_E2, "tma": True, "block_k": 128, "num_stages": 2},
        {**_E2, "tma": True, "block_k": 32, "num_stages": 4},
    ]),
    "siglip": _variants(_SIG, [
        _E2, {**_E2, "tma": True}, {**_E2, "tma": True, "block_n": 128}, {**_E2, "tma": True, "maxnreg": 128},
        {**_E2, "tma": True, "num_warps": 4}, {**_E2, "tma": True, "block_n": 128, "num_stages": 4},
        {**_E2, "tma": True, "num_stages": 4}, {**_E2, "tma": True, "block_m": 64, "block_n": 128, "num_warps": 4},
        {**_E2, "tma": True, "block_n": 128, "block_k": 128, "num_stages": 2},
        {**_E2, "tma": True, "block_k": 32, "num_stages": 4}, {**_E2, "tma": True, "block_n": 128, "group_m": 8},
    ]),
    # The family's own kernels (fastclip/bench/tune_family.py checks and times them): at most 64 columns
    # per tile (kernels/family.py, FAMILY_MAX_BLOCK_N). The forward candidates compile without spills for
    # sm_90 in bf16 with triton 3.6 and 3.9 (benchmarks/results/aot_sm90_family_2026-12-05.txt, "After";
    # the 64 x 32 on 8 warps and 4-stage ones not compiled yet); 64 x 64 on 4 warps spills (18-46), left out.
    "family-lse": _variants(TileConfig(64, 64, 64, 8, 3), [
        {"block_k": 32}, {"num_stages": 2}, {"block_n": 32, "num_warps": 4}, {"block_k": 128, "num_stages": 2},
        {"block_n": 32}, {"block_k": 32, "num_stages": 4},
    ]),
    "family-grad": _variants(TileConfig(128, 64, 64, 8, 3), [
        {"num_stages": 4}, {"block_k": 32}, {"block_m": 64}, {"block_m": 64, "num_warps": 4},
        {"block_k": 128, "num_stages": 2}, {"num_warps": 4},
    ]),
}  # fmt: skip

# Tuned entries by (arch, kernel, dtype name, D bucket); ``tile_config`` looks here first, then in
# ``_CONFIGS``. Empty until a GPU tuning run fills it (``fastclip.kernels.tune`` prints the keys).
TUNED: dict[tuple[str, str, str, int], TileConfig] = {}
# Upper edges of the D buckets of ``TUNED`` (feature dims above the last edge use the last bucket).
D_BUCKETS = (256, 512, 768, 1024, 1152, 2048)

# Workspace budgets, in elements. The CLIP backward and the SigLIP gradient materialize the gradient
# tile G for ``c`` rows x ``nc`` columns at a time (in the input dtype) so that cuBLAS GEMMs form dX
# and dY; the forward keeps per-row-block column log-sum-exp partials (c / BM) x N in fp32. Both
# bound their chunk through ``chunk_rows``.
GRAD_WORKSPACE_ELEMENTS = 2**26  # 128 MiB of bf16 G per chunk (c = 2048 rows at N = 32768)
LSE_WORKSPACE_ELEMENTS = 2**25  # 128 MiB of fp32 column partials
# Gradient chunks keep at least this many rows (when n has them): with fewer, every chunk re-reads
# and re-writes dY (N x D fp32), so for N > GRAD_WORKSPACE_ELEMENTS / MIN_GRAD_ROWS the columns are
# cut into panels instead (B = 2**20: 512 chunks of 2048 rows x 32768-column panels).
MIN_GRAD_ROWS = 2048
# 16-bit inputs without an in-place fp32-output addmm: dY += G_c^T X_c is formed in fp32 pieces of
# at most this many elements (64 MiB), each piece 128-row aligned.
DY_PIECE_ELEMENTS = 2**24
# Enough programs to fill the GPU: the forward splits the columns of a row block between programs
# until about this many programs per SM are launched.
PROGRAMS_PER_SM = 4


def chunk_rows(
    n: int, n_cols: int, budget: int, block_m: int, *, rows_per_elem: int = 1, cols_per_elem: int = 1
) -> int:
    """Rows per chunk, the one sizing rule of every launcher.

    A chunk of ``c`` rows against ``n_cols`` columns holds ``ceil(c / rows_per_elem) *
    ceil(n_cols / cols_per_elem)`` workspace elements: (1, 1) for a ``c x N`` gradient tile,
    (BM, 1) for per-row-block column partials, (BM, BN) for per-tile partials. ``c`` is the largest
    multiple of ``block_m`` that keeps this within ``budget`` (at least one block, at most ``n``).
    """
    per_row_group = max(1, -(-n_cols // cols_per_elem))
    c = (budget // per_row_group) * rows_per_elem
    c = max(block_m, c // block_m * block_m)
    return max(1, min(n, c))


def grad_tiles(n: int, n_cols: int, budget: int, block_m: int, block_n: int) -> tuple[int, int]:
    """``(rows, cols)`` of one gradient chunk: full-width chunks of ``chunk_rows`` rows while those
    have at least ``MIN_GRAD_ROWS`` rows; otherwise ``MIN_GRAD_ROWS`` rows by column panels that keep
    ``rows * cols <= budget`` (cols a multiple of 128 and of ``block_n``)."""
    c = chunk_rows(n, n_cols, budget, block_m)
    floor_rows = min(n, MIN_GRAD_ROWS)
    if c >= floor_rows:
        return c, n_cols
    c = -(-floor_rows // block_m) * block_m if floor_rows < n else n
    align = math.lcm(128, block_n)
    nc = max(align, (budget // c) // align * align)
    return c, min(n_cols, nc)


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)
    except Exception:
        return False


def arch(device: torch.device) -> str:
    """Key of ``_CONFIGS`` for ``device``."""
    if device.type != "cuda":
        return "interpreter"
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 9:
        return "hopper"
    if major == 8:
        return "ampere"
    return "generic"


def d_bucket(dim: int) -> int:
    """The ``D_BUCKETS`` edge that ``dim`` falls under (the last edge for larger dims)."""
    for edge in D_BUCKETS:
        if dim <= edge:
            return edge
    return D_BUCKETS[-1]


def tile_config(
    kernel: str, device: torch.device, dtype: torch.dtype = torch.bfloat16, dim: int | None = None
) -> TileConfig:
    """Configuration of ``kernel`` (one of ``KERNELS`` or ``OWN_KERNELS``) on ``device`` for inputs of ``dtype`` and
    feature dim ``dim``: the ``TUNED`` entry of (arch, kernel, dtype, D bucket) if any, else the
    architecture's default.

    fp32 operands take twice the shared memory per stage of 16-bit ones: their K step is capped at 32
    (a 128x128 tile with BK = 64 and 3 stages would need 192 KiB for fp32).
    """
    if kernel not in KERNELS + OWN_KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS + OWN_KERNELS}, got {kernel!r}")
    key = arch(device)
    if dim is not None:
        tuned = TUNED.get((key, kernel, str(dtype).split(".")[-1], d_bucket(dim)))
        if tuned is not None:
            return tuned
    cfg = _CONFIGS[key][kernel]
    if dtype == torch.float32 and key != "interpreter" and cfg.block_k > 32:
        cfg = dataclasses.replace(cfg, block_k=32)
    return cfg


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
