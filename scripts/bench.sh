#!/usr/bin/env bash
# Run one capability's benchmark next to its baseline, in the same invocation.
#
#   scripts/bench.sh ingest|preprocess|train|score|dicom [--data DIR] [--set K=V ...]
#
# Prints progress on stderr and one JSON line with both rates and their ratio.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
what="${1:?usage: scripts/bench.sh ingest|preprocess|train|score|dicom [ARGS...]}"
shift
script="$root/scripts/bench/$what.py"
[ -f "$script" ] || { echo "bench.sh: no benchmark $what (scripts/bench/)" >&2; exit 2; }
exec "$root/scripts/submit.sh" "$script" --set spark.conf.spark.driver.memory=1g "$@"
