#!/usr/bin/env bash
# Start the machine's RabbitMQ when nothing answers on 127.0.0.1:5672; the tests need a real broker.
set -euo pipefail
port_open() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if port_open; then
  exit 0
fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "RabbitMQ is not running on 127.0.0.1:5672 and rabbitmq-server is not installed" >&2
  echo "(Debian: apt-get install rabbitmq-server)" >&2
  exit 1
fi
echo "starting RabbitMQ (rabbitmq-server -detached)"
rabbitmq-server -detached
for _ in $(seq 1 60); do
  if port_open; then
    rabbitmqctl await_startup >/dev/null 2>&1 || true
    exit 0
  fi
  sleep 1
done
echo "RabbitMQ did not start within 60 s; see /var/log/rabbitmq/" >&2
exit 1
