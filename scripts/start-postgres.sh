#!/usr/bin/env bash
# Starts the local PostgreSQL cluster used by the store suite and prints the URL to export as
# HANGAR_TEST_POSTGRES_URL. Idempotent: starts the cluster only if it is down, and (re)sets the
# password of the `postgres` user every time. Needs root (Debian's pg_ctlcluster layout).
#
#   export HANGAR_TEST_POSTGRES_URL="$(scripts/start-postgres.sh)"
#
# Diagnostics go to stderr; the only line on stdout is the URL.
set -euo pipefail

PG_VERSION="${PG_VERSION:-15}"
PG_CLUSTER="${PG_CLUSTER:-main}"
PG_PORT="${PG_PORT:-5432}"
PG_PASSWORD="${PG_PASSWORD:-postgres}"
# How long to wait for the server to accept connections after starting it.
READY_TIMEOUT_SECONDS=60

# Everything any command prints goes to stderr; fd 3 keeps the real stdout for the URL alone.
exec 3>&1 1>&2

log() { printf 'start-postgres: %s\n' "$*" >&2; }

as_postgres() {
    if [ "$(id -un)" = postgres ]; then
        "$@"
    else
        runuser -u postgres -- "$@"
    fi
}

if ! command -v pg_ctlcluster >/dev/null; then
    log "pg_ctlcluster not found: install PostgreSQL ${PG_VERSION} (apt-get install postgresql-${PG_VERSION})"
    exit 1
fi

status="$(pg_lsclusters --no-header | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1 == v && $2 == c { print $4 }')"
if [ -z "$status" ]; then
    log "no PostgreSQL cluster ${PG_VERSION}/${PG_CLUSTER}"
    exit 1
fi
if [ "$status" = online ]; then
    log "cluster ${PG_VERSION}/${PG_CLUSTER} already running"
else
    log "starting cluster ${PG_VERSION}/${PG_CLUSTER}"
    pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start 3>&-
fi

deadline=$((SECONDS + READY_TIMEOUT_SECONDS))
until pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        log "server not accepting connections after ${READY_TIMEOUT_SECONDS}s; see /var/log/postgresql/postgresql-${PG_VERSION}-${PG_CLUSTER}.log"
        exit 1
    fi
    sleep 0.2
done

# Local socket, peer authentication as the postgres OS user.
as_postgres psql -q -p "$PG_PORT" -v ON_ERROR_STOP=1 \
    -c "ALTER USER postgres PASSWORD '${PG_PASSWORD}'" >&2

url="postgres://postgres:${PG_PASSWORD}@127.0.0.1:${PG_PORT}/postgres"
# TCP with a password must work (pg_hba.conf: scram-sha-256 or md5 on 127.0.0.1 by default on Debian).
if ! PGPASSWORD="$PG_PASSWORD" psql -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres \
    -c 'SELECT 1' >/dev/null; then
    log "password login over TCP failed; check /etc/postgresql/${PG_VERSION}/${PG_CLUSTER}/pg_hba.conf"
    exit 1
fi
log "ready"
echo "$url" >&3
