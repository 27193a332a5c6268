#!/usr/bin/env bash
# Start a throwaway PostgreSQL cluster on 127.0.0.1 for the attribute database tests; print its URL.
#
#   export TEST_POSTGRES_URL="$(bash scripts/start_postgres.sh)"     # start (or reuse) and take the URL
#   bash scripts/start_postgres.sh stop                              # stop it (the data directory stays)
#
# Installs Debian's postgresql package when no server binaries are found (needs root and the package
# mirror). The cluster lives in $PA_PG_DIR (default /tmp/pa-postgres) and belongs to a non-root user
# (initdb refuses root): the `postgres` system user when run as root, the caller otherwise. Port, user,
# password and database come from PA_PG_PORT (55432), PA_PG_USER (attributes), PA_PG_PASSWORD
# (attributes) and PA_PG_DB (attributes_test). Only the URL goes to stdout; progress goes to stderr.
set -euo pipefail

PG_DIR="${PA_PG_DIR:-/tmp/pa-postgres}"
PG_PORT="${PA_PG_PORT:-55432}"
PG_USER="${PA_PG_USER:-attributes}"
PG_PASSWORD="${PA_PG_PASSWORD:-attributes}"
PG_DB="${PA_PG_DB:-attributes_test}"
DATA="$PG_DIR/data"

say() { echo "start_postgres: $*" >&2; }

find_bin_dir() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

BIN="$(find_bin_dir)"
if [[ -z "$BIN" || ! -x "$BIN/initdb" ]]; then
    if [[ "$(id -u)" != 0 ]]; then
        say "no PostgreSQL server under /usr/lib/postgresql and not root: install the postgresql package"
        exit 1
    fi
    say "installing postgresql (apt-get)"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    BIN="$(find_bin_dir)"
fi

# Run a server binary as the cluster's owner.
if [[ "$(id -u)" == 0 ]]; then
    OWNER=postgres
    as_owner() { su -s /bin/sh "$OWNER" -c "$(printf '%q ' "$@")"; }
else
    OWNER="$(id -un)"
    as_owner() { "$@"; }
fi

if [[ "${1:-start}" == stop ]]; then
    if [[ -f "$DATA/postmaster.pid" ]]; then
        as_owner "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >&2
    fi
    exit 0
fi

mkdir -p "$PG_DIR"
chown "$OWNER" "$PG_DIR"
if [[ ! -f "$DATA/PG_VERSION" ]]; then
    say "initdb in $DATA (owner $OWNER)"
    password_file="$PG_DIR/password"
    printf '%s\n' "$PG_PASSWORD" >"$password_file"
    chown "$OWNER" "$password_file"
    as_owner "$BIN/initdb" -D "$DATA" -U "$PG_USER" --pwfile="$password_file" --auth-host=scram-sha-256 \
        --auth-local=trust --encoding=UTF8 --no-locale >&2
    rm -f "$password_file"
fi

if ! as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    say "starting on 127.0.0.1:$PG_PORT (log $PG_DIR/server.log)"
    as_owner "$BIN/pg_ctl" -D "$DATA" -l "$PG_DIR/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR" start >&2
fi

# The database is created over the socket in $PG_DIR (trust for the owner's local connections).
if ! as_owner "$BIN/psql" -h "$PG_DIR" -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'" | grep -q 1; then
    as_owner "$BIN/createdb" -h "$PG_DIR" -p "$PG_PORT" -U "$PG_USER" "$PG_DB" >&2
fi

echo "postgresql://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"
