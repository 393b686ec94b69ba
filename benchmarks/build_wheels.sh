#!/usr/bin/env bash
# Build the folder of wheels that benchmarks/device_check.sh --wheels DIR installs on a GPU machine
# without internet: fastclip itself (this checkout) and the pure-Python packages the GPU image lacks.
#
#   bash benchmarks/build_wheels.sh DIR
set -eu -o pipefail
[ $# -eq 1 ] || { echo "usage: bash benchmarks/build_wheels.sh DIR" >&2; exit 2; }
DIR="$1"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$(command -v python || command -v python3)}"  # the GPU image may have only python3
mkdir -p "$DIR"
"$PY" -m pip download --no-deps inf-cl open_clip_torch -d "$DIR"
# fastclip from a clean copy of the checkout: setuptools would also pack what build/lib still holds
# from earlier builds (stale or deleted modules).
SRC="$(mktemp -d)"
trap 'rm -rf "$SRC"' EXIT
tar -C "$ROOT" --exclude=./build --exclude=./dist --exclude='./.venv*' --exclude=./.git --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=./runs --exclude=./benchmarks/results -cf - . | tar -C "$SRC" -xf -
rm -f "$DIR"/fastclip-*.whl
"$PY" -m pip wheel --no-deps "$SRC" -w "$DIR"
# The commit the wheels were built from (the device machine gets no .git): device_check.sh prints it.
{
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "uncommitted changes: $(git -C "$ROOT" status --porcelain 2>/dev/null | grep -c . || true)"
} > "$DIR/SOURCE.txt"
cat "$DIR/SOURCE.txt"
ls -l "$DIR"
