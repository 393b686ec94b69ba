"""The one table at the end of the device check: each target of the issue, the measured value, met or
not. Reads only what the parts wrote into OUT (part_*.json, status.txt, times.txt, the pytest logs);
``device_report.py`` prints it and writes it into device_check.json and targets.md."""

from __future__ import annotations

import json
import os
import re

WHOLE_CHECK_S = 420
GOAL_MATMUL_FRACTION = 0.60  # fused CLIP fwd+bwd against the bf16 matmul rate at B x B x D
MET, SHORT, NONE = "met", "NOT met", "no data"


def _load(out, name):
    try:
        with open(os.path.join(out, f"part_{name}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _pairs(out, name):
    try:
        with open(os.path.join(out, name)) as f:
            return [ln.split() for ln in f if ln.strip()]
    except OSError:
        return []


def _ok_rows(rows, **match):
    return [r for r in rows if r.get("status", "ok") == "ok" and "error" not in r
            and all(r.get(k) == v for k, v in match.items())]  # fmt: skip


def _ratio_row(label, fused, base, t_max, m_max=None):
    if not fused or not base:
        return [label, "not measured", NONE]
    f, b = fused[0], base[0]
    t = f["fwd_bwd_ms"] / b["fwd_bwd_ms"]
    text = f"time {t:.2f}x ({f['fwd_bwd_ms']:.4g} / {b['fwd_bwd_ms']:.4g} ms)"
    ok = t <= t_max
    if m_max is not None and f.get("peak_mem_bytes") and b.get("peak_mem_bytes"):
        m = f["peak_mem_bytes"] / b["peak_mem_bytes"]
        text += f", memory {100 * m:.1f}% ({f['peak_mem_bytes'] / 2**20:.4g} / {b['peak_mem_bytes'] / 2**20:.4g} MiB)"
        ok = ok and m <= m_max
    return [label, text, MET if ok else SHORT]


def _target_rows(out):
    t = _load(out, "target")
    rows, tr = [], t.get("rows", [])
    skipped = t.get("skipped", {})
    for loss in ("clip", "siglip"):
        for b in t.get("batches", [32768, 65536]):
            fused = _ok_rows(tr, loss=loss, batch=b, provider="fastclip-triton")
            for base in ("open_clip", "reference"):
                label = f"{loss} B={b}: fastclip vs {base} (time <= 1.0x, memory <= 5%)"
                if base in skipped:
                    rows.append([label, skipped[base], NONE])
                else:
                    rows.append(
                        _ratio_row(label, fused, _ok_rows(tr, loss=loss, batch=b, provider=base), 1.0, 0.05)
                    )
    third = [("clip", "inf_cl", "Inf-CL", 0.5), ("siglip", "siglip_kernel", "siglip-kernel", 1.0),
             ("clip", "memeff", "memeff", 1.0)]  # fmt: skip
    for loss, prov, label, t_max in third:
        theirs = [r for r in tr if r.get("provider") == prov and r.get("loss") == loss]
        lab = f"{loss} B={theirs[0]['batch'] if theirs else 32768}: fastclip vs {label} (time <= {t_max}x)"
        if prov in skipped:
            rows.append([lab, skipped[prov], NONE])
        elif theirs and theirs[0].get("status") != "ok":
            rows.append(
                [lab, f"{label}: {theirs[0].get('status')} {theirs[0].get('message') or ''}"[:120], NONE]
            )
        elif theirs:
            fused = _ok_rows(tr, loss=loss, batch=theirs[0]["batch"], provider="fastclip-triton")
            rows.append(_ratio_row(lab, fused, theirs, t_max))
        else:
            rows.append([lab, "not measured", NONE])
    rates = t.get("matmul_tflops", {})
    fused = _ok_rows(tr, loss="clip", batch=32768, provider="fastclip-triton")
    lab = f"matmul rate: fused clip fwd+bwd >= {100 * GOAL_MATMUL_FRACTION:.0f}% of the BxBxD bf16 matmul"
    if fused and fused[0].get("fraction_of_bxbxd_matmul"):
        frac = fused[0]["fraction_of_bxbxd_matmul"]
        rows.append([lab, f"{100 * frac:.0f}% ({fused[0]['tflops']:.0f} of {rates.get('32768', 0):.0f} TFLOP/s)",
                     MET if frac >= GOAL_MATMUL_FRACTION else SHORT])  # fmt: skip
    else:
        rows.append([lab, "not measured", NONE])
    return rows


def _family_rows(out):
    fam = _load(out, "family")
    fr, rows = fam.get("rows", []), []
    for k in (0, 1, 7):
        fused = _ok_rows(fr, negatives=k, provider="fastclip-triton")
        rows.append(_ratio_row(f"info_nce K={k} vs materialized MNRL (time <= 1.0x, memory <= 5%)",
                               fused, _ok_rows(fr, negatives=k, provider="materialized"), 1.0, 0.05))  # fmt: skip
        st = fam.get("skipped", {}).get("st_mnrl")
        lab = f"info_nce K={k} vs sentence-transformers' MNRL, bf16 autocast (time <= 0.7x)"
        rows.append(
            [lab, st, NONE]
            if st
            else _ratio_row(lab, fused, _ok_rows(fr, negatives=k, provider="st_mnrl"), 0.7)
        )
    dist = _load(out, "distill")
    dr = dist.get("rows", [])
    chk = dist.get("check", {})
    lab = "distill: fused vs fp32 reference, relative error of loss and gradients <= 2e-2"
    rows.append([lab, f"max {chk['max_rel_err']:.2g} (bf16 materialized: {max(chk.get('rel_err_bf16_reference') or [0]):.2g})", MET if chk["ok"] else SHORT]
                if chk else [lab, "not measured", NONE])  # fmt: skip
    lab = "distill: fastclip vs open_clip DistillClipLoss (time <= 1.0x, memory <= 5%)"
    oc = dist.get("skipped", {}).get("open_clip")
    rows.append([lab, oc, NONE] if oc else _ratio_row(lab, _ok_rows(dr, provider="fastclip-triton"),
                                                       _ok_rows(dr, provider="open_clip"), 1.0, 0.05))  # fmt: skip
    return rows


def _pytest_summary(out, name):
    try:
        with open(os.path.join(out, f"{name}.log")) as f:
            lines = [ln.strip("= \n") for ln in f if ln.strip()]
    except OSError:
        return None
    for ln in reversed(lines):
        if (
            re.search(r"\b(passed|failed|skipped|error|errors|deselected|no tests ran)\b", ln)
            and " in " in ln
        ):
            return ln
    return lines[-1] if lines else "empty log"


def _pow2(m) -> str:
    b = next((r["batch"] for r in m.get("rows", []) if r.get("batch")), 2**20)
    return f"2^{b.bit_length() - 1}" if b & (b - 1) == 0 else str(b)


def _run_rows(out):
    rows = []
    status = dict((p[0], p[1]) for p in _pairs(out, "status.txt") if len(p) >= 2)
    times = {p[0]: p[1:] for p in _pairs(out, "times.txt")}
    m = _load(out, "million")
    done = [r for r in m.get("rows", []) if r.get("finite")]
    text = "; ".join(f"{r['loss']} {r['seconds']} s" if r.get("finite") else f"{r['loss']}: {r.get('error', 'not finite')}"
                     for r in m.get("rows", [])) or "not run"  # fmt: skip
    rows.append(
        [
            f"B={_pow2(m)} clip, siglip and info_nce K=1 complete (finite)",
            text,
            MET if len(done) == 3 else (SHORT if m else NONE),
        ]
    )
    c = _load(out, "correctness")
    res = c.get("results", [])
    lab = "TF32 contract: fp32 IEEE and fp32+TF32 kernels within their error budgets"
    if res:
        ieee = [r for r in res if r["dtype"] == "float32" and not r["tf32"]]
        tf = [r for r in res if r["dtype"] == "float32" and r["tf32"]]
        n_ok = lambda rs: sum(1 for r in rs if r.get("ok"))  # noqa: E731
        text = f"IEEE {n_ok(ieee)}/{len(ieee)}, TF32 {n_ok(tf)}/{len(tf)}; all cases {n_ok(res)}/{len(res)}"
        verdict = NONE if not ieee or not tf else MET if n_ok(ieee + tf) == len(ieee + tf) else SHORT
        rows.append([lab, text, verdict])
    else:
        rows.append([lab, "not measured", NONE])
    for name, lab, limit in (("pytest", "pytest -m gpu (trainer test excluded): passes in <= 90 s", 90),
                             ("trainer", "trainer end to end (tests/test_gpu_trainer.py) passes", None)):  # fmt: skip
        summ = _pytest_summary(out, name)
        secs = int(times[name][0]) if name in times else None
        if status.get(name) == "missing":
            rows.append([lab, "tests/test_gpu_trainer.py not in the checkout", NONE])
        elif status.get(name) == "skipped" or summ is None:
            rows.append([lab, "not run", NONE])
        else:
            ok = status.get(name) == "0" and "passed" in summ and "failed" not in summ and "error" not in summ
            ok = ok and (limit is None or (secs is not None and secs <= limit))
            rows.append([lab, f"{summ} (exit {status.get(name)}, {secs} s)", MET if ok else SHORT])
    total = times.get("total")
    rows.append([f"whole check <= {WHOLE_CHECK_S} s (install included)", f"{total[0]} s" if total else "unknown",
                 NONE if not total else MET if int(total[0]) <= WHOLE_CHECK_S else SHORT])  # fmt: skip
    return rows


def _tune_rows(out):
    """The tune part's measurements of the kernel targets (issue 31), when it ran (opt-in)."""
    rows = []
    for r in _load(out, "tune").get("targets", []):
        lab = f"tune ({r['table']} table): {r['loss']} B={r['batch']} {r['what']} <= {r['target_ms']:g} ms"
        if "ms" in r:
            rows.append([lab, f"{r['ms']:.4g} ms", MET if r.get("met") else SHORT])
        else:
            rows.append([lab, r.get("error", "not measured"), NONE])
    return rows


def target_rows(out: str) -> list[list[str]]:
    """``[target, measured, verdict]`` for every target of the issue, in one list."""
    return _target_rows(out) + _family_rows(out) + _run_rows(out) + _tune_rows(out)


def format_table(rows) -> str:
    head = ["target", "measured", "verdict"]
    w = [max(len(str(r[i])) for r in [head, *rows]) for i in range(3)]
    line = lambda r: " | ".join(str(v).ljust(w[i]) for i, v in enumerate(r)).rstrip()  # noqa: E731
    return "\n".join([line(head), "-+-".join("-" * x for x in w), *map(line, rows)])


def markdown_table(rows) -> str:
    esc = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    return "\n".join(["| target | measured | verdict |", "|---|---|---|",
                      *(f"| {esc(a)} | {esc(b)} | {c} |" for a, b, c in rows)])  # fmt: skip
