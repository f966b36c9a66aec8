#!/usr/bin/env bash
# A real HDFS (NameNode + DataNode, Hadoop's MiniDFSCluster from the cached
# Maven jars) at hdfs://127.0.0.1:9000 with WebHDFS on http://127.0.0.1:9870.
#
#   scripts/hdfs.sh start|stop|status
#
# Data and logs under var/hdfs (ignored). `stop` leaves nothing running.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="$root/var/hdfs"
pidfile="$state/namenode.pid"
conf="$state/core-site.xml"

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case "${1:-}" in
  start)
    if running; then echo "hdfs.sh: already running (pid $(cat "$pidfile"))"; exit 0; fi
    [ -d "$root/.cache/jars/hdfs" ] || { echo "hdfs.sh: no jars: run scripts/setup.sh" >&2; exit 2; }
    mkdir -p "$state"
    rm -rf "$state/data" "$conf"
    cp="$(ls "$root"/.cache/jars/hdfs/*.jar | tr '\n' ':')"
    nohup java -Xmx768m \
      --add-opens=java.base/java.lang=ALL-UNNAMED --add-opens=java.base/java.util=ALL-UNNAMED \
      --add-opens=java.base/java.nio=ALL-UNNAMED --add-opens=java.base/sun.nio.ch=ALL-UNNAMED \
      -Dtest.build.data="$state/data" -Dhadoop.log.dir="$state" \
      -cp "$cp" org.apache.hadoop.test.MiniDFSClusterManager \
      -format -datanodes 1 -nnport 9000 -httpport 9870 \
      -D dfs.webhdfs.enabled=true -D dfs.permissions.enabled=false \
      -D hdfs.minidfs.basedir="$state/data" \
      -writeConfig "$conf" > "$state/hdfs.log" 2>&1 &
    echo $! > "$pidfile"
    for _ in $(seq 1 120); do
      if [ -s "$conf" ] && curl -sf "http://127.0.0.1:9870/webhdfs/v1/?op=GETFILESTATUS" >/dev/null; then
        echo "hdfs.sh: up at hdfs://127.0.0.1:9000 (WebHDFS http://127.0.0.1:9870), pid $(cat "$pidfile")"
        exit 0
      fi
      running || { echo "hdfs.sh: failed to start; see $state/hdfs.log" >&2; tail -5 "$state/hdfs.log" >&2; exit 1; }
      sleep 1
    done
    echo "hdfs.sh: not up after 120 s; see $state/hdfs.log" >&2
    exit 1
    ;;
  stop)
    if running; then
      kill "$(cat "$pidfile")"
      for _ in $(seq 1 30); do running || break; sleep 1; done
      running && kill -9 "$(cat "$pidfile")"
    fi
    rm -f "$pidfile"
    echo "hdfs.sh: stopped"
    ;;
  status)
    if running; then echo "hdfs.sh: running (pid $(cat "$pidfile"))"; else echo "hdfs.sh: not running"; exit 3; fi
    ;;
  *) echo "usage: scripts/hdfs.sh start|stop|status" >&2; exit 2 ;;
esac
