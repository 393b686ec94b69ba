#!/usr/bin/env bash
# The prepared device check: one command, about 8 minutes on one H200 (each part has its own limit).
#
#   bash benchmarks/device_check.sh OUT [--dry-run] [--wheels DIR] [--bundle FILE] [--parts LIST]
#
#   --wheels DIR  install the wheels in DIR first (pip --no-deps --no-index): fastclip itself and what
#                 the GPU image lacks (inf-cl, open_clip_torch). Build DIR with benchmarks/build_wheels.sh.
#   --bundle FILE after every part, pack OUT into FILE (.tar.gz, replaced atomically), so a run stopped
#                 at any point still leaves one file with everything so far. The device tool brings back
#                 at most 8 files from its $OUT: write OUT elsewhere and put FILE there. On this
#                 machine, `python benchmarks/device_report.py collect FILE DEST` unpacks it and draws the plots.
#   --parts LIST  comma list of the parts to run (default: env,correctness,target,phases,million,pytest);
#                 "vit" (not in the default: a ViT-B/16 training step with SDPA's flash backend and the
#                 packed-attention path, about 40 s) and "family" (the contrastive family's Triton epilogue
#                 against its torch implementation, then info_nce_loss K = 0, 1, 7 bf16 vs the materialized
#                 MNRL maths, about 40 s) run only when named, e.g. --parts env,vit for a
#                 second call.
#   --dry-run     the same parts on CPU with the Triton interpreter and tiny sizes (CI runs this);
#                 with --wheels, pip only resolves the install (pip install --dry-run).
#
# Parts, in priority order, each stopped at its own limit so a slow part never starts the next late:
#   env (20 s), correctness (90 s: every kernel against float64, compile warm-up included),
#   target (150 s: B=32768 D=768 bf16, fused vs materialized vs Inf-CL, matmul rate at BxBxD and 8192^3),
#   phases (45 s: tile kernel / dX GEMM / dY GEMM), million (100 s: B=2^20 completes),
#   pytest_gpu_kernels and pytest_gpu_rest (what is left of 470 s: pytest -m gpu, the compiled-kernel
#   tests first).
# Writes into OUT: results.json/.csv (the result-file schema of fastclip.bench.report), part_*.json,
# device_check.json (everything, plus the summary), versions.txt, <part>.log, status.txt, and
# device_check.log (the raw log of the whole run). Prints one summary line per target at the end.
set -u -o pipefail

usage() { echo "usage: bash benchmarks/device_check.sh OUT [--dry-run] [--wheels DIR] [--bundle FILE] [--parts LIST]" >&2; exit 2; }
OUT="" DRY=0 WHEELS="" BUNDLE="" PARTS="env,correctness,target,phases,million,pytest"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --wheels) [ $# -ge 2 ] || usage; WHEELS="$2"; shift ;;
        --bundle) [ $# -ge 2 ] || usage; BUNDLE="$2"; shift ;;
        --parts) [ $# -ge 2 ] || usage; PARTS="$2"; shift ;;
        -*) usage ;;
        *) [ -z "$OUT" ] || usage; OUT="$1" ;;
    esac
    shift
done
[ -n "$OUT" ] || usage
for p in ${PARTS//,/ }; do
    case "$p" in env|correctness|target|phases|million|pytest|vit|family) ;;
        *) echo "--parts: expected names from env,correctness,target,phases,million,pytest,vit,family; got '$p'" >&2; exit 2 ;;
    esac
done
want() { [[ ",$PARTS," == *",$1,"* ]]; }
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if [ -n "$BUNDLE" ]; then
    case "$BUNDLE" in *.tar.gz|*.tgz) ;; *) echo "--bundle: expected a file name ending in .tar.gz or .tgz, got '$BUNDLE'" >&2; exit 2 ;; esac
    mkdir -p "$(dirname "$BUNDLE")"
    BUNDLE="$(cd "$(dirname "$BUNDLE")" && pwd)/$(basename "$BUNDLE")"
    case "$BUNDLE" in "$OUT"/*) echo "--bundle: the file must lie outside OUT ($OUT)" >&2; exit 2 ;; esac
fi
pack() {  # OUT into the bundle, through a temporary name: a run killed mid-pack keeps the last whole one
    [ -n "$BUNDLE" ] || return 0
    tar -czf "$BUNDLE.partial" -C "$OUT" . && mv -f "$BUNDLE.partial" "$BUNDLE" || echo "packing $BUNDLE failed" >&2
}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python || command -v python3)}"  # the GPU image may have only python3
# Never import fastclip from the current folder: `python -m pytest` run here would otherwise load
# ./fastclip, which has no fastclip.kernels (that lives in ./kernels), instead of the installed wheel.
export PYTHONSAFEPATH=1
TOTAL=470
START=$(date +%s)
FAILED=0
DRYFLAG=""
if [ "$DRY" = 1 ]; then
    DRYFLAG="--dry-run"
    export TRITON_INTERPRET=1  # before triton is imported: kernels run through the interpreter on CPU
    TOTAL=270
fi
exec > >(tee -a "$OUT/device_check.log") 2>&1

echo "== device check $( [ "$DRY" = 1 ] && echo '(dry run: CPU, Triton interpreter, tiny sizes)') into $OUT"
if [ -n "$WHEELS" ]; then
    shopt -s nullglob
    whls=("$WHEELS"/*.whl)
    shopt -u nullglob
    [ ${#whls[@]} -gt 0 ] || { echo "no wheels in $WHEELS" >&2; exit 2; }
    if [ "$DRY" = 1 ]; then
        "$PY" -m pip install --dry-run --no-deps --no-index --force-reinstall "${whls[@]}" || FAILED=1
    else
        "$PY" -m pip install --no-deps --no-index --force-reinstall "${whls[@]}" || FAILED=1
    fi
elif ! "$PY" -c "import fastclip.kernels.clip" 2>/dev/null; then
    echo "fastclip is not importable: installing this checkout (--no-deps --no-build-isolation)"
    "$PY" -m pip install --no-deps --no-build-isolation -e . || FAILED=1
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    [ -n "$WHEELS" ] && [ -f "$WHEELS/SOURCE.txt" ] && sed 's/^/wheels /' "$WHEELS/SOURCE.txt"
    nvidia-smi 2>&1 || echo "nvidia-smi not available"
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu \
        --format=csv 2>&1 || true
    "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|numpy|fastclip|inf.cl|open.clip.torch|pytest) " || true
} > "$OUT/versions.txt"
cat "$OUT/versions.txt"
pack

: > "$OUT/status.txt"
part() {  # part NAME SECONDS COMMAND...: run with a hard time limit, log, record the exit status
    local name="$1" secs="$2"
    shift 2
    echo "== $name (limit ${secs} s, $(( $(date +%s) - START )) s elapsed)"
    timeout --signal=INT --kill-after=10 "$secs" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "$name $rc" >> "$OUT/status.txt"
    [ "$rc" -ne 0 ] && FAILED=1
    echo "== $name exit $rc"
    pack
}
dc() {  # dc PART SECONDS: a part of benchmarks/device_check.py; it stops new work 5 s before the limit
    part "$1" "$2" "$PY" benchmarks/device_check.py "$1" "$OUT" $DRYFLAG --seconds $(( $2 - 5 ))
}

want env && dc env 20
want correctness && dc correctness 90
want target && dc target 150
want phases && dc phases 45
want million && dc million 100
want vit && dc vit 60
want family && dc family 60
left() {  # seconds left of TOTAL, less what later parts keep back ($1), at least 30
    local n=$(( TOTAL - ( $(date +%s) - START ) - $1 ))
    [ "$n" -lt 30 ] && n=30
    echo "$n"
}
# pytest -m gpu in two parts, the compiled-kernel tests first (pytest orders files by folder, not by
# the command line): they get what is left less 40 s; the other gpu tests the rest. On CPU (dry run)
# every gpu test is skipped: this exercises the commands, their logs and the summary line.
PYTEST=("$PY" -m pytest -q -m gpu -rs --durations=10 -p no:cacheprovider)
if want pytest; then
    part pytest_gpu_kernels "$(left 40)" "${PYTEST[@]}" tests/test_gpu_kernels.py
    part pytest_gpu_rest "$(left 0)" "${PYTEST[@]}" --ignore=tests/test_gpu_kernels.py tests
fi

echo "== summary ($(( $(date +%s) - START )) s)"
"$PY" benchmarks/device_report.py summary "$OUT" || FAILED=1
pack
[ -n "$BUNDLE" ] && echo "== packed into $BUNDLE"
exit $FAILED
