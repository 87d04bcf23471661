#!/usr/bin/env bash
# One set-up command: installs gram (editable) and every dependency into the ACTIVE Python environment.
# Activate a venv or conda env first if you want isolation; on a fresh machine it uses the system Python.
# Safe to re-run. Uses pip on purpose: uv/poetry bypass local wheel caches and can download GBs of CUDA wheels.
# Optional video backends (data.video_backend): `bash preinstall.sh decord torchcodec`. torchcodec also needs the
# system FFmpeg libraries: installed with apt-get where apt and root (or password-less sudo) are available;
# otherwise a warning prints the command and the base install still succeeds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PY="${PYTHON:-python3}"
die() { echo "preinstall.sh: ERROR: $*" >&2; exit 1; }
warn() { echo "preinstall.sh: WARNING: $*" >&2; }
FFMPEG_LIBS="libavcodec59 libavformat59 libavutil57 libswresample4 libswscale6 libavdevice59 libavfilter8"

EXTRAS="dev"
for extra in "$@"; do
  case "$extra" in
    decord|torchcodec|opencv) EXTRAS="$EXTRAS,$extra" ;;
    *) die "unknown extra '$extra'; expected any of: decord torchcodec opencv (e.g. bash preinstall.sh torchcodec)" ;;
  esac
done

command -v "$PY" >/dev/null 2>&1 || die "no '$PY' on PATH. Install Python >= 3.10 or set PYTHON=/path/to/python."
"$PY" - <<'PYEOF' || die "Python >= 3.10 is required (found $("$PY" -V 2>&1))."
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
PYEOF
"$PY" -m pip --version >/dev/null 2>&1 || die "pip is missing for $PY. Run: $PY -m ensurepip --upgrade"

echo "preinstall.sh: installing gram and its dependencies into $("$PY" -c 'import sys; print(sys.prefix)')"
# torch first with its exact companions, so the resolver never picks a mismatched torchvision/torchaudio.
"$PY" -m pip install --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" "torchaudio==2.11.0" \
  || die "installing torch 2.14.1 / torchvision 0.29.1 / torchaudio 2.11.0 failed (see pip's message above)."
"$PY" -m pip install --disable-pip-version-check -e ".[$EXTRAS]" \
  || die "installing gram (pip install -e .[$EXTRAS]) failed (see pip's message above)."

"$PY" - <<'PYEOF' || die "the installed packages do not import together; see the traceback above."
import torch, torchvision, torchaudio, av, transformers, timm, open_clip, hydra, safetensors, webdataset, gram
print(f"preinstall.sh: OK  torch {torch.__version__}  torchvision {torchvision.__version__}  "
      f"torchaudio {torchaudio.__version__}  transformers {transformers.__version__}  timm {timm.__version__}")
PYEOF

torchcodec_loads() { "$PY" -c "from torchcodec.decoders import VideoDecoder" >/dev/null 2>&1; }
if [[ ",$EXTRAS," == *",torchcodec,"* ]] && ! torchcodec_loads; then
  # torchcodec links against the system FFmpeg; PyAV and decord2 bundle their own.
  SUDO=""
  [[ "$(id -u)" != 0 ]] && sudo -n true >/dev/null 2>&1 && SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [[ "$(id -u)" == 0 ]] || [[ -n "$SUDO" ]]; }; then
    echo "preinstall.sh: installing the FFmpeg shared libraries for torchcodec (apt-get)"
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
        --no-install-recommends $FFMPEG_LIBS; } || warn "apt-get could not install the FFmpeg libraries."
  fi
  if torchcodec_loads; then
    echo "preinstall.sh: OK  torchcodec loads the system FFmpeg"
  else
    warn "torchcodec cannot load the system FFmpeg libraries, so data.video_backend=torchcodec will not work" \
      "(pyav and decord do). Install them, e.g. on Debian/Ubuntu: apt-get install $FFMPEG_LIBS"
  fi
fi
