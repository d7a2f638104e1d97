#!/usr/bin/env bash
# Does reading the counters slow the datapath? Two containers on one network move UDP 64 B
# (iperf3, packets received per second) and TCP (1 stream) while a scraper reads GET /metrics
# ten times a second (150 times Prometheus's default rate; one curl every 100 ms over the
# control socket), and without it, in interleaved repeats on one daemon. Prints medians, the
# ratio, and the scrape rate reached. (Scraping flat out measures the scraper's own CPU on a
# small machine, not the datapath's.)
#
#   sudo benches/metrics.sh [-r REPEATS] [-t SECONDS]
#
# Everything stays in namespaces named vsmet-<pid>-*, removed at the end.
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
bench_scratch vsmet

ip netns add "${P}d"; ip netns add "${P}a"; ip netns add "${P}b"
ip -n "${P}d" link set lo up
ip netns exec "${P}d" "$BIN" --socket "$TMP/s.sock" daemon --state-dir "$TMP/state" >"$TMP/log" 2>&1 &
for _ in $(seq 100); do [ -S "$TMP/s.sock" ] && break; sleep 0.05; done
V="$BIN --socket $TMP/s.sock"
$V network create --subnet 10.88.0.0/24 bench >/dev/null
$V attach --network bench --ip 10.88.0.2 "${P}a" >/dev/null
$V attach --network bench --ip 10.88.0.3 "${P}b" >/dev/null
ip netns exec "${P}a" ping -c1 -W2 10.88.0.3 >/dev/null

udp() {
    ip netns exec "${P}b" iperf3 -s -1 -D -p 5302 >/dev/null
    sleep 0.3
    ip netns exec "${P}a" iperf3 -c 10.88.0.3 -p 5302 -u -l 64 -b 0 -t "$DUR" -J |
        python3 -c 'import json,sys; e=json.load(sys.stdin)["end"]["sum"]; print(int((e["packets"]-e["lost_packets"])/e["seconds"]))'
}
tcp() {
    ip netns exec "${P}b" iperf3 -s -1 -D -p 5301 >/dev/null
    sleep 0.3
    ip netns exec "${P}a" iperf3 -c 10.88.0.3 -p 5301 -t "$DUR" -J |
        python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
}
# Scrapes every 100 ms until killed; counts them in $TMP/scrapes.
scraper() {
    local n=0
    while true; do
        curl -s --unix-socket "$TMP/s.sock" http://d/metrics >/dev/null && n=$((n + 1))
        echo "$n" >"$TMP/scrapes"
        sleep 0.1
    done
}

declare -A RES
for r in $(seq "$REPS"); do
    for mode in quiet scraped; do
        pid=""
        if [ "$mode" = scraped ]; then
            scraper & pid=$!
        fi
        t0=$(date +%s.%N)
        RES[$mode,udp,$r]=$(udp)
        RES[$mode,tcp,$r]=$(tcp)
        t1=$(date +%s.%N)
        if [ -n "$pid" ]; then
            kill "$pid"; wait "$pid" 2>/dev/null || true
            RES[rate,$r]=$(python3 -c "print(int($(cat "$TMP/scrapes") / ($t1 - $t0)))")
        fi
        echo "repeat $r $mode: udp64 ${RES[$mode,udp,$r]} pps, tcp ${RES[$mode,tcp,$r]} Gbit/s" >&2
    done
done

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.2f\n", (a[NR/2]+a[NR/2+1])/2}'; }
echo "| metrics, $REPS repeats x ${DUR}s | no scraper | scraped | scraped / none |"
echo "|---|---|---|---|"
for m in udp tcp; do
    q=$(for r in $(seq "$REPS"); do echo "${RES[quiet,$m,$r]}"; done | median)
    s=$(for r in $(seq "$REPS"); do echo "${RES[scraped,$m,$r]}"; done | median)
    ratio=$(for r in $(seq "$REPS"); do python3 -c "print(${RES[scraped,$m,$r]} / ${RES[quiet,$m,$r]})"; done | median)
    case $m in udp) label="UDP 64 B (packets/s)" ;; tcp) label="TCP 1 stream (Gbit/s)" ;; esac
    printf '| %s | %s | %s | %.2fx |\n' "$label" "$q" "$s" "$ratio"
done
rate=$(for r in $(seq "$REPS"); do echo "${RES[rate,$r]}"; done | median)
echo "| scrapes/s reached | | $rate | |"
