#!/usr/bin/env bash
# A real PostgreSQL server (Debian's postgresql package; scripts/setup.sh
# installs it if missing) for the export job and the API.
#
#   scripts/postgres.sh start|stop|status
#
# Data, socket and log under var/postgres (or ONCOLAKE_PG_DIR), TCP on
# 127.0.0.1:5432 (or ONCOLAKE_PG_PORT) only. `start` creates, once and
# idempotently, the cluster, the login role `oncolake` (owner of the database
# `oncolake` and its schema `oncolake`) and the read-only role
# `oncolake_reader` (SELECT on every table of that schema), and prints the
# database URL as its last line. The URL carries no password: the role's
# password is generated once and kept in the libpq password file
# var/postgres/pgpass (mode 0600; PGPASSFILE format), where the export job and
# the API read it (serve.database_passfile). Run as root, the server runs as
# the `postgres` system user, as Debian's own clusters do.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="${ONCOLAKE_PG_DIR:-$root/var/postgres}"
port="${ONCOLAKE_PG_PORT:-5432}"
data="$state/data"
sock="$state/run"
passfile="$state/pgpass"

bindir() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r) "$(pg_config --bindir 2>/dev/null || true)"; do
    [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && { echo "$dir"; return 0; }
  done
  return 1
}
# The server refuses to run as root: as root, run it as `postgres`.
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
running() { [ -f "$data/postmaster.pid" ] && as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; }
psql_admin() { as_owner "$bin/psql" -X -q -v ON_ERROR_STOP=1 -h "$sock" -p "$port" -U postgres "$@"; }

bin="$(bindir)" || { echo "postgres.sh: no PostgreSQL server (initdb, pg_ctl): run scripts/setup.sh" >&2; exit 2; }

case "${1:-}" in
  start)
    if ! running; then
      if listening "$port"; then echo "postgres.sh: port $port is taken by another process" >&2; exit 1; fi
      mkdir -p "$state"
      chmod 755 "$state"
      if [ ! -f "$data/PG_VERSION" ]; then
        mkdir -p "$data" "$sock"
        [ "$(id -u)" = 0 ] && chown postgres: "$data" "$sock"
        as_owner test -w "$data" || {
          echo "postgres.sh: the postgres user cannot write $data (a parent folder is not open to it); set ONCOLAKE_PG_DIR" >&2
          exit 1; }
        as_owner "$bin/initdb" -D "$data" -U postgres --auth-local=peer --auth-host=scram-sha-256 \
          -E UTF8 --locale=C.UTF-8 > "$state/initdb.log" 2>&1 \
          || { echo "postgres.sh: initdb failed; see $state/initdb.log" >&2; tail -5 "$state/initdb.log" >&2; exit 1; }
      fi
      mkdir -p "$sock"
      [ "$(id -u)" = 0 ] && chown postgres: "$sock"
      touch "$state/postgres.log"
      [ "$(id -u)" = 0 ] && chown postgres: "$state/postgres.log"
      as_owner "$bin/pg_ctl" -D "$data" -l "$state/postgres.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$sock" start >/dev/null \
        || { echo "postgres.sh: failed to start; see $state/postgres.log" >&2; tail -5 "$state/postgres.log" >&2; exit 1; }
    fi
    # Roles, database and schema: created when missing, left alone when present.
    if [ ! -s "$passfile" ]; then
      password="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
      (umask 077; echo "127.0.0.1:$port:oncolake:oncolake:$password" > "$passfile")
      set_password=1
    else
      password="$(cut -d: -f5- "$passfile" | head -1)"
      set_password=0
      # a new port keeps the password: rewrite the host:port part only
      (umask 077; echo "127.0.0.1:$port:oncolake:oncolake:$password" > "$passfile.new"; mv "$passfile.new" "$passfile")
    fi
    psql_admin -d postgres -v pw="$password" -v setpw="$set_password" <<'SQL'
SELECT NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'oncolake') AS missing \gset
\if :missing
CREATE ROLE oncolake LOGIN PASSWORD :'pw';
\elif :setpw
ALTER ROLE oncolake PASSWORD :'pw';
\endif
SELECT NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'oncolake_reader') AS missing \gset
\if :missing
CREATE ROLE oncolake_reader NOLOGIN;
\endif
SELECT NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'oncolake') AS missing \gset
\if :missing
CREATE DATABASE oncolake OWNER oncolake;
\endif
SQL
    psql_admin -d oncolake <<'SQL'
SET client_min_messages = warning;
CREATE SCHEMA IF NOT EXISTS oncolake AUTHORIZATION oncolake;
GRANT USAGE ON SCHEMA oncolake TO oncolake_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA oncolake TO oncolake_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE oncolake IN SCHEMA oncolake GRANT SELECT ON TABLES TO oncolake_reader;
SQL
    echo "postgres.sh: up at 127.0.0.1:$port (data $data); password file $passfile" >&2
    echo "postgresql://oncolake@127.0.0.1:$port/oncolake"
    ;;
  stop)
    if running; then
      as_owner "$bin/pg_ctl" -D "$data" -m fast -w -t 60 stop >/dev/null
    fi
    for _ in $(seq 1 30); do listening "$port" || { echo "postgres.sh: stopped"; exit 0; }; sleep 1; done
    echo "postgres.sh: port $port still open after stop" >&2
    exit 1
    ;;
  status)
    if running && listening "$port"; then echo "postgres.sh: running on 127.0.0.1:$port"; exit 0; fi
    echo "postgres.sh: not running"
    exit 3
    ;;
  *)
    echo "usage: scripts/postgres.sh start|stop|status" >&2
    exit 2
    ;;
esac
