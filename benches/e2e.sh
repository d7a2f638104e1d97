#!/usr/bin/env bash
# The end-to-end benchmark suite: vswitch side by side with its peers, in one run, on this
# machine. Not a test: it prints numbers (markdown) and judges nothing.
#
#   sudo benches/e2e.sh [-r REPEATS] [-t SECONDS] [-n ENDPOINTS] [-a ATTACHES] [-s]
#
#   -r  interleaved repeats of every L2 case (default 3)
#   -t  seconds per iperf3 run (default 5)
#   -n  endpoints on one network for the scale check (default 200)
#   -a  attach + detach cycles for the attach latency (default 100)
#   -s  skip the port-forwarding and DNS sections (benches/nat.sh and benches/dns.sh)
#
# L2, container to container, each case with two "container" namespaces:
#   veth     one veth pair (the upper bound: no switch at all)
#   bridge   a kernel bridge in a third namespace, a veth per container (the docker0 model)
#   vde      vde_switch plus one vde_plug2tap per container (Debian vde2), as
#            ../shared/tools/baseline.sh sets it up
#   tapfwd   a bare TAP-to-TAP forwarder (benches/src/bin/tapfwd.rs): the design's limit, with
#            the datapath's thread priority and busy-poll; the table adds vswitch / tapfwd
#   vswitch  the vswitch daemon in its own namespace, one TAP per container
# Per case and repeat: iperf3 TCP 1 and 4 streams, iperf3 UDP with 64-byte payloads (packets
# received per second), ping (50 x 10 ms), sockperf TCP ping-pong RTT (64 B), connects/s (a
# Python connect/send/receive/close loop). Repeats are interleaved (veth, bridge, vde, vswitch,
# veth, ...); the table shows medians and the median of per-repeat ratios to the bridge.
#
# Then, on the same daemon: attach latency (client wall time of `vswitch attach`, median and
# p90 of -a cycles; also for a rootless daemon attaching a user's namespace by PID, as the
# user vswitch-rootless, created if absent, with /dev/net/tun 0666 meanwhile); N endpoints on one network (all reachable by ping from the first; TCP and
# ping between two of them next to the 2-endpoint network, to show the per-frame cost stays
# flat); the daemon's CPU while idle and its memory per endpoint. Last, unless -s, the
# published-port table of benches/nat.sh and the DNS table of benches/dns.sh.
#
# Everything lives in namespaces named vse2e-<pid>-*, removed at the end; traffic only goes to
# addresses inside them.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
install_packages vde2 sockperf
find_cargo
[ "$(id -u)" -eq 0 ] || { echo "needs root" >&2; exit 1; }

REPS=3 DUR=5 NEP=200 NATT=100 PEERS=1
while getopts "r:t:n:a:s" o; do
    case $o in
        r) REPS=$OPTARG ;; t) DUR=$OPTARG ;; n) NEP=$OPTARG ;; a) NATT=$OPTARG ;; s) PEERS=0 ;;
        *) exit 2 ;;
    esac
done

cargo build --release --locked -p vswitch -p vswitch-benches --bin vswitch --bin tapfwd >&2
BIN=$PWD/target/release/vswitch
TAPFWD=$PWD/target/release/tapfwd
H=$PWD/benches/e2e_helper.py
P=vse2e-$$-
TMP=$(mktemp -d /tmp/vse2e.XXXXXX)
export VSWITCH_SOCKET=$TMP/vswitch.sock
cleanup() {
    if declare -F stop_rootless >/dev/null; then stop_rootless; fi
    local p
    for p in "${DPID:-}" "${TFPID:-}"; do
        [ -n "$p" ] || continue
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    remove_netns_with_prefix "$P"
    rm -rf "$TMP"
    true
}
trap cleanup EXIT
nsx() { local n=$1; shift; ip netns exec "$n" "$@"; }
say() { echo "e2e: $*" >&2; }
wait_listen() { # NS PORT
    local i
    for i in $(seq 100); do
        nsx "$1" ss -Hltn "sport = :$2" 2>/dev/null | grep -q . && return 0
        sleep 0.05
    done
    return 1
}

# --- veth: a1 <-> a2
ip netns add ${P}a1; ip netns add ${P}a2
ip -n ${P}a1 link add veth0 type veth peer name veth0 netns ${P}a2
for i in 1 2; do
    ip -n ${P}a$i addr add 10.231.11.$i/24 dev veth0
    ip -n ${P}a$i link set veth0 up; ip -n ${P}a$i link set lo up
done

# --- kernel bridge: b1, b2 -> br0 in sw
setup_bridge_pair "$P" 10.231.12

# --- VDE: vde_switch in vs, a plug process and tap0 in d1, d2
ip netns add ${P}vs
nsx ${P}vs vde_switch -d -s "$TMP/vde.ctl" -M "$TMP/vde.mgmt" -p "$TMP/vde_switch.pid" >/dev/null
for _ in $(seq 50); do [ -S "$TMP/vde.ctl/ctl" ] && break; sleep 0.1; done
for i in 1 2; do
    ip netns add ${P}d$i
    nsx ${P}d$i vde_plug2tap -d -P "$TMP/vdeplug$i.pid" -s "$TMP/vde.ctl" tap0
    for _ in $(seq 50); do ip -n ${P}d$i link show tap0 >/dev/null 2>&1 && break; sleep 0.1; done
    ip -n ${P}d$i addr add 10.231.13.$i/24 dev tap0
    ip -n ${P}d$i link set tap0 up; ip -n ${P}d$i link set lo up
done

# --- tapfwd: a TAP in t1 and t2, moved to each other by the bare forwarder
ip netns add ${P}t1; ip netns add ${P}t2
"$TAPFWD" ${P}t1 ${P}t2 >"$TMP/tapfwd.out" 2>"$TMP/tapfwd.err" &
TFPID=$!
for _ in $(seq 100); do grep -q ready "$TMP/tapfwd.out" 2>/dev/null && break; sleep 0.05; done
for i in 1 2; do
    ip -n ${P}t$i addr add 10.231.17.$i/24 dev eth0
    ip -n ${P}t$i link set eth0 up; ip -n ${P}t$i link set lo up
done

# --- vswitch: daemon in vh, v1 and v2 attached
for n in vh v1 v2; do ip netns add $P$n; done
# Started without a shell function in between, so that $! is the daemon itself (its CPU and
# memory are measured below; `ip netns exec` execs it in place).
ip netns exec ${P}vh "$BIN" daemon --state-dir "$TMP/state" --log-level warn >"$TMP/daemon.log" 2>&1 &
DPID=$!
for _ in $(seq 200); do [ -S "$VSWITCH_SOCKET" ] && break; sleep 0.05; done
"$BIN" network create e2e --subnet 10.231.14.0/24 >/dev/null
"$BIN" attach --network e2e --ip 10.231.14.11 ${P}v1 >/dev/null
"$BIN" attach --network e2e --ip 10.231.14.12 ${P}v2 >/dev/null

declare -A CLI=([veth]=${P}a1 [bridge]=${P}b1 [vde]=${P}d1 [tapfwd]=${P}t1 [vswitch]=${P}v1) \
           SRV=([veth]=${P}a2 [bridge]=${P}b2 [vde]=${P}d2 [tapfwd]=${P}t2 [vswitch]=${P}v2) \
           DST=([veth]=10.231.11.2 [bridge]=10.231.12.2 [vde]=10.231.13.2 [tapfwd]=10.231.17.2
                [vswitch]=10.231.14.12)
CASES="veth bridge vde tapfwd vswitch"
RES=$TMP/results.tsv; : >"$RES"

# One measurement set between CLI and SRV namespaces, recorded as case $1, repeat $2.
measure() { # case rep cli srv dst [quick]
    local c=$1 rep=$2 cli=$3 srv=$4 dst=$5 quick=${6:-}
    record() {
        local m v
        while read -r m v; do
            if [ -n "${v:-}" ]; then echo -e "$c\t$rep\t$m\t$v" >>"$RES"; fi
        done
    }
    iperf() { # metric-or-udp args...
        local kind=$1; shift
        nsx "$srv" iperf3 -s -1 -D -p 5301 >/dev/null 2>&1 || return 0
        wait_listen "$srv" 5301 || return 0
        nsx "$cli" timeout $((DUR + 20)) iperf3 -c "$dst" -p 5301 -t "$DUR" -J "$@" >"$TMP/iperf.json" 2>/dev/null || true
        python3 "$H" iperf "$TMP/iperf.json" "$kind" | record
    }
    iperf tcp1_gbps
    nsx "$cli" timeout 20 ping -q -c 50 -i 0.01 -W 1 "$dst" >"$TMP/ping.txt" 2>&1 || true
    python3 "$H" ping "$TMP/ping.txt" | record
    [ -n "$quick" ] && return 0
    iperf tcp4_gbps -P 4
    iperf udp -u -l 64 -b 0
    nsx "$srv" timeout 30 sockperf server -i 0.0.0.0 -p 5302 --tcp >/dev/null 2>&1 &
    local sp=$!
    if wait_listen "$srv" 5302; then
        nsx "$cli" timeout 20 sockperf ping-pong -i "$dst" -p 5302 --tcp -t 3 -m 64 --full-rtt \
            >"$TMP/rr.txt" 2>&1 || true
        python3 "$H" sockperf "$TMP/rr.txt" | record
    fi
    kill "$sp" 2>/dev/null || true; wait "$sp" 2>/dev/null || true
    nsx "$srv" timeout 15 python3 "$H" crr-server 5303 6 &
    local cs=$!
    if wait_listen "$srv" 5303; then
        { nsx "$cli" timeout 15 python3 "$H" crr-client "$dst" 5303 2 || true; } | grep '^cps' | record || true
    fi
    kill "$cs" 2>/dev/null || true; wait "$cs" 2>/dev/null || true
}

for c in $CASES; do nsx ${CLI[$c]} ping -c 2 -i 0.2 -W 1 ${DST[$c]} >/dev/null || say "$c: no ping"; done
for rep in $(seq "$REPS"); do
    for c in $CASES; do
        measure "$c" "$rep" "${CLI[$c]}" "${SRV[$c]}" "${DST[$c]}"
        say "repeat $rep: $c done"
    done
done

# --- attach latency: attach + detach of a fresh namespace, client wall time
ip netns add ${P}att
for i in $(seq "$NATT"); do
    t0=$(date +%s%N)
    "$BIN" attach --network e2e --name att ${P}att >/dev/null
    t1=$(date +%s%N)
    "$BIN" detach att
    echo $(( (t1 - t0) / 1000 )) >>"$TMP/attach_us"
done
say "attach latency done"

# --- rootless attach latency: daemon and client as an unprivileged user, the target a
# namespace that user made (the TAP comes from a helper process inside it). A failure here is
# reported in the table ("no successful cycle") and the run goes on.
RPIDS=()
stop_rootless() {
    local p
    for p in ${RPIDS[@]+"${RPIDS[@]}"}; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    RPIDS=()
    if [ -n "${TUN_MODE:-}" ]; then chmod "$TUN_MODE" /dev/net/tun; TUN_MODE=; fi
}
rootless_attach() {
    local RU=vswitch-rootless RDIR=$TMP/rootless tpid i t0 t1
    id $RU >/dev/null 2>&1 || useradd --create-home --shell /bin/sh $RU || return 1
    TUN_MODE=$(stat -c %a /dev/net/tun)
    chmod 0666 /dev/net/tun
    ip netns add ${P}rh && ip -n ${P}rh link set lo up || return 1
    mkdir -p "$RDIR/run" && cp "$BIN" "$RDIR/vswitch" || return 1
    chown -R $RU: "$RDIR"; chmod 755 "$TMP" "$RDIR"
    local asuser=(setpriv --reuid "$(id -u $RU)" --regid "$(id -g $RU)" --clear-groups
                  env HOME="$RDIR" XDG_RUNTIME_DIR="$RDIR/run")
    ip netns exec ${P}rh "${asuser[@]}" "$RDIR/vswitch" --socket "$RDIR/s" daemon \
        --state-dir "$RDIR/st" --log-level warn >"$TMP/rdaemon.log" 2>&1 &
    RPIDS+=($!)
    for _ in $(seq 200); do [ -S "$RDIR/s" ] && break; sleep 0.05; done
    [ -S "$RDIR/s" ] || { say "rootless daemon did not start: $(tail -1 "$TMP/rdaemon.log")"; return 1; }
    "${asuser[@]}" "$RDIR/vswitch" --socket "$RDIR/s" network create ratt \
        --subnet 10.231.15.0/24 >/dev/null || return 1
    # setpriv, env and unshare all exec in place: $! ends up as the sleep in the new namespaces.
    ip netns exec ${P}rh "${asuser[@]}" unshare --user --map-root-user --net sleep 3600 &
    tpid=$!; RPIDS+=("$tpid")
    for _ in $(seq 100); do
        local ns; ns=$(readlink "/proc/$tpid/ns/user" 2>/dev/null) || ns=""
        [ -n "$ns" ] && [ "$ns" != "$(readlink /proc/self/ns/user)" ] && break
        sleep 0.05
    done
    for i in $(seq "$NATT"); do
        t0=$(date +%s%N)
        "${asuser[@]}" "$RDIR/vswitch" --socket "$RDIR/s" attach --network ratt --name ratt \
            "$tpid" >/dev/null || return 1
        t1=$(date +%s%N)
        "${asuser[@]}" "$RDIR/vswitch" --socket "$RDIR/s" detach ratt || return 1
        echo $(( (t1 - t0) / 1000 )) >>"$TMP/rattach_us"
    done
}
rootless_attach || say "rootless attach failed (see the table)"
stop_rootless
say "rootless attach latency done"

# --- scale: NEP endpoints on one network
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$DPID/status"; }
ticks() { awk '{print $14 + $15}' "/proc/$DPID/stat"; }
RSS0=$(rss_kib)
"$BIN" network create many --subnet 10.232.0.0/16 >/dev/null
t0=$(date +%s%N)
for i in $(seq "$NEP"); do
    ip netns add ${P}m$i
    "$BIN" attach --network many --ip 10.232.$((i / 250)).$((i % 250 + 2)) ${P}m$i >/dev/null
done
t1=$(date +%s%N)
say "$NEP endpoints attached"
reach=0
for i in $(seq 2 "$NEP"); do
    nsx ${P}m1 ping -c 1 -W 1 10.232.$((i / 250)).$((i % 250 + 2)) >/dev/null 2>&1 && reach=$((reach + 1))
done
for rep in $(seq "$REPS"); do
    measure "vswitch-${NEP}ep" "$rep" ${P}m1 ${P}m2 10.232.0.4 quick
    measure vswitch-2ep "$rep" ${P}v1 ${P}v2 10.231.14.12 quick
done
sleep 2
RSS1=$(rss_kib)
k0=$(ticks); sleep 10; k1=$(ticks)
HZ=$(getconf CLK_TCK)

echo "## vswitch end-to-end benchmark"
echo
echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, kernel $(uname -r), $REPS interleaved repeats, iperf3 -t $DUR"
echo
echo "### Container to container (L2)"
echo
python3 "$H" summary "$RES" veth,bridge,vde,tapfwd,vswitch vswitch/tapfwd
echo
echo "### Attach, scale, idle"
echo
python3 - "$TMP/attach_us" "$TMP/rattach_us" <<'PY'
import statistics, sys
for path, what in zip(sys.argv[1:], ("attach", "rootless attach (as an unprivileged user, by PID)")):
    try:
        v = sorted(int(l) for l in open(path) if l.strip())
    except FileNotFoundError:
        v = []
    if not v:
        print(f"- {what}: no successful cycle")
        continue
    print(f"- {what} (client wall time, {len(v)} attach + detach cycles): median {statistics.median(v) / 1000:.1f} ms, "
          f"p90 {v[int(len(v) * 0.9) - 1] / 1000:.1f} ms")
PY
echo "- $NEP endpoints on one network: attached in $(( (t1 - t0) / 1000000 )) ms" \
     "($(( (t1 - t0) / 1000 / NEP )) us each, namespace creation included);" \
     "$reach of $((NEP - 1)) reachable by ping from the first"
python3 - "$RES" "$NEP" <<'PY'
import statistics, sys
rows = [l.rstrip('\n').split('\t') for l in open(sys.argv[1]) if l.strip()]
def med(case, metric):
    v = [float(x[3]) for x in rows if x[0] == case and x[2] == metric]
    return statistics.median(v) if v else None
n = sys.argv[2]
for metric, label in (('tcp1_gbps', 'TCP 1 stream Gbit/s'), ('ping_avg_ms', 'ping avg ms')):
    big, small = med(f'vswitch-{n}ep', metric), med('vswitch-2ep', metric)
    if big and small:
        print(f"- {label} between two endpoints: {big:.3f} with {n} endpoints on the network, "
              f"{small:.3f} with 2 (same repeats): {big / small:.2f}x")
PY
echo "- daemon idle with $((NEP + 2)) endpoints: $(awk -v d=$((k1 - k0)) -v hz="$HZ" 'BEGIN{printf "%.2f", 100 * d / hz / 10}')% of one CPU over 10 s"
echo "- daemon memory: $RSS0 KiB RSS with 2 endpoints, $RSS1 KiB with $((NEP + 2)):" \
     "$(( (RSS1 - RSS0) / NEP )) KiB per endpoint"

if [ "$PEERS" = 1 ]; then
    cleanup; trap - EXIT
    echo
    echo "### Published port and outbound NAT (benches/nat.sh -r $REPS -t $DUR)"
    echo
    benches/nat.sh -r "$REPS" -t "$DUR" 2>/dev/null
    echo
    echo "### DNS (benches/dns.sh -r $REPS -d $((DUR * 2)))"
    echo
    benches/dns.sh -r "$REPS" -d $((DUR * 2)) 2>/dev/null
fi
