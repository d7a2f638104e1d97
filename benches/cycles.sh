#!/usr/bin/env bash
# CPU the forwarding thread spends per frame (UDP 64 B) and per byte (TCP), for vswitch's
# datapath thread and for the bare TAP forwarder (benches/src/bin/tapfwd.rs), measured with
# `perf stat` on the thread alone while iperf3 runs. Unlike Gbit/s, these figures compare
# across machines. The thread's CPU time is `task-clock`; cycles are counted where the CPU has
# a performance counter, and otherwise estimated from the clock (cpu MHz in /proc/cpuinfo:
# a VM often has no counter). Frames and bytes are what the forwarder delivered: the
# containers' ports' TX in `vswitch stats`, or the forwarder's TAPs' tx counters.
#
#   sudo benches/cycles.sh [-t SECONDS]
#
# Everything stays in namespaces named vscyc-<pid>-*, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
install_packages linux-perf
find_cargo
[ "$(id -u)" -eq 0 ] || { echo "needs root" >&2; exit 1; }
DUR=5
while getopts "t:" o; do case $o in t) DUR=$OPTARG ;; *) exit 2 ;; esac; done

cargo build --release --locked -p vswitch -p vswitch-benches --bin vswitch --bin tapfwd >&2
BIN=$PWD/target/release/vswitch
TAPFWD=$PWD/target/release/tapfwd
P=vscyc-$$-
TMP=$(mktemp -d)
cleanup() {
    pkill -f "$TMP/" 2>/dev/null || true
    [ -n "${TFPID:-}" ] && kill "$TFPID" 2>/dev/null || true
    remove_netns_with_prefix "$P"
    rm -rf "$TMP"
}
trap cleanup EXIT

for n in d a b ta tb; do ip netns add "$P$n"; done
ip -n "${P}d" link set lo up
ip netns exec "${P}d" "$BIN" --socket "$TMP/s.sock" daemon --state-dir "$TMP/state" --log-level warn >"$TMP/log" 2>&1 &
DPID=$!
for _ in $(seq 100); do [ -S "$TMP/s.sock" ] && break; sleep 0.05; done
V="$BIN --socket $TMP/s.sock"
$V network create --subnet 10.89.0.0/24 cyc >/dev/null
$V attach --network cyc --ip 10.89.0.2 "${P}a" >/dev/null
$V attach --network cyc --ip 10.89.0.3 "${P}b" >/dev/null
"$TAPFWD" "${P}ta" "${P}tb" >"$TMP/tapfwd.out" 2>&1 &
TFPID=$!
for _ in $(seq 100); do grep -q ready "$TMP/tapfwd.out" && break; sleep 0.05; done
ip -n "${P}ta" addr add 10.89.1.2/24 dev eth0; ip -n "${P}ta" link set eth0 up
ip -n "${P}tb" addr add 10.89.1.3/24 dev eth0; ip -n "${P}tb" link set eth0 up
ip netns exec "${P}a" ping -c1 -W2 10.89.0.3 >/dev/null
ip netns exec "${P}ta" ping -c1 -W2 10.89.1.3 >/dev/null
DTID=$(ps -L -o tid=,comm= -p "$DPID" | awk '$2 == "dp-cyc" {print $1}')

# Frames and bytes the forwarder delivered so far, both ways ("%.0f": mawk's "%d" stops at
# 2^31).
moved() { # case -> "frames bytes"
    if [ "$1" = vswitch ]; then
        $V stats cyc | awk '$3 != "(gateway)" && $1 == "cyc" {f += $7; b += $8} END {printf "%.0f %.0f\n", f, b}'
    else
        local f=0 b=0 n
        for n in ta tb; do
            f=$((f + $(ip netns exec "$P$n" cat /sys/class/net/eth0/statistics/tx_packets)))
            b=$((b + $(ip netns exec "$P$n" cat /sys/class/net/eth0/statistics/tx_bytes)))
        done
        echo "$f $b"
    fi
}
run() { # case kind -> "cycles frames bytes"
    local c=$1 kind=$2 cli srv dst tid before after cyc
    if [ "$c" = vswitch ]; then cli=${P}a srv=${P}b dst=10.89.0.3 tid=$DTID
    else cli=${P}ta srv=${P}tb dst=10.89.1.3 tid=$TFPID; fi
    ip netns exec "$srv" iperf3 -s -1 -D -p 5301 >/dev/null
    sleep 0.3
    before=$(moved "$c")
    local args=()
    [ "$kind" = udp ] && args=(-u -l 64 -b 0)
    perf stat -x, -e task-clock,cycles -t "$tid" -o "$TMP/perf.csv" -- sleep "$DUR" &
    local perfpid=$!
    ip netns exec "$cli" iperf3 -c "$dst" -p 5301 -t "$DUR" "${args[@]}" >/dev/null
    wait "$perfpid"
    after=$(moved "$c")
    # task-clock in msec; cycles, or "<not supported>" without a counter.
    local ms cycles
    ms=$(awk -F, '/task-clock/ {print $1}' "$TMP/perf.csv")
    cycles=$(awk -F, '/,cycles/ {print $1}' "$TMP/perf.csv")
    case $cycles in ''|*[!0-9]*) cycles=$(python3 -c "print(int($ms * 1e-3 * $MHZ * 1e6))") ;; esac
    python3 -c "b='$before'.split(); a='$after'.split(); print($cycles, $ms, int(a[0])-int(b[0]), int(a[1])-int(b[1]))"
}

MHZ=$(awk -F: '/cpu MHz/ {gsub(/[ \t]/, "", $2); print $2; exit}' /proc/cpuinfo)
COUNTED=yes
perf stat -x, -e cycles -o "$TMP/probe.csv" -- true 2>/dev/null || true
grep -q "not supported" "$TMP/probe.csv" 2>/dev/null && COUNTED="no (estimated from $MHZ MHz)"
echo "| forwarding thread, ${DUR}s each | ns of CPU per frame, UDP 64 B | cycles per frame | ns of CPU per KiB, TCP | cycles per byte |"
echo "|---|---|---|---|---|"
for c in tapfwd vswitch; do
    read -r uc ums uf _ < <(run "$c" udp)
    read -r tc tms _ tb < <(run "$c" tcp)
    python3 -c "
uf, tb = max($uf, 1), max($tb, 1)
print('| $c | %.0f | %.0f | %.1f | %.3f |' % ($ums * 1e6 / uf, $uc / uf, $tms * 1e6 / tb * 1024, $tc / tb))"
done
echo
echo "Cycles counted by the CPU: $COUNTED."
