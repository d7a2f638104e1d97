#!/usr/bin/env bash
# What a hostile container costs the daemon, two builds side by side in one run: memory
# (VmRSS of the daemon, from /proc) and CPU (utime + stime). Not a test: it prints numbers.
#
#   sudo benches/bounds.sh [-n CONNECTIONS] [-k ROUNDS] [-s STUFFED] [-p PINGS] BASE_BIN [NEW_BIN]
#
#   BASE_BIN  the vswitch binary to compare against; NEW_BIN defaults to a release build of
#             this checkout
#   -n, -k    half-open connections per round (default 1500) and rounds, 12 s apart (default 3)
#   -s        connections that are sent 1 MiB each and read none of it (default 200)
#   -p        ping flows: echo ids sent to one outside address, 5 requests each (default 1000)
#
# Per build: a daemon in its own namespace, one network, one container, and an outside
# namespace behind a veth whose nftables drop SYNs to port 9 and whose port 8000 sends 1 MiB
# to every client. The cases run one after the other, builds one after the other:
#   held      the container opens -n non-blocking connections to outside:9, -k times 12 s
#             apart: RSS before, at the peak, and once every flow is gone again
#   stuffed   -s connections to outside:8000 that read nothing for 5 s, then close: RSS at
#             the peak and after
#   pings     -p echo ids, 5 requests each, from a raw socket in the container: daemon CPU
#             seconds (the root daemon uses a raw ICMP socket: ping sockets are closed in a
#             new namespace)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
install_packages
find_cargo
[ "$(id -u)" -eq 0 ] || { echo "needs root" >&2; exit 1; }

CONNS=1500 ROUNDS=3 STUFFED=200 PINGS=1000
while getopts "n:k:s:p:" o; do
    case $o in
        n) CONNS=$OPTARG ;; k) ROUNDS=$OPTARG ;; s) STUFFED=$OPTARG ;; p) PINGS=$OPTARG ;;
        *) exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { echo "usage: $0 [-n N] [-k N] [-s N] [-p N] BASE_BIN [NEW_BIN]" >&2; exit 2; }
BASE=$(realpath "$1")
if [ $# -ge 2 ]; then
    NEW=$(realpath "$2")
else
    cargo build --release --locked -p vswitch >&2
    NEW=$PWD/target/release/vswitch
fi
P=vsbnd-$$-
TMP=$(mktemp -d /tmp/vsbnd.XXXXXX)
DPIDS=()
cleanup() {
    for p in "${DPIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${DPIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    remove_netns_with_prefix "$P"
    rm -rf "$TMP"
}
trap cleanup EXIT
nsx() { local n=$1; shift; ip netns exec "$n" "$@"; }
say() { echo "bounds: $*" >&2; }
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Samples the daemon's RSS every 0.2 s into $TMP/peak until $TMP/stop appears.
sample_peak() { # pid
    local m=0 r
    while [ ! -e "$TMP/stop" ]; do
        r=$(rss "$1"); [ "$r" -gt "$m" ] && m=$r
        sleep 0.2
    done
    echo "$m" >"$TMP/peak"
}
peak_of() { # pid command...
    local pid=$1; shift
    rm -f "$TMP/stop" "$TMP/peak"
    sample_peak "$pid" &
    local s=$!
    "$@"
    touch "$TMP/stop"; wait "$s"; cat "$TMP/peak"
}
wait_settled() { # pid: until RSS stops falling (flows expire, dials time out), at most 40 s
    local last=0 now i
    for i in $(seq 40); do
        sleep 1
        now=$(rss "$1")
        [ "$i" -gt 12 ] && [ "$now" -ge "$last" ] && break
        last=$now
    done
}

RES=$TMP/results.tsv; : >"$RES"
declare -A BIN=([base]=$BASE [new]=$NEW) NET=([base]=51 [new]=52)
for b in base new; do
    n=${NET[$b]} h=$P$b-h c=$P$b-c o=$P$b-o
    for x in h c o; do ip netns add "$P$b-$x"; ip -n "$P$b-$x" link set lo up; done
    ip -n "$h" link add veth0 type veth peer name veth0 netns "$o"
    ip -n "$h" addr add "10.233.$n.1/24" dev veth0
    ip -n "$o" addr add "10.233.$n.2/24" dev veth0
    ip -n "$h" link set veth0 up; ip -n "$o" link set veth0 up
    nsx "$o" nft -f - <<'NFT'
table inet vsbnd {
    chain input { type filter hook input priority 0; tcp dport 9 drop; }
}
NFT
    nsx "$o" python3 -c '
import socket, threading
def serve(c):
    try:
        c.sendall(b"x" * (1 << 20)); c.recv(1)
    except OSError:
        pass
    c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8000)); s.listen(4096)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
' &
    DPIDS+=($!)
    # Not through nsx: $! must be the daemon itself (ip netns exec execs it).
    ip netns exec "$h" "${BIN[$b]}" --socket "$TMP/$b.sock" daemon --state-dir "$TMP/$b-state" \
        --log-level warn >"$TMP/$b-daemon.log" 2>&1 &
    d=$!
    DPIDS+=("$d")
    for _ in $(seq 200); do [ -S "$TMP/$b.sock" ] && break; sleep 0.05; done
    vs() { "${BIN[$b]}" --socket "$TMP/$b.sock" "$@"; }
    vs network create bnd --subnet "10.234.$n.0/24" >/dev/null
    vs attach --network bnd "$c" >/dev/null
    nsx "$c" ping -c 2 -W 1 "10.233.$n.2" >/dev/null || say "$b: outside unreachable"
    sleep 1
    r0=$(rss "$d")

    say "$b: held ($ROUNDS x $CONNS)"
    held() {
        nsx "$c" python3 -c "
import resource, socket, time
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
rounds = []
for r in range($ROUNDS):
    if r:
        time.sleep(12)
    socks = []
    for i in range($CONNS):
        s = socket.socket(); s.setblocking(False); s.connect_ex(('10.233.$n.2', 9)); socks.append(s)
    rounds.append(socks)
time.sleep(3)
"
    }
    r_held=$(peak_of "$d" held)
    wait_settled "$d"
    r_held_after=$(rss "$d")

    say "$b: stuffed ($STUFFED)"
    stuffed() {
        nsx "$c" python3 -c "
import socket, time
socks = [socket.create_connection(('10.233.$n.2', 8000), 5) for _ in range($STUFFED)]
time.sleep(5)
"
    }
    r_stuffed=$(peak_of "$d" stuffed)
    wait_settled "$d"
    r_stuffed_after=$(rss "$d")

    say "$b: pings ($PINGS ids)"
    t0=$(cpu_ticks "$d")
    nsx "$c" python3 -c "
import socket, struct, time
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
for seq in range(5):
    for i in range($PINGS):
        h = struct.pack('!BBHHH', 8, 0, 0, i + 1, seq) + b'vsbnd-payload-16'
        s.sendto(h[:2] + struct.pack('!H', csum(h)) + h[4:], ('10.233.$n.2', 0))
    time.sleep(0.5)
time.sleep(1)
"
    t1=$(cpu_ticks "$d")
    hz=$(getconf CLK_TCK)
    {
        echo -e "$b\tbase_rss_mib\t$(echo "$r0" | awk '{printf "%.1f", $1 / 1024}')"
        echo -e "$b\theld_peak_mib\t$(awk -v a="$r_held" -v z="$r0" 'BEGIN {printf "%.1f", (a - z) / 1024}')"
        echo -e "$b\theld_after_mib\t$(awk -v a="$r_held_after" -v z="$r0" 'BEGIN {printf "%.1f", (a - z) / 1024}')"
        echo -e "$b\tstuffed_peak_mib\t$(awk -v a="$r_stuffed" -v z="$r0" 'BEGIN {printf "%.1f", (a - z) / 1024}')"
        echo -e "$b\tstuffed_after_mib\t$(awk -v a="$r_stuffed_after" -v z="$r0" 'BEGIN {printf "%.1f", (a - z) / 1024}')"
        echo -e "$b\tping_cpu_s\t$(awk -v d=$((t1 - t0)) -v hz="$hz" 'BEGIN {printf "%.2f", d / hz}')"
    } >>"$RES"
    kill "$d" 2>/dev/null || true
    wait "$d" 2>/dev/null || true
done

python3 - "$RES" "$BASE" "$NEW" "$CONNS" "$ROUNDS" "$STUFFED" "$PINGS" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
d = {(b, m): float(v) for b, m, v in rows}
conns, rounds, stuffed, pings = sys.argv[4:8]
print(f"base: {sys.argv[2]}  \nnew: {sys.argv[3]}\n")
print("| what | base | new | new / base |")
print("|---|---|---|---|")
labels = [
    ("base_rss_mib", "daemon RSS at start, MiB"),
    ("held_peak_mib", f"{rounds} x {conns} half-open connections: RSS growth at the peak, MiB"),
    ("held_after_mib", "... once they are gone, MiB"),
    ("stuffed_peak_mib", f"{stuffed} connections sent 1 MiB each, unread: RSS growth, MiB"),
    ("stuffed_after_mib", "... once closed, MiB"),
    ("ping_cpu_s", f"{pings} ping flows x 5 requests (raw socket): daemon CPU, s"),
]
for m, label in labels:
    b, n = d.get(("base", m)), d.get(("new", m))
    ratio = f"{n / b:.2f}x" if b and n is not None and b > 0.05 else "-"
    fmt = lambda x: "-" if x is None else f"{x:.1f}" if "mib" in m else f"{x:.2f}"
    print(f"| {label} | {fmt(b)} | {fmt(n)} | {ratio} |")
PY
