#!/usr/bin/env bash
# The main job until `vswitch demo` exists: build vswitch, start a daemon with a temporary
# socket and state directory, create a network, attach two network namespaces and show them
# talking through the userspace switch. Cleans everything up. Needs root (ip netns, TAP).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
install_packages
find_cargo

[ "$(id -u)" -eq 0 ] || { echo "the demo needs root for now (rootless support is on the roadmap)" >&2; exit 1; }
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

cargo build --release --locked -p vswitch
BIN=$PWD/target/release/vswitch
TMP=$(mktemp -d /tmp/vswitch-demo.XXXXXX)
SUF=$$
DNS_NS=vsdemo-d$SUF A=tomcat81-$SUF B=tomcat82-$SUF
export VSWITCH_SOCKET=$TMP/vswitch.sock
cleanup() {
    [ -n "${DPID:-}" ] && kill "$DPID" 2>/dev/null && wait "$DPID" 2>/dev/null
    for n in "$DNS_NS" "$A" "$B"; do ip netns del "$n" 2>/dev/null || true; rm -rf "/etc/netns/$n"; done
    rm -rf "$TMP"
}
trap cleanup EXIT

# The daemon gets a namespace of its own, so the demo leaves the host's network untouched.
ip netns add "$DNS_NS"
ip netns exec "$DNS_NS" "$BIN" daemon --state-dir "$TMP/state" >"$TMP/daemon.log" 2>&1 &
DPID=$!
for _ in $(seq 100); do [ -S "$VSWITCH_SOCKET" ] && break; sleep 0.05; done

ip netns add "$A"; ip netns add "$B"
step vswitch network create you_network;        $BIN network create you_network
step vswitch network ls;                        $BIN network ls
step vswitch attach --network you_network --name tomcat81 "$A"; $BIN attach --network you_network --name tomcat81 "$A"
step vswitch attach --network you_network --name tomcat82 "$B"; $BIN attach --network you_network --name tomcat82 "$B"
IP_B=$($BIN network inspect you_network | python3 -c 'import json,sys; n=json.load(sys.stdin)[0]; print([c["IPv4Address"].split("/")[0] for c in n["Containers"].values() if c["Name"]=="tomcat82"][0])')
step ip -n tomcat81 addr show eth0;             ip -n "$A" -br addr show eth0
step "ping tomcat82 ($IP_B) from tomcat81";     ip netns exec "$A" ping -c 3 -i 0.2 "$IP_B"
step ping the gateway from tomcat81;            ip netns exec "$A" ping -c 2 -i 0.2 172.18.0.1
step iperf3 tomcat81 to tomcat82, 3 s
ip netns exec "$B" iperf3 -s -1 -D >/dev/null
sleep 0.3
ip netns exec "$A" iperf3 -c "$IP_B" -t 3 | grep -E 'sender|receiver'
step vswitch fdb you_network;                   $BIN fdb you_network
step vswitch stats you_network;                 $BIN stats you_network
step vswitch network inspect you_network;       $BIN network inspect you_network
step vswitch detach tomcat82;                   $BIN detach tomcat82
step ip -n tomcat82 link;                       ip -n "$B" -br link
echo
echo "demo OK"
