#!/usr/bin/env bash
# Run one oncolake job with spark-submit.
#
#   scripts/submit.sh JOB [--master URL] [--env ENV] [--set KEY=VALUE ...] [JOB ARGS...]
#
# Ships lib/oncolake as a zip (--py-files), the cached Delta jars (--jars) and
# the configured Spark conf; master is local[*] unless --master or the
# configuration (conf/<env>.yaml, ONCOLAKE_SPARK_MASTER) says otherwise.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$root/.venv/bin/spark-submit" ]; then
  echo "submit.sh: no environment: run scripts/setup.sh first" >&2
  exit 2
fi
mkdir -p "$root/var"
# Not `export X="$(...)"`: export's own status would hide a failed build.
zip="$("$root/scripts/package.sh")" || { echo "submit.sh: building the package zip failed" >&2; exit 1; }
export ONCOLAKE_ZIP="$zip"
export SPARK_LOCAL_IP="${SPARK_LOCAL_IP:-127.0.0.1}"
# The launcher itself runs from lib/; the job runs from the zip it ships.
export PYTHONPATH="$root/lib"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$root/.venv/bin/python" -m oncolake.submit "$@"
