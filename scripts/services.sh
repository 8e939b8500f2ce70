# Sourced by the scripts here: makes sure the local Postgres (and, when
# asked, RabbitMQ) answer, starting them when installed but stopped.

PG_HOST=127.0.0.1 PG_PORT=5432 AMQP_PORT=5672

fail() { echo "error: $*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

postgres_ready() {
  if command -v pg_isready >/dev/null; then
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT"
  else
    port_open "$PG_PORT"
  fi
}

wait_for() { # seconds, check...
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.5
  done
}

ensure_postgres() {
  postgres_ready && return
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    echo "starting Postgres ($(ls /etc/postgresql))..." >&2
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  wait_for 30 postgres_ready ||
    fail "Postgres is not reachable on $PG_HOST:$PG_PORT and could not be started.
Install it (apt-get install postgresql) and allow trust auth for user postgres on 127.0.0.1,
or point PORTFLEET_TEST_DATABASE_URL at a server where the tests may create databases."
}

ensure_rabbitmq() {
  port_open "$AMQP_PORT" && return
  if command -v rabbitmq-server >/dev/null; then
    echo "starting RabbitMQ..." >&2
    rabbitmq-server -detached || true
  fi
  wait_for 90 port_open "$AMQP_PORT" ||
    fail "RabbitMQ is not reachable on 127.0.0.1:$AMQP_PORT and could not be started.
Install it (apt-get install rabbitmq-server); the tests use guest/guest on localhost."
}
