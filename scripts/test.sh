#!/usr/bin/env bash
# Runs portfleet's whole test suite on this machine.
#
# The tests use the real services, never fakes: Postgres on 127.0.0.1:5432
# (user postgres, trust auth) and RabbitMQ on 127.0.0.1:5672 (guest/guest).
# This script starts them when they are installed but stopped, and fails
# with a clear message when they cannot be reached. Extra arguments go to
# `cargo test` (e.g. `scripts/test.sh -p portfleet-core`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh

[ -n "${PORTFLEET_TEST_DATABASE_URL:-}" ] || ensure_postgres
ensure_rabbitmq

# The cross-process tests run the real binaries: build them first.
cargo build --workspace --bins
cargo test --workspace "$@"
