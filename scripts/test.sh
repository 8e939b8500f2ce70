#!/usr/bin/env bash
# Runs portfleet's whole test suite on this machine.
#
# The tests use the real services, never fakes: Postgres on 127.0.0.1:5432
# (user postgres, trust auth) and RabbitMQ on 127.0.0.1:5672 (guest/guest).
# This script starts them when they are installed but stopped, and fails
# with a clear message when they cannot be reached. Extra arguments go to
# `cargo test` (e.g. `scripts/test.sh -p portfleet-core`, or
# `scripts/test.sh --test api -- scans_by`).
#
# Every test binary runs even when an earlier one fails (--no-fail-fast),
# and the summary at the end names every failed test.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh

[ -n "${PORTFLEET_TEST_DATABASE_URL:-}" ] || ensure_postgres
ensure_rabbitmq
ensure_test_daemons
ensure_deploy_tools
ensure_loopback_services

# The cross-process tests run the real binaries: build them first.
cargo build --workspace --bins

log=$(mktemp "${TMPDIR:-/tmp}/portfleet-test.XXXXXX")
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
if [ "$status" -ne 0 ]; then
    echo
    echo "=== failed tests ==="
    # Each binary's run starts with "Running <file>"; its failures print
    # "test <name> ... FAILED". A binary that failed to build or crashed
    # shows in cargo's own "error:" lines.
    sed 's/\x1b\[[0-9;]*m//g' "$log" | awk '
        /^ *Running / { bin = $2 }
        / \.\.\. FAILED$/ { sub(/^test /, ""); sub(/ \.\.\. FAILED$/, ""); print "  " bin ": " $0; n++ }
        END { if (n == 0) print "  (no single test failed; see the errors above)" }'
    sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E '^error: ([0-9]+ targets? failed|could not compile)' -A 20 | grep -E '^error|^ +`' || true
fi
exit "$status"
