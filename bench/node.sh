#!/usr/bin/env bash
# A RabbitMQ node of a benchmark's own, beside the shared broker on 5672, from
# the local `rabbitmq-server`: so that `--broker-pid` measures the bench's
# broker alone, and a quorum WAL or a leaked queue of others weighs nothing.
#
#   bench/node.sh start PORT NAME   # NAME@localhost, AMQP on PORT, management on PORT+10000
#   bench/node.sh pid NAME          # the node's OS pid (for --broker-pid)
#   bench/node.sh stop NAME         # stopped through its node name, its folder removed
#
# Data, logs and the pid file live in /tmp/benchnode-NAME (owned by the
# `rabbitmq` user when run as root, whose Erlang cookie rabbitmqctl uses).
# Nothing here ends a process by name or pattern.
set -euo pipefail

usage() { echo "usage: $0 start PORT NAME | pid NAME | stop NAME" >&2; exit 2; }

as_rabbitmq() {
  if [ "$(id -u)" = 0 ]; then runuser -u rabbitmq -- "$@"; else "$@"; fi
}

cmd=${1:-}
case "$cmd" in
start)
  [ $# = 3 ] || usage
  port=$2 name=$3 dir=/tmp/benchnode-$3
  if [ -e "$dir" ]; then echo "$dir exists: stop $name first" >&2; exit 1; fi
  mkdir -p "$dir"
  cat > "$dir/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$port
management.tcp.port = $((port + 10000))
management.tcp.ip = 127.0.0.1
loopback_users.guest = true
EOF
  echo "[rabbitmq_management]." > "$dir/enabled_plugins"
  [ "$(id -u)" = 0 ] && chown -R rabbitmq:rabbitmq "$dir"
  as_rabbitmq env RABBITMQ_NODENAME="$name@localhost" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
    RABBITMQ_NODE_PORT="$port" \
    RABBITMQ_DIST_PORT=$((port + 20000)) \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_PID_FILE="$dir/pid" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    rabbitmq-server -detached > /dev/null
  as_rabbitmq rabbitmqctl -n "$name@localhost" wait --timeout 120 "$dir/pid" > /dev/null
  echo "node $name@localhost: amqp://guest:guest@127.0.0.1:$port/%2f, pid $(cat "$dir/pid")"
  ;;
pid)
  [ $# = 2 ] || usage
  cat "/tmp/benchnode-$2/pid"
  ;;
stop)
  [ $# = 2 ] || usage
  as_rabbitmq rabbitmqctl -n "$2@localhost" stop > /dev/null || true
  rm -rf "/tmp/benchnode-$2"
  ;;
*) usage ;;
esac
