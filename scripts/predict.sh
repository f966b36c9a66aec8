#!/usr/bin/env bash
# Predict single images with a registered model (no Spark; research use only).
#
#   scripts/predict.sh --lake LAKE --dataset NAME [--model N] IMAGE [IMAGE ...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -x "$root/.venv/bin/python" ] || { echo "predict.sh: run scripts/setup.sh first" >&2; exit 2; }
export PYTHONPATH="$root/lib" TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$root/.venv/bin/python" -m oncolake.predict "$@"
