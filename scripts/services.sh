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

# Daemons the identification tests run inside their target namespaces, and
# nmap (its service probe database, and the benchmark's peer), ndiff and
# xmllint (the exports are checked with them), promtool (prometheus: the
# alert rules), systemd-analyze (systemd: the units) and python3-venv (the
# deployment tools below), from Debian's packages. Their services are not
# started here (policy-rc.d): the tests start their own copies on namespace
# addresses.
TEST_PACKAGES="nmap ndiff libxml2-utils python3 python3-venv prometheus systemd nginx-light openssh-server vsftpd memcached redis-server mosquitto"
TEST_COMMANDS="nmap ndiff xmllint python3 promtool systemd-analyze nginx sshd vsftpd memcached redis-server mosquitto"

ensure_test_daemons() {
  local missing=""
  for c in $TEST_COMMANDS; do
    command -v "$c" >/dev/null || [ -x "/usr/sbin/$c" ] || missing="$missing $c"
  done
  [ -z "$missing" ] && return
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "warning: missing$missing; the identification tests need them (apt-get install $TEST_PACKAGES)" >&2
    return
  fi
  echo "installing test daemons ($TEST_PACKAGES)..." >&2
  local rc_policy=/usr/sbin/policy-rc.d created=""
  if [ ! -e "$rc_policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$rc_policy" && chmod +x "$rc_policy" && created=1
  fi
  local apt="apt-get install -y -q --no-install-recommends $TEST_PACKAGES"
  DEBIAN_FRONTEND=noninteractive $apt >/dev/null ||
    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $apt >/dev/null; } ||
    echo "warning: could not install $TEST_PACKAGES" >&2
  [ -n "$created" ] && rm -f "$rc_policy"
  return 0
}

# Python tools the deployment tests run (tests/tests/deploy.rs), pinned, in a
# venv in the cache directory: kubernetes-validate (the Kubernetes schemas,
# bundled, offline) and check-jsonschema (the compose specification's
# schema, bundled). Made once from PyPI; the tests find it through
# PORTFLEET_DEPLOY_TOOLS (or at this default path) and fail under CI=true
# without it.
DEPLOY_TOOLS_PINS="kubernetes-validate==1.37.0 check-jsonschema==0.39.0"
export PORTFLEET_DEPLOY_TOOLS="${PORTFLEET_DEPLOY_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/portfleet/deploy-tools}"

ensure_deploy_tools() {
  local venv=$PORTFLEET_DEPLOY_TOOLS
  if [ -x "$venv/bin/kubernetes-validate" ] && [ -x "$venv/bin/check-jsonschema" ] &&
     [ "$(cat "$venv/.pins" 2>/dev/null)" = "$DEPLOY_TOOLS_PINS" ]; then
    return
  fi
  echo "installing the deployment test tools ($DEPLOY_TOOLS_PINS) in $venv..." >&2
  # Only ever a venv of ours: never whatever else the variable names.
  if [ -e "$venv/pyvenv.cfg" ]; then rm -rf "$venv"; fi
  # shellcheck disable=SC2086
  if python3 -m venv "$venv" >/dev/null &&
     "$venv/bin/pip" install --quiet --disable-pip-version-check $DEPLOY_TOOLS_PINS >&2; then
    echo "$DEPLOY_TOOLS_PINS" >"$venv/.pins"
  else
    echo "warning: could not install $DEPLOY_TOOLS_PINS (needs python3-venv and PyPI); the deployment tests need them" >&2
  fi
  return 0
}

# The machine's own Redis, Mosquitto, NATS and MariaDB: the identification
# tests name them over loopback. Started when installed but stopped, with
# the commands this machine kind starts them with; a warning (and those
# tests fail under CI=true) when one cannot be.
ensure_loopback_services() {
  local name port start
  while IFS='|' read -r name port start; do
    port_open "$port" && continue
    if command -v "${start%% *}" >/dev/null; then
      echo "starting $name..." >&2
      sh -c "$start" >/dev/null 2>&1 || true
    fi
    wait_for 30 port_open "$port" || echo "warning: $name is not reachable on 127.0.0.1:$port" >&2
  done <<'LIST'
Redis|6379|redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /tmp
Mosquitto|1883|mosquitto -d -c /etc/mosquitto/mosquitto.conf
NATS|4222|start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /tmp/nats-js
MariaDB|3306|start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
LIST
}
