#!/usr/bin/env bash
# Makes sure a PostgreSQL server is reachable for the tests and exports its
# admin URL as SWITCHYARD_TEST_DATABASE_URL. Sourced by scripts/test.sh.
#
# In order: a server named by SWITCHYARD_TEST_DATABASE_URL; the local server
# on 127.0.0.1:5432 (started with pg_ctlcluster if installed but stopped); a
# throwaway cluster under target/pgdata made with initdb (as the postgres
# user when run as root); and, when PostgreSQL is not installed at all,
# `apt-get install postgresql` first. Nothing here needs to be set up by hand.

pg_log() { printf 'ensure-postgres: %s\n' "$*" >&2; }

pg_reachable() {
  command -v psql >/dev/null 2>&1 || return 1
  PGCONNECT_TIMEOUT=3 psql "$1" -tAc 'SELECT 1' >/dev/null 2>&1
}

pg_bin() {
  # Prefer the packaged server binaries; fall back to whatever is on PATH.
  local dir
  for dir in /usr/lib/postgresql/*/bin; do
    [ -x "$dir/$1" ] && { echo "$dir/$1"; return 0; }
  done
  command -v "$1"
}

pg_as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pg_start_clusters() {
  command -v pg_ctlcluster >/dev/null 2>&1 || return 1
  local conf version
  for conf in /etc/postgresql/*/main; do
    [ -d "$conf" ] || continue
    version=$(basename "$(dirname "$conf")")
    pg_log "starting the installed cluster $version/main"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1 || true
  done
  for _ in $(seq 1 30); do
    pg_reachable "$1" && return 0
    sleep 0.5
  done
  return 1
}

pg_throwaway_cluster() {
  local initdb pg_ctl dir port=55432
  initdb=$(pg_bin initdb) || return 1
  pg_ctl=$(pg_bin pg_ctl) || return 1
  dir="$PWD/target/pgdata"
  local url="postgres://postgres@127.0.0.1:$port/postgres"
  mkdir -p "$PWD/target"
  if [ ! -f "$dir/PG_VERSION" ]; then
    pg_log "creating a throwaway cluster in $dir"
    rm -rf "$dir"
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    pg_as_owner "$initdb" -D "$dir" -U postgres --auth=trust >/dev/null
  fi
  if ! pg_reachable "$url"; then
    pg_log "starting the throwaway cluster on 127.0.0.1:$port"
    pg_as_owner "$pg_ctl" -D "$dir" -l "$dir/server.log" -w \
      -o "-p $port -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
  fi
  pg_reachable "$url" && SWITCHYARD_TEST_DATABASE_URL=$url
}

ensure_postgres() {
  local url=${SWITCHYARD_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
  if pg_reachable "$url"; then
    SWITCHYARD_TEST_DATABASE_URL=$url
  elif pg_start_clusters "$url"; then
    SWITCHYARD_TEST_DATABASE_URL=$url
  elif pg_throwaway_cluster; then
    :
  else
    pg_log "PostgreSQL is not installed; installing it with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq postgresql postgresql-client >/dev/null
    pg_start_clusters "$url" && SWITCHYARD_TEST_DATABASE_URL=$url || pg_throwaway_cluster || {
      pg_log "could not get a PostgreSQL server running"
      return 1
    }
  fi
  export SWITCHYARD_TEST_DATABASE_URL
  pg_log "tests use $SWITCHYARD_TEST_DATABASE_URL"
}

ensure_postgres
