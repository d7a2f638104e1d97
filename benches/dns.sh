#!/usr/bin/env bash
# DNS benchmark: vswitch's embedded DNS next to dnsmasq and aardvark-dns (podman's), all serving
# the same 1000 names, driven by dnsperf in one run.
#
#   sudo benches/dns.sh [-r REPEATS] [-d SECONDS]
#
# vswitch: 10 namespaces attached to one network with 100 aliases each (c0001..c1000); dnsperf
# runs in another attached namespace and queries the gateway, so every query crosses the TAP and
# the userspace switch. dnsmasq (hosts file) and aardvark-dns (its config format) listen on the
# dnsperf namespace's own addresses, as ../shared/tools/baseline.sh sets them up. For each:
# saturated (dnsperf's default 100 queries outstanding) for SECONDS, then a fixed 2000 queries/s
# for 5 s (latency at light load). Repeats are interleaved. Prints medians and ratios.
# Nothing leaves the namespaces this script creates (prefix vsdns-); none of the servers has an
# upstream.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
install_packages dnsperf aardvark-dns
find_cargo
[ "$(id -u)" -eq 0 ] || { echo "needs root" >&2; exit 1; }
REPS=3 DUR=10
while getopts "r:d:" o; do case $o in r) REPS=$OPTARG ;; d) DUR=$OPTARG ;; *) exit 2 ;; esac; done

cargo build --release --locked -p vswitch >&2
BIN=$PWD/target/release/vswitch
AARDVARK=/usr/lib/podman/aardvark-dns
P=vsdns-$$-
TMP=$(mktemp -d /tmp/vsdns.XXXXXX)
export VSWITCH_SOCKET=$TMP/vswitch.sock
cleanup() {
    [ -f "$TMP/aard/aardvark.pid" ] && kill "$(cat "$TMP/aard/aardvark.pid")" 2>/dev/null || true
    [ -n "${DPID:-}" ] && kill "$DPID" 2>/dev/null && wait "$DPID" 2>/dev/null || true
    remove_netns_with_prefix "$P"
    rm -rf "$TMP"
}
trap cleanup EXIT
nsx() { local n=$1; shift; ip netns exec "$n" "$@"; }

python3 - "$TMP" <<'PY'
import os, random, sys
run = sys.argv[1]
names = ['c%04d' % i for i in range(1, 1001)]
ip = lambda i: '10.231.%d.%d' % (128 + i // 250, i % 250 + 1)   # data only, never contacted
with open(os.path.join(run, 'hosts'), 'w') as f:
    for i, n in enumerate(names, 1): f.write('%s %s\n' % (ip(i), n))
os.makedirs(os.path.join(run, 'aard'))
with open(os.path.join(run, 'aard', 'vsbnet'), 'w') as f:
    f.write('10.231.5.1\n')
    f.write('%064x 10.231.5.2  vsbclient\n' % 0)
    for i, n in enumerate(names, 1): f.write('%064x %s  %s\n' % (i, ip(i), n))
for k in range(10):
    with open(os.path.join(run, 'aliases%d' % k), 'w') as f:
        f.write(' '.join('--alias %s' % n for n in names[k * 100:(k + 1) * 100]))
random.seed(42)
with open(os.path.join(run, 'queries'), 'w') as f:
    for _ in range(20000): f.write('%s A\n' % random.choice(names))
PY

# --- vswitch: daemon in d; 10 name holders; the client ns q
ip netns add ${P}d
ip netns exec ${P}d "$BIN" daemon --state-dir "$TMP/state" --log-level warn >"$TMP/daemon.log" 2>&1 &
DPID=$!
for _ in $(seq 200); do [ -S "$VSWITCH_SOCKET" ] && break; sleep 0.05; done
"$BIN" network create dnsbench --subnet 10.231.16.0/24 >/dev/null
for k in $(seq 0 9); do
    ip netns add ${P}h$k
    # shellcheck disable=SC2046
    "$BIN" attach --network dnsbench $(cat "$TMP/aliases$k") ${P}h$k >/dev/null
done
ip netns add ${P}q
"$BIN" attach --network dnsbench --name client ${P}q >/dev/null
nsx ${P}q dig +short +time=2 c0042 | grep -q 10.231.16 || { echo "vswitch does not answer" >&2; exit 1; }

# --- dnsmasq and aardvark in the client namespace (loopback addresses of their own)
ip -n ${P}q addr add 10.231.5.1/32 dev lo
ip -n ${P}q addr add 10.231.5.2/32 dev lo
ip netns exec ${P}q dnsmasq -k --conf-file=/dev/null --no-resolv --no-hosts --no-poll \
    --addn-hosts="$TMP/hosts" --listen-address=127.0.0.1 --bind-interfaces --port=15353 \
    --user=root --pid-file="$TMP/dnsmasq.pid" --log-facility=/dev/null >/dev/null 2>&1 &
HAVE_AARD=0
if [ -x "$AARDVARK" ]; then
    nsx ${P}q "$AARDVARK" --config "$TMP/aard" -p 15354 run >"$TMP/aardvark.log" 2>&1 || true
    for _ in $(seq 50); do nsx ${P}q dig +short +time=1 +tries=1 -b 10.231.5.2 @10.231.5.1 -p 15354 c0042 2>/dev/null | grep -q 10.231 && HAVE_AARD=1 && break; sleep 0.1; done
fi
for _ in $(seq 50); do nsx ${P}q dig +short +time=1 +tries=1 @127.0.0.1 -p 15353 c0042 | grep -q 10.231 && break; sleep 0.1; done

RES=$TMP/results.tsv; : >"$RES"
perf() { # case metric dnsperf-args...
    local c=$1 m=$2; shift 2
    nsx ${P}q timeout $((DUR + 30)) dnsperf -d "$TMP/queries" -T 1 -c 1 "$@" >"$TMP/out.txt" 2>&1 || true
    python3 - "$TMP/out.txt" "$c" "$m" >>"$RES" <<'PY'
import re, sys
t = open(sys.argv[1]).read(); c, m = sys.argv[2], sys.argv[3]
q = re.search(r'Queries per second:\s+([0-9.]+)', t)
a = re.search(r'Average Latency \(s\):\s+([0-9.]+)', t)
if q: print(f"{c}\t{m}_qps\t{q.group(1)}")
if a: print(f"{c}\t{m}_avg_us\t{float(a.group(1)) * 1e6}")
PY
}
for rep in $(seq "$REPS"); do
    perf vswitch sat -s 10.231.16.1 -l "$DUR"
    perf dnsmasq sat -s 127.0.0.1 -p 15353 -l "$DUR"
    [ $HAVE_AARD = 1 ] && perf aardvark sat -a 10.231.5.2 -s 10.231.5.1 -p 15354 -l "$DUR"
    perf vswitch 2k -s 10.231.16.1 -l 5 -Q 2000
    perf dnsmasq 2k -s 127.0.0.1 -p 15353 -l 5 -Q 2000
    [ $HAVE_AARD = 1 ] && perf aardvark 2k -a 10.231.5.2 -s 10.231.5.1 -p 15354 -l 5 -Q 2000
    echo "rep $rep done" >&2
done

python3 - "$RES" <<'PY'
import sys, statistics as st
d = {}
for l in open(sys.argv[1]):
    c, m, v = l.rstrip('\n').split('\t'); d.setdefault(m, {}).setdefault(c, []).append(float(v))
med = lambda m, c: st.median(d[m][c]) if c in d.get(m, {}) else None
f = lambda x: '-' if x is None else f'{x:,.0f}' if x > 100 else f'{x:.1f}'
r = lambda a, b: '-' if a is None or b is None or b == 0 else f'{a / b:.2f}x'
print('| metric | vswitch | dnsmasq | aardvark-dns | vswitch/dnsmasq | vswitch/aardvark |')
print('|---|---|---|---|---|---|')
for m in ['sat_qps', 'sat_avg_us', '2k_qps', '2k_avg_us']:
    v, q, a = med(m, 'vswitch'), med(m, 'dnsmasq'), med(m, 'aardvark')
    print(f'| {m} | {f(v)} | {f(q)} | {f(a)} | {r(v, q)} | {r(v, a)} |')
# Repeats are interleaved: the ratio within each, to show its spread.
pairs = zip(d.get('sat_qps', {}).get('vswitch', []), d.get('sat_qps', {}).get('dnsmasq', []))
print('\nsaturated queries/s, vswitch / dnsmasq in each repeat: '
      + ', '.join(f'{a / b:.2f}x' for a, b in pairs if b))
PY
