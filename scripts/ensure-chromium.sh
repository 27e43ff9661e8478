#!/usr/bin/env bash
# Makes sure headless Chromium and its WebDriver are installed for
# tests/ui.rs, which drives the dashboard at /ui in a real browser.
# Sourced by scripts/test.sh. Both come from Debian's `chromium` source
# package and are installed in one apt-get call, so their versions always
# match (chromedriver refuses a browser of another major version); the
# exact version is left to the distribution, whose security archive drops
# superseded Chromium builds. The tests start their own chromedriver on a
# free loopback port; no service is started here.

ensure_chromium() {
  if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    return 0
  fi
  printf 'ensure-chromium: %s\n' "Chromium or chromedriver is not installed; installing them with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
  else
    sudo apt-get update -qq && sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
  fi
}

ensure_chromium
# Where tests/ui.rs finds them (it falls back to these same paths).
export SWITCHYARD_CHROMIUM="${SWITCHYARD_CHROMIUM:-/usr/bin/chromium}"
export SWITCHYARD_CHROMEDRIVER="${SWITCHYARD_CHROMEDRIVER:-/usr/bin/chromedriver}"
