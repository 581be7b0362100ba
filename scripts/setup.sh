#!/usr/bin/env bash
# Create .venv and install imgfleet with its dev tools. Safe to run again.
#   --with-vision  also create .venv-vision (timm and open_clip, which need torchvision;
#                  scripts/setup-vision.sh): what the test suite's vision tests run in.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
with_vision=0
for arg in "$@"; do
    case "$arg" in
        --with-vision) with_vision=1 ;;
        *) echo "usage: $0 [--with-vision]" >&2; exit 2 ;;
    esac
done
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
quiet_pip() {
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
        | grep -v "is neither a file nor a directory" || true
}
# The CPU build of torch first: the project admits a range (the vision environment takes
# the torch that torchvision was built for), and a looser request pulls several GB of
# CUDA wheels. With 2.13.0 installed, the range installs nothing more.
quiet_pip torch==2.13.0
quiet_pip -e '.[dev]'
.venv/bin/python -c "import torch, faiss, cv2, pyvips, PIL, onnxruntime; \
from workers.embed.efficientnet_lite import weights_path; weights_path(); \
print('imgfleet environment ready:', 'torch', torch.__version__, '| faiss', faiss.__version__, \
'| onnxruntime', onnxruntime.__version__)"
if [ "$with_vision" = 1 ]; then
    ./scripts/setup-vision.sh
fi
