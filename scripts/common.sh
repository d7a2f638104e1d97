# Shared by scripts/*.sh: install the Debian packages vswitch's tests and demo use, and find cargo.

# Packages: iproute2 (ip netns), iputils-ping, dnsutils (dig, delv), dnsmasq-base (a DNS upstream in
# tests), ldnsutils (a signed zone and a fake authoritative server for the DNSSEC test), curl,
# python3, iperf3, procps, util-linux (unshare, nsenter, setpriv), uidmap (newuidmap for
# rootless containers), nftables (an outside that drops SYNs, in a test namespace), podman,
# runc, containernetworking-plugins and busybox-static (vswitch as a CNI plugin of real podman),
# docker.io (vswitch as dockerd's network driver; the tests start their own dockerd),
# protobuf-compiler (the etcd client crate runs protoc when it builds) and etcd-server (the
# cluster store of overlay networks; the tests start their own etcd), prometheus (its promtool
# checks the daemon's /metrics; the test runs its own scraper).
VSWITCH_PACKAGES="iproute2 iputils-ping dnsutils dnsmasq-base ldnsutils curl python3 iperf3 procps util-linux uidmap nftables podman runc containernetworking-plugins busybox-static docker.io protobuf-compiler etcd-server prometheus"

install_packages() {
    local missing=() p
    for p in $VSWITCH_PACKAGES "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
        return 1
    fi
    echo "installing: ${missing[*]}" >&2
    # Installing a package must not start its service on this machine (docker.io and
    # containerd would start daemons that change the firewall): deny starts meanwhile,
    # unless a policy is already in place.
    local policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 0755 "$policy"
    fi
    local rc=0
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
    [ -n "$policy" ] && rm -f "$policy"
    return "$rc"
}

find_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        for d in "$HOME/.cargo/bin" /root/.cargo/bin "${SUDO_USER:+/home/$SUDO_USER/.cargo/bin}"; do
            [ -n "$d" ] && [ -x "$d/cargo" ] && export PATH="$d:$PATH" && break
        done
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo not found: install Rust 1.91 or newer (https://rustup.rs), then run this again" >&2
        return 1
    fi
}

# Kills the processes in, and deletes, every network namespace whose name starts with $1 (and
# the resolv.conf files vswitch wrote for them). Benchmarks call it from their EXIT trap.
# A benchmark's scratch space: namespaces named PREFIX-<pid>-* ($P) and a directory ($TMP),
# both removed at exit together with every process started from that directory.
bench_scratch() { # PREFIX
    P=$1-$$-
    TMP=$(mktemp -d)
    trap 'pkill -f "$TMP/" 2>/dev/null || true; remove_netns_with_prefix "$P"; rm -rf "$TMP"' EXIT
}

remove_netns_with_prefix() {
    local n
    for n in $(ip netns list | awk '{print $1}' | grep "^$1" || true); do
        ip netns pids "$n" 2>/dev/null | xargs -r kill 2>/dev/null || true
        ip netns del "$n" 2>/dev/null || true
        rm -rf "/etc/netns/$n"
    done
}

# Two "container" namespaces ${1}b1 and ${1}b2 on a kernel bridge br0 in ${1}sw, one veth pair
# each, addresses $2.1/24 and $2.2/24: the docker0 model, as ../shared/tools/baseline.sh sets it
# up. Benchmarks compare vswitch with it.
setup_bridge_pair() {
    local p=$1 net=$2 n i
    for n in sw b1 b2; do ip netns add "$p$n"; done
    ip -n "${p}sw" link add br0 type bridge && ip -n "${p}sw" link set br0 up
    for i in 1 2; do
        ip -n "${p}b$i" link add veth0 type veth peer name "p$i" netns "${p}sw"
        ip -n "${p}sw" link set "p$i" master br0 && ip -n "${p}sw" link set "p$i" up
        ip -n "${p}b$i" addr add "$net.$i/24" dev veth0 && ip -n "${p}b$i" link set veth0 up
        ip -n "${p}b$i" link set lo up
    done
}
