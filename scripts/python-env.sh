#!/usr/bin/env bash
# Prints the path of a Python interpreter that has the given pip requirements, installing them
# into a private virtualenv (never into the system Python, which Debian marks as externally
# managed). Installs python3 and python3-venv with apt-get when they are missing.
#
#   python=$(scripts/python-env.sh 'moto[server]>=5,<6' kubernetes-validate)
#   STATEKEEPER_VENV=DIR overrides the virtualenv's location.
set -euo pipefail

log() { echo "python-env: $*" >&2; }

venv=${STATEKEEPER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/statekeeper/venv}

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    log "missing $*; install it (needs root)"
    exit 1
  fi
  log "installing $* with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "$@" >&2
}

command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$(dirname "$venv")"
  if ! python3 -m venv "$venv" >&2 2>/dev/null; then
    rm -rf "$venv"
    apt_install python3-venv
    python3 -m venv "$venv" >&2
  fi
fi
if [ "$#" -gt 0 ] && ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >&2; then
  log "could not install: $*"
  exit 1
fi
echo "$venv/bin/python"
