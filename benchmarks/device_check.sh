#!/usr/bin/env bash
# The prepared device check: one command, the whole truth, at most 412 s (+ the summary) on one H200.
#
#   bash benchmarks/device_check.sh OUT [--dry-run] [--wheels DIR] [--bundle FILE] [--parts LIST]
#
#   --wheels DIR  install the wheels in DIR first (pip --no-deps --no-index): fastclip itself and what
#                 the GPU image lacks. Build DIR with benchmarks/build_wheels.sh (its time counts).
#   --bundle FILE after every part, pack OUT into FILE (.tar.gz, replaced atomically), so a run stopped
#                 at any point still leaves one file with everything so far. The device tool brings back
#                 at most 8 files from its $OUT: write OUT elsewhere and put FILE there. Back here,
#                 `python benchmarks/device_report.py collect FILE [DEST]` unpacks it (default DEST:
#                 benchmarks/results/<gpu>-<date>/, what the project commits), the table and the plots.
#   --parts LIST  comma list of parts (default: all but tune, in this order):
#                 env,correctness,target,family,distill,million,phases,vit,trainer,pytest
#                 tune (opt-in, 110 s, runs after vit): the tile-configuration sweep of
#                 benchmarks/device_parts/tune.py; one call of its own:
#                 bash benchmarks/device_check.sh OUT --parts env,tune --bundle FILE
#                 tune_family (opt-in, 70 s, after tune): the same sweep for the contrastive family's
#                 own kernels (family-lse, family-grad); e.g. --parts env,tune,tune_family (~200 s)
#   --dry-run     the same parts on CPU with the Triton interpreter and tiny sizes (CI runs this);
#                 with --wheels, pip only resolves the install (pip install --dry-run).
#
# Parts, in priority order, each stopped at its own limit (seconds; cut to what is left of the 412):
#   env 12, correctness 55 (every kernel against float64, compilation included), target 75 (B = 32768
#   and 65536, D = 768, bf16: fastclip vs materialized vs open_clip under autocast; Inf-CL, siglip-kernel,
#   memeff at 32768), family 40 (info_nce K = 0, 1, 7 at B = 32768 vs materialized / ST MNRL), distill 25,
#   million 70 (B = 2^20 clip, siglip and info_nce K = 1 complete), phases 15, vit 28, trainer 60
#   (tests/test_gpu_trainer.py), pytest min(90, what is left: ~30 s after the others' limits; run
#   `--parts pytest` as its own call when it is cut) (pytest -m gpu without the trainer test); tune 110
#   and tune_family 70 only when named (the default list fills the 412 s; with tune it would not fit a
#   480 s call).
# DEVICE_CHECK_TOTAL overrides the 412 s. Writes into OUT: results.json/.csv (the result-file schema of
# fastclip.bench.report), part_*.json, device_check.json (everything, the summary and the targets
# table), targets.md, versions.txt, <part>.log, status.txt, times.txt (seconds per part) and
# device_check.log (the raw log). Prints the summary lines and then one table: target, measured, met.
set -u -o pipefail

usage() { echo "usage: bash benchmarks/device_check.sh OUT [--dry-run] [--wheels DIR] [--bundle FILE] [--parts LIST]" >&2; exit 2; }
OUT="" DRY=0 WHEELS="" BUNDLE="" PARTS="env,correctness,target,family,distill,million,phases,vit,trainer,pytest"
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
    case "$p" in env|correctness|target|family|distill|million|phases|vit|trainer|pytest|tune|tune_family) ;;
        *) echo "--parts: expected names from env,correctness,target,family,distill,million,phases,vit,trainer,pytest,tune,tune_family; got '$p'" >&2; exit 2 ;;
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
TOTAL=${DEVICE_CHECK_TOTAL:-412}  # seconds for everything (install included); the summary follows
START=$(date +%s)
FAILED=0
DRYFLAG=""
if [ "$DRY" = 1 ]; then
    DRYFLAG="--dry-run"
    export TRITON_INTERPRET=1  # before triton is imported: kernels run through the interpreter on CPU
    TOTAL=${DEVICE_CHECK_TOTAL:-1500}  # CPU shared with other work: the limits x4, no whole-run cut
fi
exec > >(tee -a "$OUT/device_check.log") 2>&1

echo "== device check $( [ "$DRY" = 1 ] && echo '(dry run: CPU, Triton interpreter, tiny sizes)') into $OUT"
if [ -n "$WHEELS" ]; then
    shopt -s nullglob
    whls=("$WHEELS"/*.whl)
    shopt -u nullglob
    [ ${#whls[@]} -gt 0 ] || { echo "no wheels in $WHEELS" >&2; exit 2; }
    if [ "$DRY" = 1 ]; then
        # resolve for the device image (cp312, x86_64 manylinux), not for this machine's Python
        "$PY" -m pip install --dry-run --no-deps --no-index --ignore-installed --only-binary=:all: \
            --target "$OUT/.pip-dry-run" --python-version 3.12 --implementation cp --abi cp312 \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            "${whls[@]}" || FAILED=1
        rm -rf "$OUT/.pip-dry-run"
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
    "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|numpy|fastclip|fastclip.contrastive|inf.cl|open.clip.torch|siglip.kernel|memeff|deepspeed|pydantic|webdataset|sentence.transformers|pytest) " || true
} > "$OUT/versions.txt"
cat "$OUT/versions.txt"
pack

: > "$OUT/status.txt"
echo "install $(( $(date +%s) - START ))" > "$OUT/times.txt"
limit() {  # the limit of a part of $1 seconds: x4 in the dry run (CPU, interpreter), cut to what is left
    local secs="$1" left=$(( TOTAL - ( $(date +%s) - START ) ))
    [ "$DRY" = 1 ] && secs=$(( secs * 4 ))
    [ "$left" -lt "$secs" ] && secs=$left
    echo "$secs"
}
part() {  # part NAME SECONDS COMMAND...: run with a hard time limit (cut to what is left of TOTAL), log, record
    local name="$1" secs t0 rc
    secs=$(limit "$2")
    shift 2
    if [ "$secs" -lt 5 ]; then
        echo "== $name: not started, the whole check's ${TOTAL} s are spent"; echo "$name skipped" >> "$OUT/status.txt"
        return 0
    fi
    echo "== $name (limit ${secs} s, $(( $(date +%s) - START )) s elapsed)"
    t0=$(date +%s)
    timeout --signal=INT --kill-after=5 "$secs" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    echo "$name $rc" >> "$OUT/status.txt"
    echo "$name $(( $(date +%s) - t0 )) $secs" >> "$OUT/times.txt"
    [ "$rc" -ne 0 ] && FAILED=1
    echo "== $name exit $rc ($(( $(date +%s) - t0 )) s)"
    pack
}
dc() {  # dc PART SECONDS: a part of benchmarks/device_check.py; it stops new work 4 s before the limit
    local secs
    secs=$(limit "$2")
    part "$1" "$2" "$PY" benchmarks/device_check.py "$1" "$OUT" $DRYFLAG --seconds $(( secs > 8 ? secs - 4 : secs / 2 ))
}

# Each part: its own limit (seconds), cut to what is left of TOTAL; a part with under 5 s left is not
# started (recorded as "NAME skipped" in status.txt). Limits from the first H200 run's per-part times.
for spec in env:12 correctness:55 target:75 family:40 distill:25 million:70 phases:15 vit:28 tune:110 tune_family:70; do
    want "${spec%%:*}" && dc "${spec%%:*}" "${spec##*:}"
done
if want trainer; then  # the end-to-end trainer test (gpu-marked), its own part
    if [ -f tests/test_gpu_trainer.py ]; then
        part trainer 60 "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_gpu_trainer.py
    else
        echo "== trainer: tests/test_gpu_trainer.py not in this checkout"; echo "trainer missing" >> "$OUT/status.txt"
    fi
fi
# pytest -m gpu without the trainer test: what is left, at most 90 s. On CPU (dry run) every gpu test
# is skipped: this exercises the command, its log and the summary line.
if want pytest; then
    part pytest 90 "$PY" -m pytest -q -m gpu -rs --durations=10 -p no:cacheprovider \
        --ignore=tests/test_gpu_trainer.py tests
fi
echo "total $(( $(date +%s) - START ))" >> "$OUT/times.txt"
echo "== summary ($(( $(date +%s) - START )) s)"
"$PY" benchmarks/device_report.py summary "$OUT" || FAILED=1
pack
[ -n "$BUNDLE" ] && echo "== packed into $BUNDLE"
exit $FAILED
