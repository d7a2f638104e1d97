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
cargo test --workspace --locked
if [ "$(id -u)" -eq 0 ]; then
    echo "== privileged integration tests (root)"
    cargo test --workspace --locked -- --ignored --test-threads 4
else
    echo "== privileged integration tests SKIPPED: not root (run: sudo scripts/test.sh)" >&2
fi
