#!/usr/bin/env bash
# Overlay benchmark: two "hosts" (namespaces joined by a veth underlay), a "container" on each,
# traffic between the containers in VXLAN, vswitch next to the kernel's vxlan + bridge, in one
# run.
#
#   sudo benches/overlay.sh [-r REPEATS] [-t SECONDS]
#
# Cases (per repeat, interleaved):
#   kernel   on each host: a bridge, a vxlan device (VNI 4242, dstport 4789, the other host in
#            its flood list), and a veth to the container (MTU 1450)
#   vswitch  on each host: a vswitch daemon, the two sharing an etcd (on h1) as their cluster
#            store; an overlay network created on h1, the container attached on each host
# Measured: iperf3 TCP, 1 stream (Gbit/s); iperf3 UDP with 64-byte payloads (packets received
# per second). Prints medians and the median of per-repeat ratios vswitch / kernel.
# Everything stays in namespaces named vsov-<pid>-*, removed at the end.
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
bench_scratch vsov

# Two hosts h1 (192.0.2.1) and h2 (192.0.2.2) on one veth pair: the underlay.
underlay() {
    ip netns add "${P}h1"; ip netns add "${P}h2"
    ip -n "${P}h1" link add u0 type veth peer name u0 netns "${P}h2"
    for i in 1 2; do
        ip -n "${P}h$i" addr add "192.0.2.$i/24" dev u0
        ip -n "${P}h$i" link set u0 up
        ip -n "${P}h$i" link set lo up
    done
}

setup_kernel() {
    underlay
    for i in 1 2; do
        local h="${P}h$i" c="${P}c$i" other=$((3 - i))
        ip netns add "$c"
        ip -n "$h" link add vx0 type vxlan id 4242 dstport 4789 local "192.0.2.$i" nolearning
        bridge -n "$h" fdb append 00:00:00:00:00:00 dev vx0 dst "192.0.2.$other"
        ip -n "$h" link add br0 type bridge
        ip -n "$h" link set vx0 master br0 up
        ip -n "$h" link set br0 up
        ip -n "$h" link add k0 type veth peer name eth0 netns "$c"
        ip -n "$h" link set k0 master br0 up
        ip -n "$c" addr add "10.77.0.$((i + 1))/24" dev eth0
        ip -n "$c" link set eth0 mtu 1450 up
        ip -n "$c" link set lo up
    done
    # nolearning: the flood list alone would send every frame to the other host; learn once.
    ip netns exec "${P}c1" ping -c1 -W2 10.77.0.3 >/dev/null
}

setup_vswitch() {
    underlay
    local url=http://192.0.2.1:2379
    ip netns exec "${P}h1" etcd --name e --data-dir "$TMP/etcd-data" --listen-client-urls "$url" \
        --advertise-client-urls "$url" --listen-peer-urls http://127.0.0.1:2380 \
        --initial-advertise-peer-urls http://127.0.0.1:2380 \
        --initial-cluster e=http://127.0.0.1:2380 >"$TMP/etcd.log" 2>&1 &
    for _ in $(seq 200); do
        ip netns exec "${P}h1" bash -c 'exec 3<>/dev/tcp/192.0.2.1/2379' 2>/dev/null && break
        sleep 0.05
    done
    for i in 1 2; do
        local h="${P}h$i" c="${P}c$i"
        ip netns add "$c"
        ip netns exec "$h" "$BIN" --socket "$TMP/h$i.sock" daemon --state-dir "$TMP/h$i" \
            --cluster-store etcd://192.0.2.1:2379 --advertise-addr "192.0.2.$i" \
            --node-name "h$i" >"$TMP/h$i.log" 2>&1 &
    done
    for i in 1 2; do
        for _ in $(seq 200); do grep -q "joined the cluster store" "$TMP/h$i.log" && break; sleep 0.05; done
    done
    "$BIN" --socket "$TMP/h1.sock" network create -d overlay --subnet 10.77.0.0/24 ov >/dev/null
    for i in 1 2; do
        local V="$BIN --socket $TMP/h$i.sock"
        for _ in $(seq 200); do $V network inspect ov >/dev/null 2>&1 && break; sleep 0.05; done
        $V attach --network ov --ip "10.77.0.$((i + 1))" --name "c$i" "${P}c$i" >/dev/null
    done
    for _ in $(seq 20); do
        ip netns exec "${P}c1" ping -c1 -W1 10.77.0.3 >/dev/null && break
    done
}

teardown() {
    pkill -f "$TMP/" 2>/dev/null || true
    sleep 0.3
    remove_netns_with_prefix "$P"
    rm -rf "$TMP"/h1 "$TMP"/h2 "$TMP"/*.sock "$TMP"/etcd.log "$TMP"/etcd-data
}

tcp() {
    ip netns exec "${P}c2" iperf3 -s -1 -D -p 5301 >/dev/null
    sleep 0.3
    ip netns exec "${P}c1" iperf3 -c 10.77.0.3 -p 5301 -t "$DUR" -J |
        python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
}

udp() {
    ip netns exec "${P}c2" iperf3 -s -1 -D -p 5302 >/dev/null
    sleep 0.3
    ip netns exec "${P}c1" iperf3 -c 10.77.0.3 -p 5302 -u -l 64 -b 0 -t "$DUR" -J |
        python3 -c 'import json,sys; e=json.load(sys.stdin)["end"]["sum"]; print(int((e["packets"]-e["lost_packets"])/e["seconds"]))'
}

declare -A RES
for r in $(seq "$REPS"); do
    for case in kernel vswitch; do
        "setup_$case"
        RES[$case,tcp,$r]=$(tcp)
        RES[$case,udp,$r]=$(udp)
        teardown
        echo "repeat $r $case: tcp ${RES[$case,tcp,$r]} Gbit/s, udp64 ${RES[$case,udp,$r]} pps" >&2
    done
done

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.2f\n", (a[NR/2]+a[NR/2+1])/2}'; }
echo "| overlay, $REPS repeats x ${DUR}s | kernel vxlan + bridge | vswitch | vswitch / kernel |"
echo "|---|---|---|---|"
for m in tcp udp; do
    k=$(for r in $(seq "$REPS"); do echo "${RES[kernel,$m,$r]}"; done | median)
    v=$(for r in $(seq "$REPS"); do echo "${RES[vswitch,$m,$r]}"; done | median)
    ratio=$(for r in $(seq "$REPS"); do python3 -c "print(${RES[vswitch,$m,$r]} / ${RES[kernel,$m,$r]})"; done | median)
    label=$([ "$m" = tcp ] && echo "TCP 1 stream (Gbit/s)" || echo "UDP 64 B (packets/s)")
    printf '| %s | %s | %s | %.2fx |\n' "$label" "$k" "$v" "$ratio"
done
