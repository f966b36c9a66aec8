#!/usr/bin/env bash
# A real single-node Apache Kafka broker in KRaft mode (no ZooKeeper) from the
# cached Maven jars (conf/jvm.txt, group kafka): broker on 127.0.0.1:9092,
# controller on 127.0.0.1:9093.
#
#   scripts/kafka.sh start|stop|status
#
# Data and logs under var/kafka (ignored); `start` keeps the data of an earlier
# run (topics survive a restart), `start --fresh` formats it anew. Records of
# up to 16 MiB are accepted (larger images go through the claim check,
# scripts/produce.sh). `stop` leaves nothing running and both ports closed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="${ONCOLAKE_KAFKA_DIR:-$root/var/kafka}"
port="${ONCOLAKE_KAFKA_PORT:-9092}"
controller="$((port + 1))"
pidfile="$state/broker.pid"
props="$state/server.properties"

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

case "${1:-}" in
  start)
    if running; then echo "kafka.sh: already running (pid $(cat "$pidfile")) on 127.0.0.1:$port"; exit 0; fi
    [ -d "$root/.cache/jars/kafka" ] || { echo "kafka.sh: no jars: run scripts/setup.sh" >&2; exit 2; }
    if listening "$port"; then echo "kafka.sh: port $port is taken by another process" >&2; exit 1; fi
    [ "${2:-}" = --fresh ] && rm -rf "$state"
    mkdir -p "$state"
    cat > "$props" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$state/data
num.partitions=2
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
message.max.bytes=16777216
replica.fetch.max.bytes=16777216
auto.create.topics.enable=true
log.retention.hours=-1
log.retention.bytes=-1
PROPS
    cp="$(ls "$root"/.cache/jars/kafka/*.jar | tr '\n' ':')"
    java=(java -Xmx512m -Dlog4j.configuration="file:$state/log4j.properties" -cp "$cp")
    printf 'log4j.rootLogger=WARN, stdout\nlog4j.appender.stdout=org.apache.log4j.ConsoleAppender\nlog4j.appender.stdout.layout=org.apache.log4j.PatternLayout\nlog4j.appender.stdout.layout.ConversionPattern=%%d %%p %%c: %%m%%n\nlog4j.logger.kafka.server.KafkaServer=INFO\nlog4j.logger.kafka.server.KafkaRaftServer=INFO\n' \
      > "$state/log4j.properties"
    if [ ! -f "$state/data/meta.properties" ]; then
      "${java[@]}" kafka.tools.StorageTool format -t "$("${java[@]}" kafka.tools.StorageTool random-uuid)" \
        -c "$props" > "$state/format.log" 2>&1 \
        || { echo "kafka.sh: formatting the log directory failed; see $state/format.log" >&2; exit 1; }
    fi
    nohup "${java[@]}" kafka.Kafka "$props" > "$state/kafka.log" 2>&1 &
    echo $! > "$pidfile"
    for _ in $(seq 1 90); do
      if listening "$port" && grep -q -E "Kafka Server started|KafkaRaftServer.*started" "$state/kafka.log"; then
        echo "kafka.sh: up at 127.0.0.1:$port (KRaft), pid $(cat "$pidfile")"
        exit 0
      fi
      running || { echo "kafka.sh: failed to start; see $state/kafka.log" >&2; tail -5 "$state/kafka.log" >&2; exit 1; }
      sleep 1
    done
    echo "kafka.sh: not up after 90 s; see $state/kafka.log" >&2
    exit 1
    ;;
  stop)
    if running; then
      kill "$(cat "$pidfile")"
      for _ in $(seq 1 60); do running || break; sleep 1; done
      running && kill -9 "$(cat "$pidfile")"
    fi
    rm -f "$pidfile"
    for _ in $(seq 1 20); do listening "$port" || listening "$controller" || break; sleep 0.5; done
    echo "kafka.sh: stopped"
    ;;
  status)
    if running; then echo "kafka.sh: running (pid $(cat "$pidfile")) on 127.0.0.1:$port"
    else echo "kafka.sh: not running"; exit 3; fi
    ;;
  *) echo "usage: scripts/kafka.sh start [--fresh]|stop|status" >&2; exit 2 ;;
esac
