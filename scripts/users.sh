#!/usr/bin/env bash
# The API's users, in PostgreSQL (serve.database_url) with Argon2 hashes.
#
#   scripts/users.sh add NAME ROLE     # ROLE: analyst | clinician | operator; password on standard input
#   scripts/users.sh remove NAME
#   scripts/users.sh list
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -x "$root/.venv/bin/python" ] || { echo "users.sh: no environment: run scripts/setup.sh first" >&2; exit 2; }
export PYTHONPATH="$root/lib"
exec "$root/.venv/bin/python" -m oncolake.serve.users "$@"
