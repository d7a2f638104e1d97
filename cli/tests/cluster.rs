//! Several hosts on one machine: namespaces h1 and h2, each with its own daemon, joined by an
//! underlay bridge, with etcd (Debian's etcd-server) in a namespace of its own on the
//! underlay. Overlay networks created on one host appear on the other, containers reach and
//! resolve each other across hosts, addresses are never given twice, a host that dies leaves
//! the others' DNS when its lease ends, and an etcd outage stops changes but not traffic.

use std::process::Command;

use vswitch_tests::{
    Daemon, Netns, NsDaemon, TempDir, kernel_vtep, require_root, run, secs, text, wait_until,
};

const ETCD: &str = "10.99.99.100";

/// The underlay: a bridge in its own namespace, and a veth from it into each host.
struct Underlay {
    ns: Netns,
    n: u32,
}

impl Underlay {
    fn new() -> Self {
        let ns = Netns::new("u");
        sh(&["ip", "-n", &ns.name, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &ns.name, "link", "set", "br0", "up"]);
        Self { ns, n: 0 }
    }

    /// Links namespace `host` to the underlay with address `ip`/24 on its `u0`.
    fn link(&mut self, host: &str, ip: &str) {
        self.n += 1;
        let port = format!("p{}", self.n);
        sh(&[
            "ip",
            "-n",
            &self.ns.name,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "u0",
            "netns",
            host,
        ]);
        sh(&[
            "ip",
            "-n",
            &self.ns.name,
            "link",
            "set",
            &port,
            "master",
            "br0",
            "up",
        ]);
        sh(&[
            "ip",
            "-n",
            host,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "u0",
        ]);
        sh(&["ip", "-n", host, "link", "set", "u0", "up"]);
        sh(&["ip", "-n", host, "link", "set", "lo", "up"]);
    }
}

fn sh(args: &[&str]) {
    let out = run(Command::new(args[0]).args(&args[1..]), secs(10));
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
}

/// etcd in namespace `ns`, its data in `dir`.
fn etcd(ns: &str, dir: &std::path::Path) -> NsDaemon {
    let data = dir.join("etcd");
    let url = format!("http://{ETCD}:2379");
    let e = NsDaemon::spawn(
        ns,
        &[
            "etcd",
            "--name",
            "e",
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "e=http://127.0.0.1:2380",
        ],
    );
    let up = wait_until(secs(20), || vswitch_tests::tcp_open(ns, ETCD, 2379));
    assert!(up, "etcd did not start");
    e
}

fn host(node: &str, ip: &str) -> Daemon {
    Daemon::start_with(&[
        "--cluster-store",
        &format!("etcd://{ETCD}:2379"),
        "--advertise-addr",
        ip,
        "--node-name",
        node,
        "--cluster-ttl",
        "3",
    ])
}

fn joined(d: &Daemon, times: usize) -> bool {
    wait_until(secs(20), || {
        d.log().matches("joined the cluster store").count() >= times
    })
}

/// What `getent ahosts NAME` says inside `ns`: every address (empty if it does not resolve).
fn resolve(ns: &Netns, name: &str) -> String {
    text(&ns.exec(&["getent", "ahosts", name], secs(10)).stdout)
}

#[test]
#[ignore = "needs root (network namespaces, TAP devices) and etcd-server; run by scripts/test.sh as root"]
fn hosts_share_an_overlay_network_through_etcd() {
    require_root();
    let dir = TempDir(std::env::temp_dir().join(vswitch_tests::unique("-cluster")));
    std::fs::create_dir_all(&dir.0).expect("dir");
    let mut under = Underlay::new();
    let e_ns = Netns::new("etcd");
    under.link(&e_ns.name, ETCD);
    let mut store = Some(etcd(&e_ns.name, &dir.0));
    let h1 = host("h1", "10.99.99.1");
    under.link(&h1.ns.name, "10.99.99.1");
    let mut h2 = host("h2", "10.99.99.2");
    under.link(&h2.ns.name, "10.99.99.2");
    let h3 = host("h3", "10.99.99.3");
    under.link(&h3.ns.name, "10.99.99.3");
    assert!(
        joined(&h1, 1) && joined(&h2, 1) && joined(&h3, 1),
        "{}\n{}",
        h1.log(),
        h2.log()
    );

    // A network made on h1 appears on h2, with its VNI.
    h1.ok(&[
        "network",
        "create",
        "-d",
        "overlay",
        "--subnet",
        "10.66.0.0/24",
        "--ipv6",
        "--subnet",
        "fd66::/64",
        "ov",
    ]);
    assert!(wait_until(secs(10), || h2
        .ok(&["network", "ls"])
        .contains("ov")));
    let vni = |d: &Daemon| {
        d.inspect("ov")["Options"]["com.docker.network.driver.overlay.vxlanid_list"].clone()
    };
    assert_eq!(vni(&h1), vni(&h2));
    assert_eq!(h2.inspect("ov")["Id"], h1.inspect("ov")["Id"]);

    // Containers on both reach and resolve each other: A and PTR, ping both ways.
    let c1 = Netns::new("c1");
    let c2 = Netns::new("c2");
    h1.ok(&["attach", "--network", "ov", "--name", "c1", &c1.name]);
    h2.ok(&["attach", "--network", "ov", "--name", "c2", &c2.name]);
    let (ip1, ip2) = (h1.ip_of("ov", "c1"), h2.ip_of("ov", "c2"));
    assert_ne!(ip1, ip2);
    assert!(wait_until(secs(10), || resolve(&c1, "c2").contains(&ip2)));
    assert!(resolve(&c2, "c1").contains(&ip1));
    assert!(c1.ping_within("c2", secs(10)), "{}", h1.log());
    assert!(c2.ping_within("c1", secs(10)));
    let ptr = c1.dig(&["@10.66.0.1", "+short", "-x", &ip2]);
    assert!(ptr.contains("c2"), "{ptr}");
    let aaaa = c1.dig(&["@10.66.0.1", "+short", "AAAA", "c2"]);
    assert!(aaaa.trim().starts_with("fd66::"), "{aaaa}");
    assert!(c1.ping_within(aaaa.trim(), secs(10)), "IPv6 across hosts");

    // Data crosses intact (TCP, full-size frames both ways).
    let www = dir.0.join("www");
    std::fs::create_dir_all(&www).expect("www");
    let big: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(www.join("big"), &big).expect("big");
    let _served = vswitch_tests::HttpServer::start(&c2.name, 8080, &www);
    let fetch = format!(
        "curl -sS --max-time 30 http://{ip2}:8080/big | cmp - {}",
        www.join("big").display()
    );
    let out = run(
        Command::new("ip").args(["netns", "exec", &c1.name, "sh", "-c", &fetch]),
        secs(40),
    );
    assert!(out.status.success(), "data changed: {}", text(&out.stdout));
    // It came in runs: the sender's TSO frames leave in one UDP_SEGMENT send, arrive in one
    // GRO read, and reach the container as one merged frame, not one frame per packet.
    let s = h1.stats("ov");
    let packets = s["Tunnel"]["RxPackets"].as_u64().unwrap_or(0);
    let frames = s["Ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["Endpoint"] == "(tunnel)"))
        .and_then(|p| p["RxFrames"].as_u64())
        .unwrap_or(u64::MAX);
    assert!(
        packets > 1000 && frames < packets / 2,
        "{packets} VXLAN packets became {frames} frames"
    );

    // A kernel VTEP on the underlay, registered once as a peer: every host replicates to it,
    // and its container reaches containers on both hosts.
    let vt = Netns::new("vt");
    under.link(&vt.name, "10.99.99.50");
    let vni_n: u32 = vni(&h1).as_str().and_then(|v| v.parse().ok()).expect("vni");
    let kc = kernel_vtep(
        &vt.name,
        vni_n,
        "10.99.99.50",
        &["10.99.99.1", "10.99.99.2"],
        "10.66.0.200",
    );
    h1.ok(&["network", "peer", "add", "ov", "10.99.99.50"]);
    assert!(wait_until(
        secs(10),
        || h2.inspect("ov")["Options"]["vswitch.overlay.peers"] == "10.99.99.50"
    ));
    assert!(kc.ping_within(&ip1, secs(10)), "kernel VTEP -> h1");
    assert!(kc.ping_within(&ip2, secs(10)), "kernel VTEP -> h2");
    assert!(c2.ping_within("10.66.0.200", secs(10)), "h2 -> kernel VTEP");

    // A container moves from h2 to h3 with its MAC and address: the others follow.
    let mac2 = h2.inspect("ov")["Containers"]
        .as_object()
        .expect("containers")
        .values()
        .find(|c| c["Name"] == "c2")
        .and_then(|c| c["MacAddress"].as_str())
        .expect("c2's MAC")
        .to_owned();
    h2.ok(&["detach", "c2"]);
    let c2b = Netns::new("c2b");
    let moved = wait_until(secs(10), || {
        h3.vs(&[
            "attach",
            "--network",
            "ov",
            "--name",
            "c2",
            "--ip",
            &ip2,
            "--mac",
            &mac2,
            &c2b.name,
        ])
        .status
        .success()
    });
    assert!(moved, "{}", h3.log());
    assert!(c1.ping_within(&ip2, secs(10)), "c2 lost after its move");
    assert!(wait_until(secs(10), || resolve(&c1, "c2").contains(&ip2)));
    h3.ok(&["detach", "c2"]);
    let back = wait_until(secs(10), || {
        h2.vs(&[
            "attach",
            "--network",
            "ov",
            "--name",
            "c2",
            "--ip",
            &ip2,
            &c2.name,
        ])
        .status
        .success()
    });
    assert!(
        back && c1.ping_within(&ip2, secs(10)),
        "c2 lost after moving back"
    );

    // Addresses are unique when both hosts attach at once.
    let spawn = |d: &Daemon, tag: &str| {
        let socket = d.socket.clone();
        let tag = tag.to_owned();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for i in 0..50 {
                let ns = Netns::new(&format!("{tag}{i}"));
                let out = run(
                    Command::new(vswitch_tests::vswitch_bin())
                        .arg("--socket")
                        .arg(&socket)
                        .args([
                            "attach",
                            "--network",
                            "ov",
                            "--name",
                            &format!("{tag}{i}"),
                            &ns.name,
                        ]),
                    secs(30),
                );
                assert!(out.status.success(), "{}", text(&out.stderr));
                held.push(ns);
            }
            held
        })
    };
    let (a, b) = (spawn(&h1, "a"), spawn(&h2, "b"));
    let (_a, _b) = (
        a.join().expect("h1 attaches"),
        b.join().expect("h2 attaches"),
    );
    let addrs = |d: &Daemon| -> Vec<String> {
        d.inspect("ov")["Containers"]
            .as_object()
            .expect("containers")
            .values()
            .map(|c| c["IPv4Address"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let mut all = addrs(&h1);
    all.extend(addrs(&h2));
    let count = all.len();
    all.sort();
    all.dedup();
    assert_eq!(
        (all.len(), count),
        (102, 102),
        "an address given twice: {all:?}"
    );

    // etcd down: traffic between known endpoints flows, changes fail with one line.
    store.take();
    assert!(c1.ping_within("c2", secs(5)), "traffic stopped with etcd");
    let c3 = Netns::new("c3");
    let e = h2.fails(&["attach", "--network", "ov", "--name", "c3", &c3.name]);
    assert!(e.contains("cluster store is unreachable"), "{e}");
    // A restart meanwhile keeps what h2 knew of the other hosts (its last view of the store,
    // in its state directory): h1's containers still resolve and answer.
    h2.kill9_and_restart_after(|| {});
    assert!(
        wait_until(secs(10), || resolve(&c2, "c1").contains(&ip1)),
        "h2 forgot h1 on a restart without etcd: {}",
        h2.log()
    );
    assert!(c2.ping_within("c1", secs(10)), "{}", h2.log());
    // etcd back: the hosts catch up, and a new endpoint on h2 resolves from h1.
    store = Some(etcd(&e_ns.name, &dir.0));
    assert!(joined(&h2, 2), "{}", h2.log());
    assert!(wait_until(secs(20), || h2
        .vs(&["attach", "--network", "ov", "--name", "c3", &c3.name])
        .status
        .success()));
    let ip3 = h2.ip_of("ov", "c3");
    assert!(wait_until(secs(20), || resolve(&c1, "c3").contains(&ip3)));
    // The claims moved to h2's new lease: once the old one would have lapsed, c2's address
    // is still h2's.
    std::thread::sleep(std::time::Duration::from_secs(4));
    let c5 = Netns::new("c5");
    let e = h1.fails(&[
        "attach",
        "--network",
        "ov",
        "--name",
        "c5",
        "--ip",
        &ip2,
        &c5.name,
    ]);
    assert!(
        e.contains("taken by another host") || e.contains("already in use"),
        "{e}"
    );
    assert!(
        !resolve(&c1, "c2").is_empty(),
        "c2 vanished after etcd's restart"
    );

    // A network cannot go while another host has endpoints on it.
    h1.ok(&["detach", "c1"]);
    for i in 0..50 {
        h1.ok(&["detach", &format!("a{i}")]);
    }
    let e = h1.fails(&["network", "rm", "ov"]);
    assert!(e.contains("endpoints on host h2"), "{e}");

    // h2 dies: once its lease ends, h1 no longer knows its endpoints.
    let c4 = Netns::new("c4");
    h1.ok(&["attach", "--network", "ov", "--name", "c4", &c4.name]);
    assert!(wait_until(secs(10), || !resolve(&c4, "c2").is_empty()));
    h2.kill9_and_restart_after(|| {
        assert!(
            wait_until(secs(15), || resolve(&c4, "c2").is_empty()),
            "h2's endpoints outlived its lease"
        );
    });
    // (h2 is back and publishes its endpoints again: they resolve once more.)
    assert!(
        wait_until(secs(20), || !resolve(&c4, "c2").is_empty()),
        "{}",
        h2.log()
    );
    drop(store);
    drop(h1);
}
