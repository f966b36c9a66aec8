#!/usr/bin/env bash
# The authenticated REST API and its web page (FastAPI on uvicorn), on
# 127.0.0.1:8000: sign in, predict an uploaded image, read predictions (from
# PostgreSQL, scripts/postgres.sh + scripts/submit.sh export), nights and
# models. OpenAPI docs at /docs. Runs in the foreground; stop it with Ctrl-C
# or SIGTERM.
#
#   ONCOLAKE_JWT_KEY_FILE=var/jwt.key scripts/serve.sh [--port 8000] [--lake LAKE] [--env ENV] [--set K=V]
#
# Needs a signing key of at least 32 bytes (head -c 48 /dev/urandom | base64 > var/jwt.key)
# and the database (serve.database_url); refuses to start without either.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -x "$root/.venv/bin/python" ] || { echo "serve.sh: no environment: run scripts/setup.sh first" >&2; exit 2; }
export PYTHONPATH="$root/lib" TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$root/.venv/bin/python" -m oncolake.serve "$@"
