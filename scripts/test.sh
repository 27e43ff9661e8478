#!/usr/bin/env bash
# The whole test suite, on any machine: makes sure PostgreSQL is reachable
# (starting or installing it if needed) and that HAProxy and the pinned
# Python tools are installed, then runs every test of the workspace against
# real PostgreSQL and SQLite databases.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/ensure-postgres.sh
source scripts/ensure-postgres.sh
# shellcheck source=scripts/ensure-haproxy.sh
source scripts/ensure-haproxy.sh
source scripts/ensure-chromium.sh
# shellcheck source=scripts/ensure-python-tools.sh
source scripts/ensure-python-tools.sh
cargo build --locked --workspace --bins
cargo test --locked --workspace "$@"
