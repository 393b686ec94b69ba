"""What comes back from ``benchmarks/device_check.sh``: the summary of its parts and the bundle.

    python benchmarks/device_report.py summary OUT          # one line per part that ran; OUT/device_check.json
    python benchmarks/device_report.py collect BUNDLE [DEST] # unpack a --bundle archive: verdicts, table, plots

``summary`` ends with the targets table of ``device_targets.py`` (target, measured, met or not), also
written into ``OUT/device_check.json`` ("targets") and ``OUT/targets.md``.

``collect`` runs on the machine the results come back to: it unpacks the archive into DEST (a new or
empty folder; links, absolute paths and ``..`` refused; by default ``benchmarks/results/<gpu>-<date>``
from the bundle's env part, where the project commits it), prints the summary and the target verdicts,
writes ``summary.md`` (with a README-ready table) and draws the plots of ``results.json``.
The measuring side is ``benchmarks/device_check.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Parts whose JSON the summary reads, in the order device_check.sh runs them.
PART_NAMES = ("env", "correctness", "target", "family", "distill", "million", "phases", "vit", "tune")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device_targets import GOAL_MATMUL_FRACTION, format_table, markdown_table, target_rows  # noqa: E402,F401


def load_part(out: str, name: str) -> dict:
    """``OUT/part_<name>.json`` as a dict ({} when missing or unreadable)."""
    try:
        with open(os.path.join(out, f"part_{name}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def summary_lines(out: str) -> list[str]:
    lines = []  # one line per part that ran (device_check.sh --parts may leave some out)
    env = load_part(out, "env")
    if env:
        lines.append(
            f"device: {env.get('device', '?')}; clocks {env.get('clocks')}; versions {env.get('versions')}"
        )
    c = load_part(out, "correctness")
    results = c.get("results", [])
    ok = sum(1 for r in results if r.get("ok"))
    rep = c.get("repeat", {})
    if c:
        lines.append(
            f"correctness: {ok} of {len(results)} kernel cases within the float64 error budgets, "
            f"{c.get('not_run', '?')} not run; bitwise repeat {'same' if rep.get('ok') else 'DIFFERENT' if rep.get('ok') is False else 'not run'}; "
            f"{c.get('seconds', '?')} s incl. compilation [{c.get('status', 'missing')}]"
        )
    t = load_part(out, "target")
    rates = t.get("matmul_tflops", {})
    for loss in ("clip", "siglip") if t else ():
        for b in sorted(
            {r.get("batch") for r in t.get("rows", []) if r["loss"] == loss}, key=lambda v: v or 0
        ):
            parts = []
            for r in t.get("rows", []):
                if r["loss"] != loss or r.get("batch") != b:
                    continue
                if r["status"] == "ok":
                    frac = r.get("fraction_of_bxbxd_matmul")
                    mem = r["peak_mem_bytes"] / 2**30 if r.get("peak_mem_bytes") else float("nan")
                    parts.append(
                        f"{r['provider']} {r['fwd_bwd_ms']:.4g} ms ({r['tflops']:.3g} TFLOP/s = {frac} of the BxBxD "
                        f"matmul rate, {mem:.3g} GiB above inputs)"
                    )
                else:
                    parts.append(f"{r['provider']} {r['status']}")
            lines.append(
                f"target {loss} bf16 B={b} D={t.get('dim')}: " + ("; ".join(parts) or "no result")
                + f" | matmul {rates.get(str(b), float('nan')):.3g} TFLOP/s at BxBxD"
            )  # fmt: skip
    for name, why in t.get("skipped", {}).items():
        lines.append(f"target {name}: {why}")
    fam = load_part(out, "family")
    for r in fam.get("rows", []):
        lines.append(f"family K={r['negatives']} {r['provider']}: " + (r["error"] if "error" in r else
                     f"{r['fwd_bwd_ms']:.4g} ms, {r['peak_mem_bytes'] / 2**20:.0f} MiB above inputs"))  # fmt: skip
    for name, why in fam.get("skipped", {}).items():
        lines.append(f"family {name}: {why}")
    dist = load_part(out, "distill")
    if dist.get("check"):
        lines.append(f"distill check: {dist['check']}")
    for r in dist.get("rows", []):
        lines.append(f"distill B={dist.get('batch')} {r['provider']}: " + (r["error"] if "error" in r else
                     f"{r['fwd_bwd_ms']:.4g} ms, {r['peak_mem_bytes'] / 2**20:.0f} MiB above inputs"))  # fmt: skip
    ph = load_part(out, "phases")
    for name in ("clip_lse", "clip_grad", "siglip_grad"):
        if name in ph:
            lines.append(
                f"phases {name} B={ph.get('batch')} chunk {ph.get('chunk')} gemm {ph.get('gemm_path')}: {ph[name]}"
            )
    m = load_part(out, "million")
    for r in m.get("rows", []):
        if "error" in r:
            lines.append(f"million {r['loss']}: {r['error']}")
        else:
            peak = r.get("peak_extra_bytes")
            lines.append(
                f"million {r['loss']} B={r['batch']} D={r['dim']}: {r['seconds']} s, "
                f"{'finite' if r['finite'] else 'NOT finite'}"
                + (f", {peak / 2**30:.2f} GiB above inputs" if peak else "")
            )
    vit = load_part(out, "vit")
    for r in vit.get("rows", []):
        if "error" in r:
            lines.append(f"vit {vit.get('model')} sdpa {r['sdpa']}: {r['error']}")
        else:
            lines.append(
                f"vit {vit.get('model')} bf16 batch {vit.get('batch')} sdpa {r['sdpa']}: {r['samples_per_s']:.4g} "
                f"images/s, {r['step_ms']:.4g} ms/step, peak {r['peak_mem_bytes'] / 2**30:.3g} GiB above inputs"
            )
    if vit.get("packed"):
        lines.append(f"packed attention: {vit['packed']}")
    if vit.get("attention"):
        lines.append(f"attention impls: {vit['attention']}")
    tune = load_part(out, "tune")
    if tune:
        pre = tune.get("precompile", {})
        timed = [r for r in tune.get("rows", []) if "ms" in r]
        lines.append(
            f"tune: {len(timed)} of {len(tune.get('rows', []))} candidates timed, precompiled {pre.get('ok')}/"
            f"{pre.get('jobs')} in {pre.get('seconds')} s; winners "
            + ", ".join(f"{w['key'][1]} {w['name']}" for w in tune.get("winners", []))
            + f" [{tune.get('status', 'missing')}]"
        )
    for name in ("trainer", "pytest"):
        if os.path.exists(os.path.join(out, f"{name}.log")):
            lines.append(
                f"{'pytest -m gpu' if name == 'pytest' else 'trainer e2e'}: {_pytest_result(out, name)}"
            )
    return lines


def _pytest_result(out: str, name: str) -> str:
    try:
        with open(os.path.join(out, f"{name}.log")) as f:
            tail = [ln for ln in f.read().splitlines() if ln.strip()]
    except OSError:
        return "no log"
    for ln in reversed(tail):
        if " in " in ln and any(w in ln for w in ("passed", "failed", "skipped", "error", "deselected")):
            return ln.strip("= ")
    return tail[-1] if tail else "empty log"


def write_summary(out: str) -> None:
    """Print the summary lines and write ``OUT/device_check.json`` (every part, exit statuses, summary)."""
    lines = summary_lines(out)
    status = {}
    try:
        with open(os.path.join(out, "status.txt")) as f:
            status = dict(ln.split() for ln in f if ln.strip())
    except (OSError, ValueError):
        pass
    rows = target_rows(out)
    doc = {name: load_part(out, name) for name in PART_NAMES}
    doc.update(
        exit_status=status,
        summary=lines,
        targets=[dict(zip(("target", "measured", "verdict"), r)) for r in rows],
    )
    with open(os.path.join(out, "device_check.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    with open(os.path.join(out, "targets.md"), "w") as f:
        f.write("# Device check targets\n\n" + markdown_table(rows) + "\n")
    for ln in lines:
        print(ln)
    print()
    print(format_table(rows))


def _safe_members(tar) -> list:
    """The archive's members, refused whole unless each is a plain file or folder at a relative path
    inside the archive (no links, devices, absolute paths or ``..``)."""
    members = []
    for m in tar.getmembers():
        name = m.name[2:] if m.name.startswith("./") else m.name
        if name in ("", "."):
            continue
        parts = name.split("/")
        if name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
            raise ValueError(f"bundle: refusing member {m.name!r} (only plain files and folders inside it)")
        members.append(m)
    return members


def collect(bundle: str, dest: str) -> list[str]:
    """Unpack a device-check bundle into ``dest`` (must not exist or be empty), write ``summary.md``
    (summary lines, target verdicts, README table) and the plots; returns the lines printed."""
    import tarfile

    if not os.path.isfile(bundle):
        raise FileNotFoundError(
            f"bundle: expected a .tar.gz written by device_check.sh --bundle, got {bundle!r}"
        )
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise FileExistsError(f"dest: expected a new or empty folder, got {dest!r} (not empty)")
    try:
        tar = tarfile.open(bundle, "r:gz")
    except (tarfile.TarError, OSError) as exc:
        raise ValueError(f"bundle: {bundle!r} is not a gzip tar archive ({exc})") from exc
    with tar:
        members = _safe_members(tar)
        os.makedirs(dest, exist_ok=True)
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **kw)
    lines = summary_lines(dest)
    rows = target_rows(dest)
    lines += ["", *format_table(rows).splitlines()]
    md = [
        "# Device check",
        "",
        "## Targets of the check",
        "",
        markdown_table(rows),
        "",
        "```",
        *summary_lines(dest),
        "```",
        "",
    ]
    results = os.path.join(dest, "results.json")
    if os.path.isfile(results):
        from fastclip.bench import plot, report

        doc = report.load_document(results)
        checks = report.target_checks(doc["records"], doc.get("matmul_tflops"))
        lines += checks
        md += [
            "## Targets",
            "",
            *[f"- {c}" for c in checks],
            "",
            "## Table",
            "",
            report.markdown_summary(doc),
            "",
        ]
        for path in plot.plot_document(doc, os.path.join(dest, "results")):
            lines.append(f"plot: {path}")
    else:
        lines.append("no results.json in the bundle: the target part did not finish")
    with open(os.path.join(dest, "summary.md"), "w") as f:
        f.write("\n".join(md))
    return lines


def default_dest(bundle: str) -> str:
    """``benchmarks/results/<gpu>-<YYYY-MM-DD>`` from the bundle's part_env.json and versions.txt (the
    folder the project commits results under), ``...-2``, ``-3`` ... when taken."""
    import re
    import tarfile

    gpu, date = "gpu", "undated"
    try:
        with tarfile.open(bundle, "r:gz") as tar:
            for m in tar.getmembers():
                name = m.name[2:] if m.name.startswith("./") else m.name
                if name in ("part_env.json", "versions.txt") and m.isfile():
                    text = tar.extractfile(m).read().decode(errors="replace")
                    if name == "part_env.json":
                        gpu = str(json.loads(text).get("device") or gpu)
                    else:
                        date = (re.findall(r"date: (\d{4}-\d{2}-\d{2})", text) or [date])[0]
    except (OSError, ValueError, tarfile.TarError):
        pass
    gpu = re.sub(r"[^a-z0-9]+", "-", gpu.lower().replace("nvidia", "")).strip("-") or "gpu"
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")
    base = os.path.join(root, f"{gpu}-{date}")
    dest, n = base, 1
    while os.path.exists(dest) and os.listdir(dest):
        n += 1
        dest = f"{base}-{n}"
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("summary", help="print one line per part that ran; write OUT/device_check.json")
    sp.add_argument("out")
    cp = sub.add_parser("collect", help="unpack a --bundle archive into a new folder: verdicts, table, plots")
    cp.add_argument("bundle")
    cp.add_argument("dest", nargs="?", help="default: benchmarks/results/<gpu>-<date> (from the bundle)")
    args = ap.parse_args(argv)
    if args.command == "summary":
        write_summary(args.out)
        return 0
    try:
        lines = collect(args.bundle, args.dest or default_dest(args.bundle))
    except (OSError, ValueError) as exc:
        print(f"device_report.py collect: {exc}", file=sys.stderr)
        return 2
    for ln in lines:
        print(ln)
    return 0


if __name__ == "__main__":
    sys.exit(main())
