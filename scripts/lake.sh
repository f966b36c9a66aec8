#!/usr/bin/env bash
# Inspect and load a lake on HDFS over WebHDFS (no Spark, no Hadoop client).
#
#   scripts/lake.sh ls [-R] PATH | put LOCAL PATH | get PATH LOCAL | du PATH | tables [LAKE]
#   scripts/lake.sh --env cluster tables          # the lake of conf/cluster.yaml
#
# PATH is /abs/path or hdfs://host:port/abs/path; WebHDFS is hdfs.webhdfs_url.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -x "$root/.venv/bin/python" ] || { echo "lake.sh: no environment: run scripts/setup.sh first" >&2; exit 2; }
export PYTHONPATH="$root/lib"
exec "$root/.venv/bin/python" -m oncolake.lakectl "$@"
