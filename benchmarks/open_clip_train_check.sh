#!/usr/bin/env bash
# The real open_clip_train on CPU, open_clip's losses against fastclip's launcher, 1 and 2 processes:
#
#   benchmarks/open_clip_train_check.sh [--kinds clip,siglip,...] [--procs 1,2] [--steps 5] [--json out.json]
#
# Creates the venv it needs when missing ($FASTCLIP_OCT_VENV, default .venv-oct; about 5.5 GB): the
# torchvision that imports here needs torch 2.14.1 (a CUDA build that runs on the CPU), then
# open_clip_torch 3.3.0 with the training dependencies it imports, fastclip editable from this
# checkout. Then runs benchmarks/open_clip_train_check.py there (its docstring says what it compares).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTCLIP_OCT_VENV:-$ROOT/.venv-oct}"
READY="$VENV/.fastclip-oct-ready"   # written last: a half-made venv is rebuilt

if [ ! -f "$READY" ]; then
  PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
  echo "creating $VENV with $PY (torch 2.14.1, torchvision 0.29.1, open_clip_torch 3.3.0)" >&2
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/pip" install -q open_clip_torch==3.3.0 braceexpand webdataset pandas
  "$VENV/bin/pip" install -q numpy safetensors huggingface_hub tqdm
  "$VENV/bin/pip" install -q --no-deps -e "$ROOT"
  "$VENV/bin/python" -c "import torchvision, open_clip_train.main, fastclip.integrations.open_clip"
  touch "$READY"
fi
# PYTHONSAFEPATH: the check imports fastclip from the venv's editable install, not from the cwd.
exec env PYTHONSAFEPATH=1 "$VENV/bin/python" "$ROOT/benchmarks/open_clip_train_check.py" "$@"
