#!/usr/bin/env bash
# Runs the whole test suite: formatting, clippy, unit tests, and (as root) the privileged
# integration tests with real network namespaces and TAP devices.
#
#   sudo scripts/test.sh        # everything (what CI runs)
#   scripts/test.sh             # as a normal user: privileged tests are listed as ignored
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
install_packages
find_cargo

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
if [ "$(id -u)" -eq 0 ]; then
    # The rootless tests run vswitch as this unprivileged user; they need /dev/net/tun open to
    # everybody (the distro default 0666), which this script restores afterwards.
    id vswitch-rootless >/dev/null 2>&1 || useradd --create-home --shell /bin/sh vswitch-rootless
    TUN_MODE=$(stat -c %a /dev/net/tun)
    chmod 0666 /dev/net/tun
    trap 'chmod "$TUN_MODE" /dev/net/tun; rm -f "$LOG"' EXIT
fi
cargo test --workspace --locked --no-fail-fast 2>&1 | tee -a "$LOG"
if [ "$(id -u)" -eq 0 ]; then
    echo "== privileged integration tests (root)"
    cargo test --workspace --locked --no-fail-fast -- --ignored --test-threads 4 2>&1 | tee -a "$LOG"
    skipped=0
else
    echo "== privileged integration tests SKIPPED: not root (run: sudo scripts/test.sh)" >&2
    skipped=$(awk '/^test result:/ {s += $8} END {print s + 0}' "$LOG")
fi
# One closing line over both runs (cargo prints one "test result" per test binary).
awk -v skipped="$skipped" '/^test result:/ {p += $4; f += $6} END {printf "summary: %d passed, %d failed, %d skipped\n", p, f, skipped}' "$LOG"
