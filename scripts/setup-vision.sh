#!/usr/bin/env bash
# Create .venv-vision: imgfleet with timm and open_clip, for the timm:/open_clip: model
# families and tests/vision. Safe to run again.
#
# A second venv because torchvision must match the torch build it was made for, and the
# main .venv keeps the small CPU build of torch (torch 2.13.0 has no torchvision here).
# torch 2.14.1 is a CUDA build (~5.5 GB with its nvidia-* wheels); it runs on the CPU too.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-vision
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# Keep git, and so ruff, out of it (Python 3.13's venv writes the same file).
[ -f "$VENV/.gitignore" ] || echo '*' >"$VENV/.gitignore"
pip_quiet() {
    # pipefail: pip's own failure still stops the script; grep finding nothing does not.
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
        | { grep -v "is neither a file nor a directory" || true; }
}
# torch first, pinned, so resolving the extras never swaps it for another build.
if ! "$VENV/bin/python" -c "import torch, torchvision, sys; \
sys.exit(torch.__version__.split('+')[0] != '2.14.1' or not torchvision.__version__.startswith('0.29.1'))" \
    2>/dev/null; then
    pip_quiet "${TORCH_PINS[@]}"
fi
pip_quiet -e '.[dev,vision]' "${TORCH_PINS[@]}"
"$VENV/bin/python" -c "import torch, torchvision, timm, open_clip, transformers; \
print('imgfleet vision environment ready:', 'torch', torch.__version__, \
'| torchvision', torchvision.__version__, '| timm', timm.__version__, \
'| open_clip', open_clip.__version__, '| transformers', transformers.__version__)"
