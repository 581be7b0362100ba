#!/usr/bin/env bash
# Create .venv and install imgfleet with its dev tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# torch is pinned to the CPU build (a looser pin pulls several GB of CUDA wheels).
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 \
    | grep -v "is neither a file nor a directory" || true
.venv/bin/python -c "import torch, faiss, cv2, pyvips, PIL; print('imgfleet environment ready:', \
'torch', torch.__version__, '| faiss', faiss.__version__)"
