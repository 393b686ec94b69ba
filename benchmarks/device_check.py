"""The parts of ``benchmarks/device_check.sh``, one per call: ``python benchmarks/device_check.py PART OUT``.

PART is one of ``env``, ``correctness``, ``target``, ``family``, ``distill``, ``million``, ``phases``,
``vit``, ``tune``, ``tune_family`` (both opt-in in device_check.sh) (and ``cases``, the per-precision worker ``correctness``
starts). Each part writes
``OUT/part_<PART>.json`` (rewritten as it goes, so a part stopped by its time limit still leaves what
it measured) and stops starting new work ``--seconds`` after it began. ``target`` also writes
``OUT/results.json`` in the result-file schema of ``fastclip.bench.report`` (plus a CSV).
The parts live in ``benchmarks/device_parts/``; the summary and the targets table of what they wrote,
and unpacking a ``--bundle`` archive: ``benchmarks/device_report.py`` and ``device_targets.py``.

``--dry-run``: the same code on CPU with the Triton interpreter and tiny sizes (CI runs it), so the
GPU time goes to measuring. Sizes on a GPU: B = 32768 / 65536 and 2**20, D = 768, bf16.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # device_check.sh sets PYTHONSAFEPATH
from device_parts import basics, family, losses, models, tune  # noqa: E402
from device_parts.common import Part  # noqa: E402

PARTS = {
    "env": basics.part_env,
    "correctness": basics.part_correctness,
    "target": losses.part_target,
    "family": family.part_family,
    "distill": family.part_distill,
    "million": losses.part_million,
    "phases": losses.part_phases,
    "vit": models.part_vit,
    "tune": tune.part_tune,
    "tune_family": tune.part_tune_family,
}
WORKER_PARTS = ("cases",)  # started by "correctness", one process per precision


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=tuple(PARTS) + WORKER_PARTS)
    ap.add_argument("out")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--seconds", type=float, default=60.0, help="stop starting new work after this")
    ap.add_argument("--group", type=int, default=0, help="cases: index into basics.PRECISIONS")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    name = args.part + (str(args.group) if args.part == "cases" else "")
    p = Part(name, args.out, args.seconds, args.dry_run)
    try:
        if args.part == "cases":
            basics.part_cases(p, args.group)
        else:
            PARTS[args.part](p)
    except KeyboardInterrupt:  # the part's time limit (SIGINT): keep what it wrote, say so
        p.save(status="interrupted", error="stopped by its time limit (SIGINT)")
        return 1
    except Exception as exc:
        p.save(
            status="error",
            error=f"{type(exc).__name__}: {exc}"[:1000],
            traceback=traceback.format_exc()[-3000:],
        )
        raise
    return 0 if p.data.get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
