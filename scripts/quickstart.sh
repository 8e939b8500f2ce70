#!/usr/bin/env bash
# One command, end to end on this machine: builds portfleet, starts a
# controller (on a local Postgres) and an agent, scans a local target and
# prints its open ports, then stops both.
#
#   scripts/quickstart.sh                  # 127.0.0.1, nmap's top 1000 ports
#   scripts/quickstart.sh 127.0.0.1 1-65535
#
# As root the agent SYN-scans; otherwise it lacks CAP_NET_RAW and the scan
# runs as a connect scan. Logs go to .quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh

TARGET=${1:-127.0.0.1}
PORTS=${2:-top-1000}
LISTEN=127.0.0.1:${PORTFLEET_QUICKSTART_PORT:-50051}
DB=portfleet_quickstart
DIR=.quickstart
mkdir -p "$DIR"

ensure_postgres
# The same build as README's `cargo build --release`, so neither repeats the
# other's work. PORTFLEET_BIN_DIR runs binaries built elsewhere instead.
if [ -n "${PORTFLEET_BIN_DIR:-}" ]; then
  BIN=$PORTFLEET_BIN_DIR
else
  [ -x target/release/portfleet ] ||
    echo "building release binaries: the first build takes about 10 minutes on 2 cores, later ones seconds" >&2
  cargo build --release
  BIN=target/release
fi

psql -h "$PG_HOST" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1 ||
  psql -h "$PG_HOST" -U postgres -qc "CREATE DATABASE $DB"

# An admin token for the CLI, made straight in the database.
TOKEN=$(DATABASE_URL="postgres://postgres@$PG_HOST:$PG_PORT/$DB" \
  "$BIN/portfleet-controller" tokens create --scope admin --name quickstart 2>"$DIR/token.log") ||
  fail "cannot create an API token; see $DIR/token.log"
export PORTFLEET_TOKEN=$TOKEN

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$BIN/portfleet-controller" serve --insecure --listen "$LISTEN" --allow "$TARGET" \
  --database-url "postgres://postgres@$PG_HOST:$PG_PORT/$DB" > "$DIR/controller.log" 2>&1 &
pids+=($!)
"$BIN/portfleet-agent" run --controller "http://$LISTEN" --name quickstart --allow "$TARGET" \
  --state-dir "$DIR/state" > "$DIR/agent.log" 2>&1 &
pids+=($!)

export PORTFLEET_CONTROLLER="http://$LISTEN"
wait_for 30 "$BIN/portfleet" agents >/dev/null 2>&1 || fail "the controller did not start; see $DIR/controller.log"
wait_for 30 sh -c "'$BIN/portfleet' agents | grep -q connected" || fail "the agent did not connect; see $DIR/agent.log"
echo "scanning $TARGET ports $PORTS..." >&2
"$BIN/portfleet" scan "$TARGET" -p "$PORTS" --rate 20000 --allow-connect-fallback
