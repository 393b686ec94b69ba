#!/usr/bin/env bash
# The long GPU run (for the short, prepared check with its JSON summary see benchmarks/device_check.sh).
# One command for a GPU machine: the GPU tests, the loss sweep and the training-step benchmark,
# everything written into one results folder. Finishes within 10 minutes: each part has its own
# time limit (tests 240 s, loss sweep 270 s, train bench 75 s) and a part that fails or times
# out does not stop the others; the exit status is non-zero if any part failed.
#
#   bash benchmarks/gpu_suite.sh RESULTS_DIR
#
# Writes: versions.txt (nvidia-smi, torch, triton, fastclip), pytest_gpu.log, loss.{json,csv,log},
# loss_{time,memory}.png, train.{json,log}, status.txt (exit code of each part).
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/gpu_suite.sh RESULTS_DIR" >&2
    exit 2
fi
OUT="$1"
mkdir -p "$OUT"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python || command -v python3)}"  # the GPU image may have only python3
export PYTHONSAFEPATH=1  # never import ./fastclip (it has no fastclip.kernels): the installed package
START=$(date +%s)
FAILED=0

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(hostname)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    nvidia-smi 2>&1 || echo "nvidia-smi not available"
    "$PY" - <<'PYEOF' 2>&1
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton not importable:", exc)
import fastclip
print("fastclip", fastclip.__version__)
for name in ("open_clip", "inf_cl", "flash_attn", "deepspeed"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "importable"))
    except Exception as exc:
        print(name, "not importable:", type(exc).__name__)
PYEOF
} > "$OUT/versions.txt"
cat "$OUT/versions.txt"

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log, record the exit status
    local name="$1" secs="$2"
    shift 2
    echo "== $name (limit ${secs}s): $*"
    timeout --signal=INT --kill-after=15 "$secs" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "$name $rc" >> "$OUT/status.txt"
    [ "$rc" -ne 0 ] && FAILED=1
    echo "== $name exit $rc after $(( $(date +%s) - START )) s total"
}

: > "$OUT/status.txt"
part pytest_gpu 240 "$PY" -m pytest -m gpu -q -rs --durations=15 tests
part loss 270 "$PY" -m fastclip.cli bench loss --out "$OUT" --name loss --max-seconds 240
part train 75 "$PY" -m fastclip.cli bench train --out "$OUT" --name train --max-seconds 60

echo "== done in $(( $(date +%s) - START )) s; results in $OUT"
cat "$OUT/status.txt"
exit $FAILED
