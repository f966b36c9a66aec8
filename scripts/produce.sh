#!/usr/bin/env bash
# Publish a folder of images to a Kafka topic, one record per image (no Spark).
#
#   scripts/produce.sh --topic TOPIC --dataset NAME --input DIR [--labels CSV] [--lake LAKE]
#
# Record format: lib/oncolake/stream/records.py. Prints a JSON summary last.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -x "$root/.venv/bin/python" ] || { echo "produce.sh: run scripts/setup.sh first" >&2; exit 2; }
export PYTHONPATH="$root/lib"
exec "$root/.venv/bin/python" -m oncolake.stream.produce "$@"
