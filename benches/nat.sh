#!/usr/bin/env bash
# Port-forwarding and outbound NAT benchmark: vswitch next to kernel DNAT, socat (the
# docker-proxy model) and pasta, set up as ../shared/tools/baseline.sh does, in one run.
#
#   sudo benches/nat.sh [-r REPEATS] [-t SECONDS]
#
# Cases (iperf3 TCP, 1 stream; the server always runs in a "container" namespace):
#   dnat      iptables DNAT from 127.0.0.1 in a host netns, veth to the container
#   socat     socat fork proxy on 127.0.0.1 in the host netns, veth to the container
#   pasta     pasta -t from the host netns' loopback into the container (spliced)
#   vswitch   vswitch daemon in the host netns, -p 15201:5201, client on 127.0.0.1 (the
#             in-kernel splice path a root daemon uses for loopback clients)
#   vswitch-remote  same, client in another netns reaching the host netns over a veth (the
#             path that shows the container the client's own address)
#   vswitch-out     container -> outside: iperf3 client in a vswitch container, server in a
#             namespace behind the daemon's veth (outbound NAT)
#   kernel-remote, kernel-out  the kernel's own way for the same two paths: a routed "host"
#             namespace with iptables DNAT (remote client -> veth -> host -> veth -> container)
#             and MASQUERADE (container -> veth -> host -> veth -> outside)
#   *-dl      the same four with the bytes flowing the other way (iperf3 -R): a download
#             into the container, which is what apt-get and pip do
#   UDP 64 B packets/s (iperf3 -u -l 64, unlimited rate, received rate) for vswitch-remote,
#   kernel-remote, vswitch-out and kernel-out.
#   vswitch-rootless  the published-port case with the daemon and the container (vswitch run)
#             running as the unprivileged user vswitch-rootless (created if absent)
#   vswitch-out-4000idle  vswitch-out again while the container holds 4000 idle outbound
#             connections (run after the other repeats)
# Repeats are interleaved. Prints medians and ratios to dnat and pasta. Everything stays in
# namespaces named vsnat-<pid>-*, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
install_packages iptables socat passt
find_cargo
[ "$(id -u)" -eq 0 ] || { echo "needs root" >&2; exit 1; }
REPS=3 DUR=5
while getopts "r:t:" o; do case $o in r) REPS=$OPTARG ;; t) DUR=$OPTARG ;; *) exit 2 ;; esac; done

cargo build --release --locked -p vswitch >&2
BIN=$PWD/target/release/vswitch
P=vsnat-$$-
TMP=$(mktemp -d /tmp/vsnat.XXXXXX)
export VSWITCH_SOCKET=$TMP/vswitch.sock
PIDS=()
TUN_MODE=$(stat -c %a /dev/net/tun)
cleanup() {
    chmod "$TUN_MODE" /dev/net/tun
    [ -n "${RDIR:-}" ] && "${ASUSER[@]}" "$RDIR/vswitch" --socket "$RDIR/s" rm -f rperf >/dev/null 2>&1 || true
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -f "$TMP/pasta.pid" ] && kill "$(cat "$TMP/pasta.pid")" 2>/dev/null || true
    remove_netns_with_prefix "$P"
    rm -rf "$TMP"
}
trap cleanup EXIT
nsx() { local n=$1; shift; ip netns exec "$n" "$@"; }
veth() { # NS1 IP1 NS2 IP2 NAME
    ip -n "$1" link add "$5" type veth peer name "$5" netns "$3"
    ip -n "$1" addr add "$2/24" dev "$5"; ip -n "$1" link set "$5" up
    ip -n "$3" addr add "$4/24" dev "$5"; ip -n "$3" link set "$5" up
}
for n in dh dc sh sc ph pc pk vh vc vr vo kh kc kr ko; do ip netns add $P$n; ip -n $P$n link set lo up; done

# dnat
veth ${P}dh 10.231.4.1 ${P}dc 10.231.4.2 v0
nsx ${P}dh sysctl -qw net.ipv4.conf.all.route_localnet=1
nsx ${P}dh iptables -t nat -A OUTPUT -d 127.0.0.1/32 -p tcp --dport 15201 -j DNAT --to-destination 10.231.4.2:5201
nsx ${P}dh iptables -t nat -A POSTROUTING -s 127.0.0.0/8 -o v0 -j MASQUERADE
# kernel-remote and kernel-out: kh routes between a remote client kr, the container kc and
# an outside ko, with DNAT for the published port and MASQUERADE for the way out
veth ${P}kh 10.231.15.1 ${P}kr 10.231.15.2 r0
veth ${P}kh 10.231.16.1 ${P}ko 10.231.16.2 o0
veth ${P}kh 10.231.17.1 ${P}kc 10.231.17.2 c0
ip -n ${P}kc route add default via 10.231.17.1
ip -n ${P}kr route add default via 10.231.15.1
ip -n ${P}ko route add default via 10.231.16.1
nsx ${P}kh sysctl -qw net.ipv4.ip_forward=1
for proto in tcp udp; do
    nsx ${P}kh iptables -t nat -A PREROUTING -d 10.231.15.1/32 -p $proto --dport 15201 -j DNAT --to-destination 10.231.17.2:5201
done
nsx ${P}kh iptables -t nat -A POSTROUTING -s 10.231.17.0/24 -o o0 -j MASQUERADE
# socat
veth ${P}sh 10.231.4.1 ${P}sc 10.231.4.2 v0
nsx ${P}sh socat -b 65536 TCP-LISTEN:15201,bind=127.0.0.1,reuseaddr,fork,backlog=1024 TCP:10.231.4.2:5201 >/dev/null 2>&1 &
PIDS+=($!)
# pasta (needs a routable uplink in its own netns)
veth ${P}ph 10.231.9.1 ${P}pk 10.231.9.254 up0
ip -n ${P}ph route add default via 10.231.9.254 dev up0
nsx ${P}ph pasta --runas 0 -4 -q --config-net -t 127.0.0.1/15201:5201 -u none -T none -U none \
    -P "$TMP/pasta.pid" --netns /run/netns/${P}pc >"$TMP/pasta.log" 2>&1 || echo "pasta failed: $(cat "$TMP/pasta.log")" >&2
# vswitch: daemon in vh; container vc; a remote client vr and an outside vo on veths
veth ${P}vh 10.231.5.1 ${P}vr 10.231.5.2 r0
veth ${P}vh 10.231.6.1 ${P}vo 10.231.6.2 o0
nsx ${P}vh "$BIN" daemon --state-dir "$TMP/state" --log-level warn >"$TMP/daemon.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 200); do [ -S "$VSWITCH_SOCKET" ] && break; sleep 0.05; done
"$BIN" network create natbench --subnet 10.231.7.0/24 >/dev/null
"$BIN" attach --network natbench -p 15201:5201 -p 15201:5201/udp ${P}vc >/dev/null

# vswitch rootless: daemon and container as an unprivileged user, in their own "host" netns
RU=vswitch-rootless
id $RU >/dev/null 2>&1 || useradd --create-home --shell /bin/sh $RU
chmod 0666 /dev/net/tun
ip netns add ${P}rh; ip -n ${P}rh link set lo up
RDIR=$TMP/rootless; mkdir -p "$RDIR/run"; cp "$BIN" "$RDIR/vswitch"; chown -R $RU: "$RDIR"; chmod 755 "$TMP" "$RDIR"
ASUSER=(ip netns exec ${P}rh setpriv --reuid "$(id -u $RU)" --regid "$(id -g $RU)" --clear-groups env HOME="$RDIR" XDG_RUNTIME_DIR="$RDIR/run")
"${ASUSER[@]}" "$RDIR/vswitch" --socket "$RDIR/s" daemon --state-dir "$RDIR/st" --log-level warn >"$TMP/rdaemon.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 200); do [ -S "$RDIR/s" ] && break; sleep 0.05; done
"${ASUSER[@]}" "$RDIR/vswitch" --socket "$RDIR/s" network create rnat --subnet 10.231.10.0/24 >/dev/null
"${ASUSER[@]}" "$RDIR/vswitch" --socket "$RDIR/s" run -d --name rperf --network rnat -p 15201:5201 -- iperf3 -s -p 5201 >/dev/null

for n in dc sc pc vc vo kc ko; do nsx $P$n iperf3 -s -D -p 5201 >/dev/null 2>&1; done
sleep 0.5

RES=$TMP/results.tsv; : >"$RES"
run() { # case client-ns target port [iperf3 args...]
    local g c=$1 ns=$2 host=$3 port=$4
    shift 4
    g=$(nsx "$ns" timeout $((DUR + 20)) iperf3 -c "$host" -p "$port" -t "$DUR" -J "$@" 2>/dev/null \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)' 2>/dev/null) || g=""
    [ -n "$g" ] && echo -e "$c\ttcp1_gbps\t$g" >>"$RES"
}
udp() { # case client-ns target port: 64 B datagrams as fast as they go, received packets/s
    local p
    p=$(nsx "$2" timeout $((DUR + 20)) iperf3 -c "$3" -p "$4" -t "$DUR" -u -b 0 -l 64 -J 2>/dev/null \
        | python3 -c 'import json,sys; s=json.load(sys.stdin)["end"]["sum"]; print((s["packets"]-s["lost_packets"])/s["seconds"])' 2>/dev/null) || p=""
    [ -n "$p" ] && echo -e "$1\tudp64_pps\t$p" >>"$RES"
}
for rep in $(seq "$REPS"); do
    run dnat ${P}dh 127.0.0.1 15201
    run socat ${P}sh 127.0.0.1 15201
    run pasta ${P}ph 127.0.0.1 15201
    run vswitch ${P}vh 127.0.0.1 15201
    run vswitch-remote ${P}vr 10.231.5.1 15201
    run vswitch-out ${P}vc 10.231.6.2 5201
    run kernel-remote ${P}kr 10.231.15.1 15201
    run kernel-out ${P}kc 10.231.16.2 5201
    run vswitch-remote-dl ${P}vr 10.231.5.1 15201 -R
    run kernel-remote-dl ${P}kr 10.231.15.1 15201 -R
    run vswitch-out-dl ${P}vc 10.231.6.2 5201 -R
    run kernel-out-dl ${P}kc 10.231.16.2 5201 -R
    udp vswitch-remote ${P}vr 10.231.5.1 15201
    udp kernel-remote ${P}kr 10.231.15.1 15201
    udp vswitch-out ${P}vc 10.231.6.2 5201
    udp kernel-out ${P}kc 10.231.16.2 5201
    run vswitch-rootless ${P}rh 127.0.0.1 15201
    echo "rep $rep done" >&2
done

# Outbound again with 4000 idle NAT flows open from the same container (a container address
# may hold 4096 outbound flows): smoltcp walks the sockets of a set per frame, so this shows
# whether idle flows slow the busy one.
IDLE=4000
nsx ${P}vo sysctl -qw net.core.somaxconn=16384
nsx ${P}vo bash -c "ulimit -n \$(ulimit -Hn); exec python3 -c '
import socket
l=socket.socket(); l.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)
l.bind((\"0.0.0.0\",6000)); l.listen(16384); held=[]
while True: held.append(l.accept()[0])'" >/dev/null 2>&1 &
PIDS+=($!)
sleep 0.5
nsx ${P}vc bash -c "ulimit -n \$(ulimit -Hn); exec python3 -c '
import socket,sys,time
h=[socket.create_connection((\"10.231.6.2\",6000),timeout=10) for _ in range($IDLE)]
print(len(h),flush=True); time.sleep(3600)'" >"$TMP/held" 2>&1 &
HOLDER=$!; PIDS+=($HOLDER)
for _ in $(seq 600); do [ -s "$TMP/held" ] && break; sleep 0.1; done
echo "holding $(cat "$TMP/held") idle flows" >&2
for rep in $(seq "$REPS"); do run vswitch-out-${IDLE}idle ${P}vc 10.231.6.2 5201; done
kill "$HOLDER" 2>/dev/null || true

python3 - "$RES" <<'PY'
import sys, statistics as st
d = {}
for l in open(sys.argv[1]):
    c, m, v = l.rstrip('\n').split('\t'); d.setdefault((c, m), []).append(float(v))
med = {k: st.median(v) for k, v in d.items()}
tcp = {c: v for (c, m), v in med.items() if m == 'tcp1_gbps'}
print('Loopback client (the in-kernel splice path) and the usual peers:\n')
print('| case | TCP 1 stream Gbit/s (median) | / dnat | / pasta |')
print('|---|---|---|---|')
for c in ['dnat', 'socat', 'pasta', 'vswitch', 'vswitch-rootless']:
    v = tcp.get(c)
    r = lambda b: f'{v / tcp[b]:.2f}x' if v and tcp.get(b) else '-'
    print(f"| {c} | {'-' if v is None else f'{v:.2f}'} | {r('dnat')} | {r('pasta')} |")
print('\nThrough the gateway (the client shown as itself; outbound NAT), next to the kernel:\n')
print('| path | vswitch | kernel | vswitch / kernel |')
print('|---|---|---|---|')
rows = [('remote client -> published port, TCP Gbit/s', 'remote', 'tcp1_gbps', 1),
        ('published port -> remote client (download), TCP Gbit/s', 'remote-dl', 'tcp1_gbps', 1),
        ('container -> outside, TCP Gbit/s', 'out', 'tcp1_gbps', 1),
        ('outside -> container (download), TCP Gbit/s', 'out-dl', 'tcp1_gbps', 1),
        ('remote client -> published port, UDP 64 B kpackets/s', 'remote', 'udp64_pps', 1e3),
        ('container -> outside, UDP 64 B kpackets/s', 'out', 'udp64_pps', 1e3)]
for label, case, m, div in rows:
    v, k = med.get((f'vswitch-{case}', m)), med.get((f'kernel-{case}', m))
    f = lambda x: '-' if x is None else f'{x / div:.2f}' if div == 1 else f'{x / div:.1f}'
    print(f"| {label} | {f(v)} | {f(k)} | {f'{v / k:.2f}x' if v and k else '-'} |")
idle = [c for c in tcp if c.startswith('vswitch-out-') and c.endswith('idle')]
for c in idle:
    print(f"\n{c}: {tcp[c]:.2f} Gbit/s = {tcp[c] / tcp['vswitch-out']:.2f}x vswitch-out without them")
PY
