#!/usr/bin/env bash
# The README's test command: every test of the workspace. The tests start
# throwaway PostgreSQL servers, so the server binaries are installed first
# when this machine has none (Debian's `postgresql` package).
set -euo pipefail
cd "$(dirname "$0")/.."

# The testkit looks in TESSERA_PG_BINDIR, /usr/lib/postgresql/*/bin,
# pg_config --bindir and $PATH.
if [ -z "${TESSERA_PG_BINDIR:-}" ] \
  && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null \
  && ! command -v initdb >/dev/null; then
  echo "== installing PostgreSQL (the tests start throwaway servers)"
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql
fi

exec cargo test --workspace "$@"
