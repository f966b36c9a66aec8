#!/usr/bin/env bash
# The nightly job for a scheduler: ingest what landed in nightly.incoming (a
# folder) or was published to nightly.topic (Kafka, stream_ingest
# --available-now), score it, append the night to gold.nightly_runs,
# regenerate LAKE/reports/nightly.html; with nightly.export=true, export the
# predictions to PostgreSQL (serve.database_url, scripts/submit.sh export).
#
#   scripts/nightly.sh [--env ENV] [--lake LAKE] [--set nightly.dataset=NAME --set nightly.incoming=DIR]
#   scripts/nightly.sh [--env ENV] [--lake LAKE] [--set nightly.dataset=NAME --set nightly.topic=TOPIC]
#
# crontab (02:30 every night, output kept):
#   30 2 * * *  cd /opt/oncolake && scripts/nightly.sh --env cluster >> var/nightly.out 2>&1
set -euo pipefail
exec "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/submit.sh" nightly "$@"
