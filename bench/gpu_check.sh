#!/usr/bin/env bash
# `make gpu-check`: run bench/gpu_check.py with the first python found. The script itself needs only the
# standard library (it never imports torch); the checks run under the python whose torch sees CUDA, which it
# finds itself. GPU_CHECK_PYTHON names that python; GPU_CHECK_OUT, GPU_CHECK_BUDGET_S and GPU_CHECK_WHEELS
# are read by the script (see its docstring). On a machine without a CUDA device it exits 0 at once.
set -u
cd "$(dirname "$0")/.." || exit 1
for py in "${GPU_CHECK_PYTHON:-}" python3 python; do
    if [ -n "$py" ] && command -v "$py" >/dev/null 2>&1; then
        exec "$py" bench/gpu_check.py "$@"
    fi
done
echo "gpu-check: no python3 or python on PATH" >&2
exit 1
