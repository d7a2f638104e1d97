#!/usr/bin/env bash
# Two builds of vswitch side by side, in one run: a change's before and after, on the paths
# users feel. Not a test: it prints numbers (markdown) and judges nothing.
#
#   sudo benches/compare.sh [-r REPEATS] [-t SECONDS] [-a ATTACHES] BASE_BIN [NEW_BIN]
#
#   BASE_BIN  the vswitch binary to compare against (for example a release build of the
#             commit before a change: git worktree add /tmp/base REV && cargo build --release
#             in it)
#   NEW_BIN   default: a release build of this checkout
#   -r        interleaved repeats (default 3)   -t  seconds per measurement (default 5)
#   -a        attach + detach cycles per build (default 30; 0 skips attach)
#   -m        measure only these, comma-separated: tcp1,udp64,ping,pub,out,dns (default all)
#
# Each build gets its own daemon in its own namespace, a network, two container namespaces
# (c1, c2; c2 publishes -p 15201:5201 and has 100 aliases) and an "outside" namespace joined
# to the daemon's by a veth. Per repeat, builds interleaved (base, new, base, ...):
#   tcp1_gbps      iperf3 TCP, 1 stream, c1 -> c2 (L2 through the switch)
#   udp64_rx_pps   iperf3 UDP, 64-byte payloads, unlimited rate, c1 -> c2 (received/s)
#   ping_avg_ms    50 pings 10 ms apart, c1 -> c2
#   pub_tcp_gbps   iperf3 TCP, 1 stream, outside -> the published port (the gateway path
#                  that shows the container the client's own address)
#   out_tcp_gbps   iperf3 TCP, 1 stream, c1 -> a server outside (outbound NAT)
#   dns_qps        dnsperf, saturated, c1 asking its gateway for c2's aliases
# then attach_ms: client wall time of `vswitch attach`, builds alternating.
# Prints medians and the ratio new / base. Everything lives in namespaces named
# vscmp-<pid>-*, removed at the end; traffic goes only to addresses inside them.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
install_packages dnsperf
find_cargo
[ "$(id -u)" -eq 0 ] || { echo "needs root" >&2; exit 1; }

REPS=3 DUR=5 NATT=30 ONLY=tcp1,udp64,ping,pub,out,dns
while getopts "r:t:a:m:" o; do
    case $o in
        r) REPS=$OPTARG ;; t) DUR=$OPTARG ;; a) NATT=$OPTARG ;; m) ONLY=$OPTARG ;; *) exit 2 ;;
    esac
done
want() { [[ ",$ONLY," == *",$1,"* ]]; }
shift $((OPTIND - 1))
[ $# -ge 1 ] || { echo "usage: $0 [-r N] [-t S] [-a N] [-m LIST] BASE_BIN [NEW_BIN]" >&2; exit 2; }
BASE=$(realpath "$1")
if [ $# -ge 2 ]; then
    NEW=$(realpath "$2")
else
    cargo build --release --locked -p vswitch >&2
    NEW=$PWD/target/release/vswitch
fi
H=$PWD/benches/e2e_helper.py
P=vscmp-$$-
TMP=$(mktemp -d /tmp/vscmp.XXXXXX)
DPIDS=()
cleanup() {
    for p in "${DPIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${DPIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    remove_netns_with_prefix "$P"
    rm -rf "$TMP"
}
trap cleanup EXIT
nsx() { local n=$1; shift; ip netns exec "$n" "$@"; }
wait_listen() { # NS PORT
    local i
    for i in $(seq 100); do
        nsx "$1" ss -Hltn "sport = :$2" 2>/dev/null | grep -q . && return 0
        sleep 0.05
    done
    return 1
}

declare -A BIN=([base]=$BASE [new]=$NEW) NET=([base]=41 [new]=42)
BUILDS="base new"
for b in $BUILDS; do
    n=${NET[$b]}
    for x in h c1 c2 o att; do ip netns add "$P$b-$x"; done
    # The outside reaches the daemon's namespace over a veth.
    ip -n "$P$b-h" link add veth0 type veth peer name veth0 netns "$P$b-o"
    ip -n "$P$b-h" addr add "10.232.$n.1/24" dev veth0
    ip -n "$P$b-o" addr add "10.232.$n.2/24" dev veth0
    for x in h o; do ip -n "$P$b-$x" link set veth0 up; ip -n "$P$b-$x" link set lo up; done
    ip netns exec "$P$b-h" "${BIN[$b]}" --socket "$TMP/$b.sock" daemon --state-dir "$TMP/$b-state" \
        --log-level warn >"$TMP/$b-daemon.log" 2>&1 &
    DPIDS+=($!)
    for _ in $(seq 200); do [ -S "$TMP/$b.sock" ] && break; sleep 0.05; done
    vs() { "${BIN[$b]}" --socket "$TMP/$b.sock" "$@"; }
    vs network create cmp --subnet "10.231.$n.0/24" >/dev/null
    vs attach --network cmp --ip "10.231.$n.11" "$P$b-c1" >/dev/null
    aliases=()
    for i in $(seq -w 1 100); do aliases+=(--alias "a$i"); done
    vs attach --network cmp --ip "10.231.$n.12" -p 15201:5201 "${aliases[@]}" "$P$b-c2" >/dev/null
    nsx "$P$b-c1" ping -c 3 -i 0.2 -W 1 "10.231.$n.12" >/dev/null
done
for i in $(seq -w 1 100); do echo "a$i A"; done >"$TMP/queries"

RES=$TMP/results.tsv; : >"$RES"
record() { # build
    local m v
    while read -r m v; do [ -n "${v:-}" ] && echo -e "$1\t$m\t$v" >>"$RES"; done
    return 0
}
iperf() { # build client-ns server-ns dst port kind args...
    local b=$1 cli=$2 srv=$3 dst=$4 port=$5 kind=$6; shift 6
    nsx "$srv" iperf3 -s -1 -D -p 5201 >/dev/null 2>&1 || return 0
    wait_listen "$srv" 5201 || return 0
    nsx "$cli" timeout $((DUR + 20)) iperf3 -c "$dst" -p "$port" -t "$DUR" -J "$@" \
        >"$TMP/iperf.json" 2>/dev/null || true
    python3 "$H" iperf "$TMP/iperf.json" "$kind" | record "$b"
    # A server whose client never came is stopped before the next one binds the port.
    pkill -f "iperf3 -s -1 -D -p 5201" 2>/dev/null || true
}
for rep in $(seq "$REPS"); do
    for b in $BUILDS; do
        n=${NET[$b]} c1=$P$b-c1 c2=$P$b-c2
        if want tcp1; then iperf "$b" "$c1" "$c2" "10.231.$n.12" 5201 tcp1_gbps; fi
        if want udp64; then iperf "$b" "$c1" "$c2" "10.231.$n.12" 5201 udp -u -l 64 -b 0; fi
        if want ping; then
            nsx "$c1" timeout 20 ping -q -c 50 -i 0.01 -W 1 "10.231.$n.12" >"$TMP/ping.txt" 2>&1 || true
            python3 "$H" ping "$TMP/ping.txt" | record "$b"
        fi
        if want pub; then iperf "$b" "$P$b-o" "$c2" "10.232.$n.1" 15201 pub_tcp_gbps; fi
        if want out; then iperf "$b" "$c1" "$P$b-o" "10.232.$n.2" 5201 out_tcp_gbps; fi
        if want dns; then
            nsx "$c1" timeout $((DUR + 30)) dnsperf -d "$TMP/queries" -T 1 -c 1 -s "10.231.$n.1" \
                -l "$DUR" >"$TMP/dnsperf.txt" 2>&1 || true
            awk '/Queries per second:/ {print "dns_qps", $4}' "$TMP/dnsperf.txt" | record "$b"
        fi
        echo "compare: rep $rep $b done" >&2
    done
done
for i in $(seq "$NATT"); do
    for b in $BUILDS; do
        t0=$(date +%s%N)
        "${BIN[$b]}" --socket "$TMP/$b.sock" attach --network cmp --name att "$P$b-att" >/dev/null
        t1=$(date +%s%N)
        "${BIN[$b]}" --socket "$TMP/$b.sock" detach att
        echo -e "$b\tattach_ms\t$(( (t1 - t0) / 1000 ))e-3" >>"$RES"
    done
done

python3 - "$RES" "$BASE" "$NEW" <<'PY'
import sys, statistics as st
d = {}
for line in open(sys.argv[1]):
    b, m, v = line.rstrip("\n").split("\t")
    d.setdefault(m, {}).setdefault(b, []).append(float(v))
print(f"base: {sys.argv[2]}  \nnew: {sys.argv[3]}\n")
print("| metric | base | new | new / base |")
print("|---|---|---|---|")
fmt = lambda x: "-" if x is None else f"{x:,.0f}" if x > 1000 else f"{x:.3f}"
for m in ["tcp1_gbps", "udp64_rx_pps", "ping_avg_ms", "pub_tcp_gbps", "out_tcp_gbps", "dns_qps",
          "attach_ms"]:
    runs = d.get(m, {})
    if not runs:
        continue
    med = {b: st.median(v) if v else None for b, v in runs.items()}
    base, new = med.get("base"), med.get("new")
    ratio = f"{new / base:.2f}x" if base and new else "-"
    n = len(runs.get("new", []))
    print(f"| {m} (median of {n}) | {fmt(base)} | {fmt(new)} | {ratio} |")
PY
