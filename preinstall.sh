#!/usr/bin/env bash
# One set-up command: installs gram (editable) and every dependency into the ACTIVE Python environment.
# Activate a venv or conda env first if you want isolation; on a fresh machine it uses the system Python.
# Safe to re-run. Uses pip on purpose: uv/poetry bypass local wheel caches and can download GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PY="${PYTHON:-python3}"
die() { echo "preinstall.sh: ERROR: $*" >&2; exit 1; }

command -v "$PY" >/dev/null 2>&1 || die "no '$PY' on PATH. Install Python >= 3.10 or set PYTHON=/path/to/python."
"$PY" - <<'PYEOF' || die "Python >= 3.10 is required (found $("$PY" -V 2>&1))."
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
PYEOF
"$PY" -m pip --version >/dev/null 2>&1 || die "pip is missing for $PY. Run: $PY -m ensurepip --upgrade"

echo "preinstall.sh: installing gram and its dependencies into $("$PY" -c 'import sys; print(sys.prefix)')"
# torch first with its exact companions, so the resolver never picks a mismatched torchvision/torchaudio.
"$PY" -m pip install --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" "torchaudio==2.11.0" \
  || die "installing torch 2.14.1 / torchvision 0.29.1 / torchaudio 2.11.0 failed (see pip's message above)."
"$PY" -m pip install --disable-pip-version-check -e ".[dev]" \
  || die "installing gram (pip install -e .[dev]) failed (see pip's message above)."

"$PY" - <<'PYEOF' || die "the installed packages do not import together; see the traceback above."
import torch, torchvision, torchaudio, av, transformers, timm, open_clip, hydra, safetensors, webdataset, gram
print(f"preinstall.sh: OK  torch {torch.__version__}  torchvision {torchvision.__version__}  "
      f"torchaudio {torchaudio.__version__}  transformers {transformers.__version__}  timm {timm.__version__}")
PYEOF
