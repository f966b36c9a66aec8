#!/usr/bin/env bash
# Reproduce a docs/results.md entry: ingest -> preprocess -> train -> evaluate on
# one real data set, from scratch, timing each step.
#
#   scripts/results.sh DATA_DIR [SIZE] [EPOCHS] [extra --set options for every job...]
#
# The lake goes to var/results-<name>; the last line is one JSON summary.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="$(cd "${1:?usage: scripts/results.sh DATA_DIR [SIZE] [EPOCHS]}" && pwd)"
size="${2:-96}"
epochs="${3:-30}"
shift $(( $# < 3 ? $# : 3 ))
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
run preprocess preprocess --lake "$lake" --dataset "$name" --size "$size" \
    --set preprocess.balance=class_weight "$@"
run train train --lake "$lake" --dataset "$name" --epochs "$epochs" --num-proc 2 "$@"
run evaluate evaluate --lake "$lake" --dataset "$name" "$@"
printf '{"dataset": "%s", "size": %s, "epochs": %s, "seconds": {"ingest": %s, "preprocess": %s, "train": %s, "evaluate": %s}, "evaluation": %s}\n' \
  "$name" "$size" "$epochs" "${took[ingest]}" "${took[preprocess]}" "${took[train]}" "${took[evaluate]}" \
  "$(cat "$root/var/results-$name-evaluate.json")"
