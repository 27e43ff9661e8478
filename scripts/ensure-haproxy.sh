#!/usr/bin/env bash
# Makes sure HAProxy is installed for tests/haproxy.rs, which runs
# deploy/haproxy.cfg in front of real replicas. Sourced by scripts/test.sh.
# The tests start their own HAProxy process on a free loopback port; no
# service is started here.

ensure_haproxy() {
  if command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]; then
    return 0
  fi
  printf 'ensure-haproxy: %s\n' "HAProxy is not installed; installing it with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq haproxy >/dev/null
  else
    sudo apt-get update -qq && sudo apt-get install -y -qq haproxy >/dev/null
  fi
}

ensure_haproxy
