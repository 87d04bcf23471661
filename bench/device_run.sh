#!/usr/bin/env bash
# The GPU check as one unattended command on a lent machine (the `device` tool), about 7 minutes:
#   run(command="bash bench/device_run.sh", carry=[".whl"], timeout_s=600)
# after `bash bench/device_wheels.sh` here. Installs the carried wheels, then runs bench/gpu.py (budget
# GPU_BUDGET_S, default 330 s) and bench/trace_kernels.py, and leaves the JSON results, the logs and bench/README.md
# with the appended table under $OUT (bench/results when $OUT is unset). Each part is time-boxed, so a hang in
# one still returns the other's files. `bash bench/device_run.sh --smoke` runs both on the CPU in seconds (the
# plumbing only: tests/test_bench_gpu.py).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "device_run.sh: no nvidia-smi" >&2
smoke=()
[ "${1:-}" = "--smoke" ] && smoke=(--smoke)
if [ -z "${smoke[*]}" ] && compgen -G ".whl/*.whl" >/dev/null; then  # the wheels are for the machine's Python 3.12
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "device_run.sh: installing the wheels in .whl/ failed (see pip above)" >&2; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
status=0
budget="${GPU_BUDGET_S:-330}"
timeout $((budget + 60)) "$PY" bench/gpu.py "${smoke[@]}" --budget-s "$budget" --out "$OUT/gpu.json" 2>&1 \
  | tee "$OUT/gpu.log" || status=1
cp bench/README.md "$OUT/bench-README.md"
timeout 100 "$PY" bench/trace_kernels.py "${smoke[@]}" --out-dir "$OUT" 2>&1 | tee "$OUT/trace.log" || status=1
gzip -f "$OUT"/*.trace.json 2>/dev/null  # a full-size trace is tens of MB; Perfetto opens the .gz as it is
exit $status
