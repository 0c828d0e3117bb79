#!/usr/bin/env bash
# The quickstart: builds statekeeper, starts a throwaway PostgreSQL on 127.0.0.1 (installing it
# with apt-get if needed), and walks the CLI through init -> status -> upgrade -> rollback ->
# export -> import.
# Everything it creates is removed when it exits.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -t 1 ]; then bold=$'\033[1m'; plain=$'\033[0m'; else bold=""; plain=""; fi
say() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }
# STATEKEEPER_BIN: a statekeeper already built (the docs test runs this with its own build).
bin=${STATEKEEPER_BIN:-}
if [ -z "$bin" ]; then
  say "Building statekeeper (release)"
  cargo build --release --locked --bin statekeeper
  bin=./target/release/statekeeper
fi
run() { printf '$ statekeeper %s\n' "$*"; "$bin" "$@"; }

say "Starting a throwaway PostgreSQL"
pg_env=$(scripts/throwaway-postgres.sh start --owner-pid $$)
eval "$pg_env"
trap 'scripts/throwaway-postgres.sh stop "$STATEKEEPER_PG_DIR"' EXIT
export STATEKEEPER_DATABASE_URL="$STATEKEEPER_PG_URL"
export STATEKEEPER_SCHEMA=quickstart_state
echo "PostgreSQL is running on 127.0.0.1 (data in $STATEKEEPER_PG_DIR)"

say "1. Initialise the state store at schema version 1 (as an older release would have)"
run state init --target-version 1

say "2. Some state arrives: model versions and a promoted prod environment"
psql=$(command -v psql || ls /usr/lib/postgresql/*/bin/psql | sort -V | tail -n 1)
"$psql" "$STATEKEEPER_PG_URL" -q -v ON_ERROR_STOP=1 <<'SQL'
SET search_path TO quickstart_state;
INSERT INTO model_versions (name, fingerprint, version)
  SELECT 'analytics.orders_' || i, md5(i::text), 'v1' FROM generate_series(1, 25) i;
INSERT INTO virtual_environments (name, plan_id) VALUES ('prod', 'plan-1');
INSERT INTO virtual_environment_refs SELECT 'prod', name, id FROM model_versions;
SQL
run state status

say "3. Upgrade to the latest schema: a backup is taken first, all in one transaction"
run state upgrade

say "4. Status now: up to date, one backup"
run state status

say "5. Roll back to the backup: the store is exactly as before the upgrade"
run state rollback
run state status

say "6. Backups (the rollback kept the state it replaced, so it can be undone)"
run state backups
run state backups --output json

say "7. Upgrade again, then export the store (zstd) and import it into a second schema"
run state upgrade
export_file="$STATEKEEPER_PG_DIR/quickstart-export.json.zst"
run state export --to "$export_file" --compression zstd
run state init --schema quickstart_copy
run state import --schema quickstart_copy --from "$export_file" --replace
run state status --schema quickstart_copy

say "Done. The throwaway PostgreSQL is stopped and removed on exit."
