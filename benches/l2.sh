#!/usr/bin/env bash
# End-to-end L2 benchmark: vswitch next to a kernel bridge (the docker0 model), in one run.
#
#   sudo benches/l2.sh [-r REPEATS] [-t SECONDS]
#
# Every case gets two container namespaces; the kernel bridge case uses veth pairs into a bridge
# in a third namespace (as ../shared/tools/baseline.sh sets it up), the vswitch case a daemon in
# its own namespace with one TAP per container, and the vswitch-rootless case the same run as
# the unprivileged user vswitch-rootless (created if absent) with user-owned namespaces
# (`unshare -U -r -n`) attached by PID. Repeats are interleaved (bridge, vswitch,
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
TUN_MODE=$(stat -c %a /dev/net/tun)
cleanup() {
    chmod "$TUN_MODE" /dev/net/tun
    for p in ${RPIDS:-}; do kill "$p" 2>/dev/null || true; done
    [ -n "${DPID:-}" ] && kill "$DPID" 2>/dev/null && wait "$DPID" 2>/dev/null || true
    remove_netns_with_prefix "$P"
    rm -rf "$TMP"
}
trap cleanup EXIT
nsx() { local n=$1; shift; ip netns exec "$n" "$@"; }

# --- kernel bridge: b1, b2 -> br0 in sw
setup_bridge_pair "$P" 10.231.2

# --- vswitch: daemon in d, v1 and v2 attached
for n in d v1 v2; do ip netns add $P$n; done
ip netns exec ${P}d "$BIN" daemon --state-dir "$TMP/state" --log-level warn >"$TMP/daemon.log" 2>&1 &
DPID=$!
for _ in $(seq 200); do [ -S "$VSWITCH_SOCKET" ] && break; sleep 0.05; done
"$BIN" network create bench --subnet 10.231.3.0/24 >/dev/null
"$BIN" attach --network bench --ip 10.231.3.11 ${P}v1 >/dev/null
"$BIN" attach --network bench --ip 10.231.3.12 ${P}v2 >/dev/null

# --- vswitch rootless: the daemon as an unprivileged user, user-owned namespaces
RU=vswitch-rootless
id $RU >/dev/null 2>&1 || useradd --create-home --shell /bin/sh $RU
chmod 0666 /dev/net/tun
RDIR=$TMP/rootless; mkdir -p "$RDIR/run"; cp "$BIN" "$RDIR/vswitch"; chown -R $RU: "$RDIR"; chmod 755 "$TMP" "$RDIR"
ASUSER=(ip netns exec ${P}rd setpriv --reuid "$(id -u $RU)" --regid "$(id -g $RU)" --clear-groups env HOME="$RDIR" XDG_RUNTIME_DIR="$RDIR/run")
asuser() { "${ASUSER[@]}" "$@"; }
ip netns add ${P}rd; ip -n ${P}rd link set lo up
# Started without a shell function in between, so that $! is the daemon itself.
"${ASUSER[@]}" "$RDIR/vswitch" --socket "$RDIR/s" daemon --state-dir "$RDIR/st" --log-level warn >"$TMP/rdaemon.log" 2>&1 &
RPIDS="$!"
for _ in $(seq 200); do [ -S "$RDIR/s" ] && break; sleep 0.05; done
asuser "$RDIR/vswitch" --socket "$RDIR/s" network create rbench --subnet 10.231.8.0/24 >/dev/null
for i in 1 2; do
    "${ASUSER[@]}" unshare -U -r -n sleep 3600 &
    pid=$!; RPIDS="$RPIDS $pid"
    for _ in $(seq 100); do [ "$(readlink /proc/$pid/ns/net)" != "$(readlink /proc/self/ns/net)" ] && [ "$(cat /proc/$pid/comm 2>/dev/null)" = sleep ] && break; sleep 0.02; done
    asuser "$RDIR/vswitch" --socket "$RDIR/s" attach --network rbench --ip 10.231.8.1$i $pid >/dev/null
    eval "R$i=$pid"
done

# How to run a command in each case's client and server namespaces.
declare -A CLI=([bridge]="ip netns exec ${P}b1" [vswitch]="ip netns exec ${P}v1" [vswitch-rootless]="nsenter -t $R1 -n") \
           SRV=([bridge]="ip netns exec ${P}b2" [vswitch]="ip netns exec ${P}v2" [vswitch-rootless]="nsenter -t $R2 -n") \
           DST=([bridge]=10.231.2.2 [vswitch]=10.231.3.12 [vswitch-rootless]=10.231.8.12)
CASES="bridge vswitch vswitch-rootless"
RES=$TMP/results.tsv; : >"$RES"

for c in $CASES; do ${CLI[$c]} ping -c 3 -i 0.2 -W 1 ${DST[$c]} >/dev/null; done

for rep in $(seq "$REPS"); do
    for c in $CASES; do
        ${SRV[$c]} iperf3 -s -1 -D -p 5301 >/dev/null 2>&1; sleep 0.3
        g=$(${CLI[$c]} timeout $((DUR + 20)) iperf3 -c ${DST[$c]} -p 5301 -t "$DUR" -J \
            | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)')
        echo -e "$c\ttcp1_gbps\t$g" >>"$RES"
        ${SRV[$c]} iperf3 -s -1 -D -p 5302 >/dev/null 2>&1; sleep 0.3
        g=$(${CLI[$c]} timeout $((DUR + 20)) iperf3 -c ${DST[$c]} -p 5302 -t "$DUR" -P 4 -J \
            | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)')
        echo -e "$c\ttcp4_gbps\t$g" >>"$RES"
        r=$(${CLI[$c]} ping -q -c 50 -i 0.01 -W 1 ${DST[$c]} | awk -F/ '/^rtt/ {print $5}')
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
print("| metric | kernel bridge | vswitch | vswitch rootless | vswitch / bridge | rootless / bridge | rootless / vswitch |")
print("|---|---|---|---|---|---|---|")
for metric in ["tcp1_gbps", "tcp4_gbps", "ping_avg_ms", "attach_ms"]:
    d = data.get(metric, {})
    m = lambda c: st.median(d[c]) if c in d else None
    b, v, r = m("bridge"), m("vswitch"), m("vswitch-rootless")
    ratio = lambda x, y: f"{x / y:.2f}x" if x and y else "-"
    fmt = lambda x: "-" if x is None else f"{x:.3f}"
    print(f"| {metric} (median of {len(d.get('vswitch', []))}) | {fmt(b)} | {fmt(v)} | {fmt(r)} | {ratio(v, b)} | {ratio(r, b)} | {ratio(r, v)} |")
PY
