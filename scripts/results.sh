#!/usr/bin/env bash
# Reproduce a docs/results.md entry: ingest -> preprocess -> train -> evaluate on
# one real data set, from scratch, with the default configuration, timing each step.
#
#   scripts/results.sh DATA_DIR [--external OTHER_DIR] [extra options for every job, e.g. --set train.seed=7]
#
# With --external, OTHER_DIR is ingested too and the model is evaluated on it
# (evaluate --on). The lake goes to var/results-<name>; the last line is one JSON summary.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="$(cd "${1:?usage: scripts/results.sh DATA_DIR [--external OTHER_DIR] [OPTIONS...]}" && pwd)"
shift
other=""
if [ "${1:-}" = "--external" ]; then
  other="$(cd "${2:?--external needs a folder}" && pwd)"
  shift 2
fi
name="$(basename "$data")"
lake="$root/var/results-$name"
rm -rf "$lake"
mkdir -p "$root/var"
log="$root/var/results-$name.log"
: > "$log"
declare -A took
run() {
  local step="$1"; shift
  local start=$SECONDS
  "$root/scripts/submit.sh" "$@" 2>>"$log" | tail -1 | tee "$root/var/results-$name-$step.json" >&2
  took[$step]=$(( SECONDS - start ))
}
run ingest ingest --lake "$lake" --dataset "$name" --input "$data" --labels "$data/labels.csv" "$@"
run preprocess preprocess --lake "$lake" --dataset "$name" "$@"
run train train --lake "$lake" --dataset "$name" "$@"
run evaluate evaluate --lake "$lake" --dataset "$name" "$@"
external="null"
if [ -n "$other" ]; then
  ext="$(basename "$other")"
  run "ingest-$ext" ingest --lake "$lake" --dataset "$ext" --input "$other" --labels "$other/labels.csv" "$@"
  run external evaluate --lake "$lake" --dataset "$name" --on "$ext" "$@"
  external="$(cat "$root/var/results-$name-external.json")"
fi
printf '{"dataset": "%s", "seconds": {"ingest": %s, "preprocess": %s, "train": %s, "evaluate": %s}, "train": %s, "evaluation": %s, "external": %s}\n' \
  "$name" "${took[ingest]}" "${took[preprocess]}" "${took[train]}" "${took[evaluate]}" \
  "$(cat "$root/var/results-$name-train.json")" "$(cat "$root/var/results-$name-evaluate.json")" "$external"
