#!/usr/bin/env bash
# Query the lake's tables with Spark SQL: oncolake.images, oncolake.predictions,
# oncolake.quarantine, oncolake.latest_predictions.
#
#   scripts/sql.sh [--lake LAKE] "SELECT count(*) FROM oncolake.predictions"
set -euo pipefail
exec "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/submit.sh" sql "$@"
