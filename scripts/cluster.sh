#!/usr/bin/env bash
# A Spark standalone cluster from the installed pyspark: a master at
# spark://127.0.0.1:7077 (UI :8080) and 2 workers of 1 core each.
#
#   scripts/cluster.sh start|stop|status
#   scripts/cluster.sh kill-worker N    # SIGKILL worker N and its executors (fault drills)
#
# Logs and work folders under var/cluster (ignored). `stop` leaves nothing running.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="$root/var/cluster"
workers="${ONCOLAKE_WORKERS:-2}"
[ -x "$root/.venv/bin/python" ] || { echo "cluster.sh: run scripts/setup.sh first" >&2; exit 2; }
spark_home="$("$root/.venv/bin/python" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')"
export SPARK_HOME="$spark_home" SPARK_LOCAL_IP=127.0.0.1 PYSPARK_PYTHON="$root/.venv/bin/python"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
launch() {  # name, class, args...
  local name="$1"; shift
  nohup "$spark_home/bin/spark-class" "$@" > "$state/$name.log" 2>&1 &
  echo $! > "$state/$name.pid"
}
workers_alive() {
  curl -sf http://127.0.0.1:8080/json/ | "$root/.venv/bin/python" -c \
    'import json, sys; print(json.load(sys.stdin).get("aliveworkers", 0))' 2>/dev/null || echo 0
}

case "${1:-}" in
  start)
    mkdir -p "$state"
    alive "$state/master.pid" || launch master org.apache.spark.deploy.master.Master \
        --host 127.0.0.1 --port 7077 --webui-port 8080
    for i in $(seq 1 "$workers"); do
      alive "$state/worker$i.pid" || launch "worker$i" org.apache.spark.deploy.worker.Worker \
          --host 127.0.0.1 --cores 1 --memory 2g --webui-port $((8080 + i)) \
          --work-dir "$state/work$i" spark://127.0.0.1:7077
    done
    for _ in $(seq 1 90); do
      if [ "$(workers_alive)" -ge "$workers" ]; then
        echo "cluster.sh: spark://127.0.0.1:7077 up with $workers workers (UI http://127.0.0.1:8080)"
        exit 0
      fi
      sleep 1
    done
    echo "cluster.sh: workers did not register; see $state/*.log" >&2
    exit 1
    ;;
  stop)
    for pidfile in "$state"/worker*.pid "$state"/master.pid; do
      [ -f "$pidfile" ] || continue
      if alive "$pidfile"; then
        pid="$(cat "$pidfile")"
        pkill -P "$pid" 2>/dev/null || true
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$pid" 2>/dev/null || true
      fi
      rm -f "$pidfile"
    done
    echo "cluster.sh: stopped"
    ;;
  kill-worker)
    pidfile="$state/worker${2:?usage: cluster.sh kill-worker N}.pid"
    alive "$pidfile" || { echo "cluster.sh: worker $2 is not running" >&2; exit 3; }
    pid="$(cat "$pidfile")"
    tree="$pid"; frontier="$pid"
    while [ -n "$frontier" ]; do  # the worker, its executors and their Python workers
      frontier="$(for p in $frontier; do pgrep -P "$p" || true; done | tr '\n' ' ' | xargs)"
      tree="$tree $frontier"
    done
    kill -9 $tree 2>/dev/null || true
    rm -f "$pidfile"
    echo "cluster.sh: killed worker $2 (pids $tree)"
    ;;
  status)
    if alive "$state/master.pid"; then
      echo "cluster.sh: master up, $(workers_alive) workers alive"
    else
      echo "cluster.sh: not running"
      exit 3
    fi
    ;;
  *) echo "usage: scripts/cluster.sh start|stop|status|kill-worker N" >&2; exit 2 ;;
esac
