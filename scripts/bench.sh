#!/usr/bin/env bash
# Run one capability's benchmark next to its baseline, in the same invocation.
#
#   scripts/bench.sh ingest|preprocess|train|score|dicom|stream|serve|large|precision|batchnorm|flips|colour|gap|network|jvm [--data DIR] [--set K=V ...]
#
# Prints progress on stderr and one JSON line with both rates and their ratio.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
what="${1:?usage: scripts/bench.sh ingest|preprocess|train|score|dicom|stream|serve|large|precision|batchnorm|flips|colour|gap|network|jvm [ARGS...]}"
shift
script="$root/scripts/bench/$what.py"
[ -f "$script" ] || { echo "bench.sh: no benchmark $what (scripts/bench/)" >&2; exit 2; }
if [ "$what" = jvm ]; then
  # starts the jobs' JVMs itself, through scripts/submit.sh
  exec "$root/.venv/bin/python" "$script" "$@"
fi
if [ "$what" = stream ] && ! "$root/scripts/kafka.sh" status >/dev/null; then
  # the broker for this run only: started here, stopped when the benchmark ends
  "$root/scripts/kafka.sh" start >&2
  trap '"$root/scripts/kafka.sh" stop >&2' EXIT
  "$root/scripts/submit.sh" "$script" --set spark.conf.spark.driver.memory=1g "$@"
  exit
fi
exec "$root/scripts/submit.sh" "$script" --set spark.conf.spark.driver.memory=1g "$@"
