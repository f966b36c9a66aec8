#!/usr/bin/env bash
# A real HDFS at hdfs://127.0.0.1:9000 (WebHDFS on http://127.0.0.1:9870):
# Hadoop's own NameNode and DataNode daemons (what `hdfs namenode` and `hdfs
# datanode` run), each in a JVM of its own, from the Maven jars of Hadoop's
# MiniDFSCluster (cached by setup.sh). The DataNode can be stopped and
# restarted alone, as a lost machine would be; a MiniDFSCluster runs both in
# one JVM and can do neither.
#
#   scripts/hdfs.sh start|stop|status
#   scripts/hdfs.sh stop-datanode|start-datanode   # the DataNode alone; its blocks stay on disk
#
# Data and logs under var/hdfs (ignored). `stop` leaves nothing running.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="$root/var/hdfs"
nn_pid="$state/namenode.pid"
dn_pid="$state/datanode.pid"
# Both daemons' settings (the DataNode's below); safe mode is left at once (no blocks yet to wait for).
namenode=(-D fs.defaultFS=hdfs://127.0.0.1:9000 -D dfs.namenode.rpc-address=127.0.0.1:9000
          -D dfs.namenode.http-address=127.0.0.1:9870 -D dfs.namenode.name.dir="file://$state/data/namenode"
          -D hadoop.tmp.dir="$state/data/tmp" -D dfs.replication=1 -D dfs.permissions.enabled=false
          -D dfs.webhdfs.enabled=true -D dfs.namenode.safemode.extension=0)
jmx="http://127.0.0.1:9870/jmx?qry=Hadoop:service=NameNode,name=FSNamesystemState"
opens=(--add-opens=java.base/java.lang=ALL-UNNAMED --add-opens=java.base/java.util=ALL-UNNAMED
       --add-opens=java.base/java.nio=ALL-UNNAMED --add-opens=java.base/sun.nio.ch=ALL-UNNAMED)

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
classpath() {
  [ -d "$root/.cache/jars/hdfs" ] || { echo "hdfs.sh: no jars: run scripts/setup.sh" >&2; exit 2; }
  ls "$root"/.cache/jars/hdfs/*.jar | tr '\n' ':'
}
live_datanodes() { curl -sf "$jmx" | sed -n 's/.*"NumLiveDataNodes" : \([0-9]*\).*/\1/p'; }
registered() {  # the DataNode's own view: registered with the NameNode's block pool, and heartbeating
  curl -sf "http://127.0.0.1:9864/jmx?qry=Hadoop:service=DataNode,name=DataNodeInfo" \
    | grep '"BPServiceActorInfo"' | grep -q 'ActorState\\":\\"RUNNING.*BP-'
}
halt() {  # pidfile: TERM, then KILL after 30 s
  if running "$1"; then
    kill "$(cat "$1")"
    for _ in $(seq 1 30); do running "$1" || break; sleep 1; done
    running "$1" && kill -9 "$(cat "$1")"
  fi
  rm -f "$1"
}

await() {  # await WHAT PIDFILE LOG CHECK...: until CHECK succeeds; fails if WHAT's process ends, or after 120 s
  local what="$1" pidfile="$2" logfile="$3"; shift 3
  for _ in $(seq 1 120); do
    "$@" && return 0
    running "$pidfile" || { echo "hdfs.sh: the $what failed to start; see $logfile" >&2; tail -5 "$logfile" >&2; exit 1; }
    sleep 1
  done
  echo "hdfs.sh: the $what was not up after 120 s; see $logfile" >&2
  exit 1
}

start_datanode() {
  if running "$dn_pid"; then echo "hdfs.sh: DataNode already running (pid $(cat "$dn_pid"))"; return 0; fi
  running "$nn_pid" || { echo "hdfs.sh: the NameNode is not running: scripts/hdfs.sh start" >&2; exit 1; }
  nohup java -Xmx512m "${opens[@]}" -Dhadoop.log.dir="$state" -cp "$(classpath)" \
    org.apache.hadoop.hdfs.server.datanode.DataNode \
    -D fs.defaultFS=hdfs://127.0.0.1:9000 -D dfs.datanode.data.dir="file://$state/data/datanode" \
    -D dfs.datanode.hostname=127.0.0.1 -D dfs.datanode.address=127.0.0.1:9866 \
    -D dfs.datanode.http.address=127.0.0.1:9864 -D dfs.datanode.ipc.address=127.0.0.1:9867 \
    -D dfs.permissions.enabled=false >> "$state/datanode.log" 2>&1 &
  echo $! > "$dn_pid"
  await DataNode "$dn_pid" "$state/datanode.log" registered
  echo "hdfs.sh: DataNode up, pid $(cat "$dn_pid")"
}

case "${1:-}" in
  start)
    if running "$nn_pid"; then echo "hdfs.sh: already running (pid $(cat "$nn_pid"))"; start_datanode; exit 0; fi
    cp="$(classpath)"
    mkdir -p "$state"
    rm -rf "$state/data" "$state/namenode.log" "$state/datanode.log"
    java -Xmx512m "${opens[@]}" -Dhadoop.log.dir="$state" -cp "$cp" org.apache.hadoop.hdfs.server.namenode.NameNode \
      "${namenode[@]}" -format -nonInteractive > "$state/format.log" 2>&1 \
      || { echo "hdfs.sh: formatting the NameNode failed; see $state/format.log" >&2; exit 1; }
    nohup java -Xmx768m "${opens[@]}" -Dhadoop.log.dir="$state" -cp "$cp" \
      org.apache.hadoop.hdfs.server.namenode.NameNode "${namenode[@]}" > "$state/namenode.log" 2>&1 &
    echo $! > "$nn_pid"
    await NameNode "$nn_pid" "$state/namenode.log" curl -sf -o /dev/null "http://127.0.0.1:9870/webhdfs/v1/?op=GETFILESTATUS"
    start_datanode
    echo "hdfs.sh: up at hdfs://127.0.0.1:9000 (WebHDFS http://127.0.0.1:9870), NameNode pid $(cat "$nn_pid")"
    ;;
  stop)
    halt "$dn_pid"
    halt "$nn_pid"
    echo "hdfs.sh: stopped"
    ;;
  start-datanode) start_datanode ;;
  stop-datanode)
    halt "$dn_pid"
    echo "hdfs.sh: DataNode stopped (its blocks stay in $state/data/datanode)"
    ;;
  status)
    if running "$nn_pid"; then
      dn="not running"; running "$dn_pid" && dn="pid $(cat "$dn_pid")"
      echo "hdfs.sh: running (NameNode pid $(cat "$nn_pid"); DataNode $dn; the NameNode counts $(live_datanodes) live)"
    else
      echo "hdfs.sh: not running"; exit 3
    fi
    ;;
  *) echo "usage: scripts/hdfs.sh start|stop|status|stop-datanode|start-datanode" >&2; exit 2 ;;
esac
