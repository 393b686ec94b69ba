#!/usr/bin/env bash
# Build the folder of wheels that benchmarks/device_check.sh --wheels DIR installs on the GPU machine
# (no internet; Python 3.12, x86_64 manylinux; torch, triton and numpy already there) with
# `pip install --no-deps --no-index`: fastclip itself (this checkout) and what the image lacks.
#
#   bash benchmarks/build_wheels.sh DIR        # e.g. DIR=.whl (add /.whl/ to .git/info/exclude)
#
# One pinned version of each, so the folder is reproducible:
#   inf-cl, open_clip_torch (+ ftfy, wcwidth): the baselines of the target part;
#   siglip-kernel, memeff: third-party fused losses (their Requires-Dist: torch, triton only);
#   deepspeed (+ hjson, pydantic, pydantic-core cp312, annotated-types, typing-inspection,
#   typing_extensions): the trainer part; webdataset (+ braceexpand): the data path.
# deepspeed is an sdist on PyPI: built here into a py3-none-any wheel (DS_BUILD_OPS=0: no compiled ops).
# Keep the folder under 40 MiB: the working tree plus carried paths travel in 64 MiB.
set -eu -o pipefail
[ $# -eq 1 ] || { echo "usage: bash benchmarks/build_wheels.sh DIR" >&2; exit 2; }
DIR="$1"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$(command -v python || command -v python3)}"  # the GPU image may have only python3
mkdir -p "$DIR"
PURE=(inf-cl==1.2.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 siglip-kernel==0.1.2 memeff==0.3.1
      hjson==3.1.0 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5
      typing_extensions==4.16.0 webdataset==1.0.2 braceexpand==0.1.7)
BINARY=(pydantic-core==2.50.5)  # pydantic 2.14.4 requires exactly this one
TARGET=(--python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY" -m pip download --no-deps --only-binary=:all: "${TARGET[@]}" "${PURE[@]}" -d "$DIR"
"$PY" -m pip download --no-deps --only-binary=:all: "${TARGET[@]}" "${BINARY[@]}" -d "$DIR"
if ! ls "$DIR"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 "$PY" -m pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w "$DIR"
fi
# fastclip from a clean copy of the checkout: setuptools would also pack what build/lib still holds
# from earlier builds (stale or deleted modules).
SRC="$(mktemp -d)"
trap 'rm -rf "$SRC"' EXIT
tar -C "$ROOT" --exclude=./build --exclude=./dist --exclude='./.venv*' --exclude=./.git --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=./runs --exclude=./benchmarks/results --exclude=./.whl -cf - . | tar -C "$SRC" -xf -
rm -f "$DIR"/fastclip-*.whl "$DIR"/fastclip_contrastive-*.whl
"$PY" -m pip wheel --no-deps --no-build-isolation "$SRC" -w "$DIR"
# Every wheel must install on the image: a cp312 x86_64 target, no index, no dependencies.
"$PY" -m pip install --dry-run --no-deps --no-index --ignore-installed --only-binary=:all: \
    --target "$SRC/dry" "${TARGET[@]}" "$DIR"/*.whl
# The commit the wheels were built from (the device machine gets no .git): device_check.sh prints it.
{
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "uncommitted changes: $(git -C "$ROOT" status --porcelain 2>/dev/null | grep -c . || true)"
    echo "wheels: $(cd "$DIR" && ls *.whl | tr '\n' ' ')"
} > "$DIR/SOURCE.txt"
cat "$DIR/SOURCE.txt"
ls -l "$DIR"
du -sh "$DIR"
