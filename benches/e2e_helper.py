"""Helpers for benches/e2e.sh: a connect-rate client and server, parsers that turn tool output
into `metric value` lines, and the final markdown table. Standard library only."""

import collections
import json
import re
import socket
import statistics
import sys
import time


def crr_server(port, seconds):
    """Accepts, echoes one byte, closes: one connection per request."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(4096)
    srv.settimeout(0.5)
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            continue
        with conn:
            try:
                conn.settimeout(2)
                byte = conn.recv(1)
                if byte:
                    conn.sendall(byte)
            except OSError:
                pass


def crr_client(host, port, seconds):
    """Connect, send a byte, read it back, close, for `seconds`: prints connections/s."""
    done, failed = 0, 0
    deadline = time.time() + seconds
    started = time.perf_counter()
    while time.time() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2) as c:
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                c.sendall(b"x")
                if c.recv(1) == b"x":
                    done += 1
                else:
                    failed += 1
        except OSError:
            failed += 1
            time.sleep(0.01)
    elapsed = time.perf_counter() - started
    print("cps", round(done / elapsed))
    print("crr_failed", failed)


def iperf(path, kind):
    data = json.load(open(path))
    if data.get("error"):
        return
    end = data["end"]
    if kind == "udp":
        rx = end["sum_received"]
        print("udp64_rx_pps", round(rx["bytes"] / 64 / (rx["seconds"] or 1e-9)))
    else:
        print(kind, round(end["sum_received"]["bits_per_second"] / 1e9, 3))


def ping(path):
    m = re.search(r"= [0-9.]+/([0-9.]+)/[0-9.]+/[0-9.]+ ms", open(path).read())
    if m:
        print("ping_avg_ms", m.group(1))


def sockperf(path):
    m = re.search(r"avg-rtt=([0-9.]+)", open(path, errors="replace").read())
    if m:
        print("rr_avg_us", m.group(1))


# metric -> (label, higher is better)
METRICS = collections.OrderedDict([
    ("tcp1_gbps", ("TCP, 1 stream (Gbit/s)", True)),
    ("tcp4_gbps", ("TCP, 4 streams (Gbit/s)", True)),
    ("udp64_rx_pps", ("UDP 64 B received (packets/s)", True)),
    ("ping_avg_ms", ("ping average (ms)", False)),
    ("rr_avg_us", ("TCP request/response RTT, sockperf (us)", False)),
    ("cps", ("TCP connects/s", True)),
])


def summary(path, cases, extra=None):
    """Medians per case and the median of per-repeat ratios to the kernel bridge; `extra`
    ("vswitch/tapfwd") adds one more ratio column."""
    cases = cases.split(",")
    data = collections.defaultdict(lambda: collections.defaultdict(dict))
    for line in open(path):
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 4:
            continue
        case, rep, metric, value = parts
        try:
            data[metric][case][rep] = float(value)
        except ValueError:
            pass

    def fmt(x):
        return "%.0f" % x if x >= 1000 else "%.2f" % x if x >= 1 else "%.3f" % x

    shown = [c for c in cases if any(c in data[m] for m in METRICS)]
    pair = extra.split("/") if extra else None
    if pair and not all(c in shown for c in pair):
        pair = None
    head = "| metric | " + " | ".join(shown) + " | " + " | ".join(
        "%s / bridge" % c for c in shown if c != "bridge") + (
        " | %s / %s" % tuple(pair) if pair else "") + " |"
    print(head)
    print("|" + "---|" * (1 + len(shown) + len([c for c in shown if c != "bridge"])
                         + (1 if pair else 0)))
    for metric, (label, _) in METRICS.items():
        row = data.get(metric, {})
        cells, ratios = [], []
        for c in shown:
            vals = list(row.get(c, {}).values())
            cells.append(fmt(statistics.median(vals)) if vals else "-")
        ref = row.get("bridge", {})
        for c in shown:
            if c == "bridge":
                continue
            reps = row.get(c, {})
            rs = [reps[r] / ref[r] for r in reps if ref.get(r)]
            ratios.append("%.2fx" % statistics.median(rs) if rs else "-")
        if pair:
            num, den = row.get(pair[0], {}), row.get(pair[1], {})
            rs = [num[r] / den[r] for r in num if den.get(r)]
            ratios.append("%.2fx" % statistics.median(rs) if rs else "-")
        print("| %s | %s | %s |" % (label, " | ".join(cells), " | ".join(ratios)))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "crr-server":
        crr_server(int(args[0]), float(args[1]))
    elif cmd == "crr-client":
        crr_client(args[0], int(args[1]), float(args[2]))
    elif cmd == "iperf":
        iperf(args[0], args[1])
    elif cmd == "ping":
        ping(args[0])
    elif cmd == "sockperf":
        sockperf(args[0])
    elif cmd == "summary":
        summary(args[0], args[1], args[2] if len(args) > 2 else None)


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, KeyError) as e:
        # A parser that fails prints nothing: the script records no value, never a wrong one.
        print("e2e_helper: %s" % e, file=sys.stderr)
