#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this):
#   formatting, clippy, unit + engine + CLI + reconciler + manifest tests against a throwaway
#   PostgreSQL, manifest validation, and the end-to-end suite (skipped, saying so, without a cluster).
# Installs what it needs (PostgreSQL via apt-get, kubernetes-validate via pip) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

step "building tests"
cargo test --all-targets --locked --no-run

step "starting a throwaway PostgreSQL"
pg_env=$(scripts/throwaway-postgres.sh start --owner-pid $$)
eval "$pg_env"
trap 'scripts/throwaway-postgres.sh stop "$STATEKEEPER_PG_DIR"' EXIT
export STATEKEEPER_TEST_DATABASE_URL="$STATEKEEPER_PG_URL"
echo "PostgreSQL is up on 127.0.0.1 (data in $STATEKEEPER_PG_DIR)"

step "cargo test (unit, engine, CLI, reconcilers, manifests)"
cargo test --all-targets --locked -- --skip operator_makes_the_example_store_ready

step "end-to-end suite"
cargo test --locked --test e2e -- --nocapture

step "validating rendered manifests"
scripts/validate-manifests.sh

echo
echo "all checks passed"
