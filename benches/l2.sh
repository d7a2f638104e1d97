#!/usr/bin/env bash
# End-to-end L2 benchmark: vswitch next to a kernel bridge (the docker0 model), in one run.
#
#   sudo benches/l2.sh [-r REPEATS] [-t SECONDS]
#
# Both cases get two container namespaces; the kernel bridge case uses veth pairs into a bridge
# in a third namespace (as ../shared/tools/baseline.sh sets it up), the vswitch case a daemon in
# its own namespace with one TAP per container. Repeats are interleaved (bridge, vswitch,
# bridge, ...) so drift on this small shared machine hits both. Prints medians and ratios
# (vswitch / bridge), plus the attach latency (median of 20 attach+detach cycles).
# All traffic stays inside namespaces this script creates (prefix vsbench-); all are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
install_packages
find_cargo
[ "$(id -u)" -eq 0 ] || { echo "needs root" >&2; exit 1; }

REPS=3 DUR=5
while getopts "r:t:" o; do case $o in r) REPS=$OPTARG ;; t) DUR=$OPTARG ;; *) exit 2 ;; esac; done

cargo build --release --locked -p vswitch >&2
BIN=$PWD/target/release/vswitch
P=vsbench-$$-
TMP=$(mktemp -d /tmp/vsbench.XXXXXX)
export VSWITCH_SOCKET=$TMP/vswitch.sock
cleanup() {
    [ -n "${DPID:-}" ] && kill "$DPID" 2>/dev/null && wait "$DPID" 2>/dev/null
    for n in $(ip netns list | awk '{print $1}' | grep "^$P" || true); do
        ip netns pids "$n" 2>/dev/null | xargs -r kill 2>/dev/null || true
        ip netns del "$n" 2>/dev/null || true
        rm -rf "/etc/netns/$n"
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
nsx() { local n=$1; shift; ip netns exec "$n" "$@"; }

# --- kernel bridge: b1, b2 -> br0 in sw
for n in sw b1 b2; do ip netns add $P$n; done
ip -n ${P}sw link add br0 type bridge && ip -n ${P}sw link set br0 up
for i in 1 2; do
    ip -n ${P}b$i link add veth0 type veth peer name p$i netns ${P}sw
    ip -n ${P}sw link set p$i master br0 && ip -n ${P}sw link set p$i up
    ip -n ${P}b$i addr add 10.231.2.$i/24 dev veth0 && ip -n ${P}b$i link set veth0 up
    ip -n ${P}b$i link set lo up
done

# --- vswitch: daemon in d, v1 and v2 attached
for n in d v1 v2; do ip netns add $P$n; done
ip netns exec ${P}d "$BIN" daemon --state-dir "$TMP/state" --log-level warn >"$TMP/daemon.log" 2>&1 &
DPID=$!
for _ in $(seq 200); do [ -S "$VSWITCH_SOCKET" ] && break; sleep 0.05; done
"$BIN" network create bench --subnet 10.231.3.0/24 >/dev/null
"$BIN" attach --network bench --ip 10.231.3.11 ${P}v1 >/dev/null
"$BIN" attach --network bench --ip 10.231.3.12 ${P}v2 >/dev/null

declare -A CLI=([bridge]=${P}b1 [vswitch]=${P}v1) SRV=([bridge]=${P}b2 [vswitch]=${P}v2) \
           DST=([bridge]=10.231.2.2 [vswitch]=10.231.3.12)
RES=$TMP/results.tsv; : >"$RES"

for c in bridge vswitch; do nsx ${CLI[$c]} ping -c 3 -i 0.2 -W 1 ${DST[$c]} >/dev/null; done

for rep in $(seq "$REPS"); do
    for c in bridge vswitch; do
        nsx ${SRV[$c]} iperf3 -s -1 -D -p 5301 >/dev/null 2>&1; sleep 0.3
        g=$(nsx ${CLI[$c]} timeout $((DUR + 20)) iperf3 -c ${DST[$c]} -p 5301 -t "$DUR" -J \
            | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)')
        echo -e "$c\ttcp1_gbps\t$g" >>"$RES"
        nsx ${SRV[$c]} iperf3 -s -1 -D -p 5302 >/dev/null 2>&1; sleep 0.3
        g=$(nsx ${CLI[$c]} timeout $((DUR + 20)) iperf3 -c ${DST[$c]} -p 5302 -t "$DUR" -P 4 -J \
            | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)')
        echo -e "$c\ttcp4_gbps\t$g" >>"$RES"
        r=$(nsx ${CLI[$c]} ping -q -c 50 -i 0.01 -W 1 ${DST[$c]} | awk -F/ '/^rtt/ {print $5}')
        echo -e "$c\tping_avg_ms\t$r" >>"$RES"
        echo "rep $rep $c done" >&2
    done
done

# --- attach latency: 20 attach + detach cycles of a fresh namespace, client wall time
ip netns add ${P}att
for i in $(seq 20); do
    t0=$(date +%s%N)
    "$BIN" attach --network bench --name att ${P}att >/dev/null
    t1=$(date +%s%N)
    "$BIN" detach att
    echo -e "vswitch\tattach_ms\t$(( (t1 - t0) / 1000 ))e-3" >>"$RES"
done

python3 - "$RES" <<'PY'
import sys, statistics as st
rows = [l.split('\t') for l in open(sys.argv[1]).read().split('\n') if l]
data = {}
for case, metric, val in rows:
    data.setdefault(metric, {}).setdefault(case, []).append(float(val))
print("| metric | kernel bridge | vswitch | vswitch / bridge |")
print("|---|---|---|---|")
for metric in ["tcp1_gbps", "tcp4_gbps", "ping_avg_ms", "attach_ms"]:
    d = data.get(metric, {})
    b = st.median(d["bridge"]) if "bridge" in d else None
    v = st.median(d["vswitch"]) if "vswitch" in d else None
    ratio = f"{v / b:.2f}x" if b and v else "-"
    fmt = lambda x: "-" if x is None else f"{x:.3f}"
    print(f"| {metric} (median of {len(d.get('vswitch', []))}) | {fmt(b)} | {fmt(v)} | {ratio} |")
PY
