#!/usr/bin/env bash
# Set up what is missing, then run the test suite (slow integration tests included).
#
#   scripts/test.sh                 # everything CI runs
#   scripts/test.sh -m "not slow"   # the quick part
#   scripts/test.sh tests/test_ingest.py -k quarantine
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ONCOLAKE_TEST_BROWSER=1 "$root/scripts/setup.sh"
cd "$root"
export SPARK_LOCAL_IP="${SPARK_LOCAL_IP:-127.0.0.1}"
export PYSPARK_PYTHON="$root/.venv/bin/python" PYSPARK_DRIVER_PYTHON="$root/.venv/bin/python"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$root/.venv/bin/python" -m pytest "$@"
