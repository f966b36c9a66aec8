#!/usr/bin/env bash
# Spark's Thrift JDBC/ODBC server over the lake's catalog, for analysts' SQL
# tools (beeline, DBeaver, Tableau, any Hive JDBC or ODBC driver).
#
#   scripts/thrift.sh start [--lake LAKE] [--env ENV] [--set K=V ...] [--port 10000]
#   scripts/thrift.sh stop|status [--port 10000]
#   .venv/bin/beeline -u jdbc:hive2://127.0.0.1:10000 -e "SELECT count(*) FROM oncolake.latest_predictions"
#
# `start` first declares the lake's tables (oncolake.images, .predictions,
# .quarantine, .latest_predictions) in the same catalog scripts/sql.sh uses
# (an embedded Derby metastore in var/ unless the configuration names a
# shared one), then starts HiveThriftServer2 from pyspark's own jars with the
# jobs' master, jars and Delta conf (local mode by default, the standalone
# cluster with --env cluster), listening on 127.0.0.1 only. An embedded Derby
# metastore admits one JVM: while the server runs, query through it (beeline)
# rather than scripts/sql.sh. Log: var/thrift/thrift.log.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="${ONCOLAKE_THRIFT_DIR:-$root/var/thrift}"
action="${1:-}"
shift || true
port=10000
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --port=*) port="${1#--port=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
pidfile="$state/thrift-$port.pid"
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case "$action" in
  start)
    if running; then echo "thrift.sh: already running (pid $(cat "$pidfile")) on 127.0.0.1:$port"; exit 0; fi
    if listening "$port"; then echo "thrift.sh: port $port is taken by another process" >&2; exit 1; fi
    mkdir -p "$state"
    "$root/scripts/submit.sh" sql "${args[@]}" "SHOW TABLES IN oncolake" > "$state/declare.log" 2>&1 \
      || { echo "thrift.sh: declaring the lake's tables failed; see $state/declare.log" >&2; tail -3 "$state/declare.log" >&2; exit 1; }
    # setsid: the server gets a process group of its own, which stop ends whole
    setsid nohup "$root/scripts/submit.sh" thriftserver "${args[@]}" --port "$port" > "$state/thrift.log" 2>&1 &
    echo $! > "$pidfile"
    for _ in $(seq 1 120); do
      if listening "$port"; then
        echo "thrift.sh: up at jdbc:hive2://127.0.0.1:$port (pid $(cat "$pidfile")); log $state/thrift.log" >&2
        echo "jdbc:hive2://127.0.0.1:$port"
        exit 0
      fi
      running || { echo "thrift.sh: failed to start; see $state/thrift.log" >&2; tail -5 "$state/thrift.log" >&2; exit 1; }
      sleep 1
    done
    echo "thrift.sh: not up after 120 s; see $state/thrift.log" >&2
    exit 1
    ;;
  stop)
    if running; then
      kill -TERM -- "-$(cat "$pidfile")" 2>/dev/null || kill -TERM "$(cat "$pidfile")" 2>/dev/null || true
      for _ in $(seq 1 60); do running || break; sleep 1; done
      running && kill -KILL -- "-$(cat "$pidfile")" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    for _ in $(seq 1 30); do listening "$port" || { echo "thrift.sh: stopped"; exit 0; }; sleep 1; done
    echo "thrift.sh: port $port still open after stop" >&2
    exit 1
    ;;
  status)
    if running && listening "$port"; then echo "thrift.sh: running on 127.0.0.1:$port"; exit 0; fi
    echo "thrift.sh: not running"
    exit 3
    ;;
  *)
    echo "usage: scripts/thrift.sh start|stop|status [--port N] [--lake LAKE] [--env ENV] [--set K=V]" >&2
    exit 2
    ;;
esac
