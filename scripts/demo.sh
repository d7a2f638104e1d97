#!/usr/bin/env bash
# The main job: install what vswitch needs, build it, and run `vswitch demo` (Docker's
# networking story with vswitch alone: a network, two web containers with published ports,
# ping by name, a container:X sidecar; then everything is removed). Needs root for now.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
install_packages
find_cargo
[ "$(id -u)" -eq 0 ] || { echo "the demo needs root for now (rootless support is on the roadmap)" >&2; exit 1; }
cargo build --release --locked -p vswitch
exec target/release/vswitch demo
