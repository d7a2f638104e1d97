//! Overlay networks on one host, against the kernel's own VXLAN: a namespace on the underlay
//! holds a Linux `vxlan` device with the network's VNI on a bridge with a veth "container",
//! registered with `vswitch network peer add`. Frames cross both ways (ARP, ping, TCP with
//! data checked); packets from strangers or for other VNIs are dropped and counted.

use std::process::Command;

use vswitch_tests::{
    Daemon, HttpServer, Netns, NsDaemon, Outside, kernel_vtep, require_root, run, secs, text,
    wait_until,
};

/// Sends one UDP datagram with `payload` from `src` (an address of namespace `ns`) to the
/// daemon's VXLAN port.
fn send_udp(ns: &str, src: &str, payload: &[u8]) {
    let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
    let script = format!(
        "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
         s.bind(('{src}', 0)); s.sendto(bytes.fromhex('{hex}'), ('192.0.2.1', 4789))"
    );
    let out = run(
        Command::new("ip").args(["netns", "exec", ns, "python3", "-c", &script]),
        secs(10),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// A VXLAN packet for `vni` carrying a broadcast ARP-ish frame from `src`.
fn vxlan_packet(vni: u32, src: [u8; 6]) -> Vec<u8> {
    let mut p = vswitch_switch::vxlan::header(vni).to_vec();
    p.extend_from_slice(&[0xff; 6]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&[0x08, 0x06]);
    p.extend_from_slice(&[0; 28]);
    p
}

fn tunnel(d: &Daemon, network: &str) -> serde_json::Value {
    d.stats(network)["Tunnel"].clone()
}

/// `sha256sum` of what curl fetched inside `ns`.
fn fetched_sum(ns: &str, url: &str) -> String {
    let out = run(
        Command::new("ip").args([
            "netns",
            "exec",
            ns,
            "sh",
            "-c",
            &format!("curl -sS --max-time 30 {url} | sha256sum"),
        ]),
        secs(40),
    );
    text(&out.stdout)
}

#[test]
#[ignore = "needs root (network namespaces, TAP devices, a kernel vxlan device); run by scripts/test.sh as root"]
fn an_overlay_network_exchanges_frames_with_a_kernel_vtep() {
    require_root();
    let mut d = Daemon::start_with(&["--advertise-addr", "192.0.2.1"]);
    let underlay = Outside::new(&d);
    d.ok(&[
        "network",
        "create",
        "-d",
        "overlay",
        "--subnet",
        "10.55.0.0/24",
        "ov",
    ]);
    let net = d.inspect("ov");
    assert_eq!(net["Driver"], "overlay");
    assert_eq!(net["Scope"], "global");
    let vni: u32 = net["Options"]["com.docker.network.driver.overlay.vxlanid_list"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("a VNI");
    assert_eq!(
        net["Options"]["com.docker.network.driver.mtu"], "1450",
        "the underlay's MTU less VXLAN's 50 bytes"
    );
    let kc = kernel_vtep(
        &underlay.ns.name,
        vni,
        "192.0.2.2",
        &["192.0.2.1"],
        "10.55.0.50",
    );
    d.ok(&["network", "peer", "add", "ov", "192.0.2.2"]);
    let c1 = Netns::new("c1");
    d.ok(&["attach", "--network", "ov", "--name", "c1", &c1.name]);
    let c1_ip = d.ip_of("ov", "c1");

    // ARP (broadcast) and ping cross, both ways.
    assert!(c1.ping_within("10.55.0.50", secs(10)), "{}", d.log());
    assert!(kc.ping_within(&c1_ip, secs(10)));

    // TCP moves data intact both ways (the kernel side sends TSO super-packets over veth,
    // and partial checksums; vswitch's side sends plain frames).
    let www = d.dir.join("www");
    std::fs::create_dir_all(&www).expect("www");
    let big: Vec<u8> = (0..4_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(www.join("big"), &big).expect("big");
    let want = text(&run(Command::new("sha256sum").arg(www.join("big")), secs(10)).stdout);
    let want = want.split_whitespace().next().expect("sum").to_owned();
    let _in_c1 = HttpServer::start(&c1.name, 8080, &www);
    let _in_kc = HttpServer::start(&kc.name, 8081, &www);
    let got = fetched_sum(&kc.name, &format!("http://{c1_ip}:8080/big"));
    assert!(got.starts_with(&want), "vswitch -> kernel: {got}");
    let got = fetched_sum(&c1.name, "http://10.55.0.50:8081/big");
    assert!(got.starts_with(&want), "kernel -> vswitch: {got}");

    // A stranger on the underlay, and a packet for a VNI no network has: dropped, counted.
    let before = tunnel(&d, "ov");
    let ip = |args: &[&str]| {
        let out = run(Command::new("ip").args(args), secs(10));
        assert!(out.status.success(), "{args:?}");
    };
    ip(&[
        "-n",
        &underlay.ns.name,
        "addr",
        "add",
        "192.0.2.3/24",
        "dev",
        "vin",
    ]);
    send_udp(
        &underlay.ns.name,
        "192.0.2.3",
        &vxlan_packet(vni, [2, 9, 9, 9, 9, 9]),
    );
    send_udp(
        &underlay.ns.name,
        "192.0.2.2",
        &vxlan_packet(vni + 1000, [2, 9, 9, 9, 9, 9]),
    );
    send_udp(&underlay.ns.name, "192.0.2.2", b"not vxlan");
    let counted = wait_until(secs(5), || {
        let t = tunnel(&d, "ov");
        t["RxNotMember"].as_u64() > before["RxNotMember"].as_u64()
            && t["DaemonUnknownVni"].as_u64() > before["DaemonUnknownVni"].as_u64()
            && t["DaemonNotVxlan"].as_u64() > before["DaemonNotVxlan"].as_u64()
    });
    assert!(counted, "{}", tunnel(&d, "ov"));
    let fdb = d.ok(&["fdb", "ov"]);
    assert!(
        !fdb.contains("02:09:09:09:09:09"),
        "a stranger's MAC was learned: {fdb}"
    );

    // The peers survive a restart of the daemon.
    d.kill9_and_restart();
    assert!(c1.ping_within("10.55.0.50", secs(10)), "after a restart");

    // With the VXLAN port taken while it was down, the daemon still starts: the overlay runs
    // without its tunnel (logged), everything else as before.
    let mut holder = None;
    let host = d.ns.name.clone();
    d.kill9_and_restart_after(|| {
        let h = NsDaemon::spawn(
            &host,
            &[
                "python3",
                "-c",
                "import socket,time; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
                 s.bind(('192.0.2.1', 4789)); time.sleep(600)",
            ],
        );
        let bound = wait_until(secs(10), || {
            let out = run(
                Command::new("ip").args(["netns", "exec", &host, "ss", "-Huln", "sport = :4789"]),
                secs(5),
            );
            out.stdout.len() > 1
        });
        assert!(bound);
        holder = Some(h);
    });
    assert!(d.log().contains("runs without its tunnel"), "{}", d.log());
    assert!(d.ok(&["network", "ls"]).contains("ov"));
    assert!(
        !c1.ping_within("10.55.0.50", secs(2)),
        "no tunnel, no crossing"
    );
    drop(holder);
    d.kill9_and_restart();
    assert!(c1.ping_within("10.55.0.50", secs(10)), "tunnel back");

    // Without the peer, nothing crosses.
    d.ok(&["network", "peer", "rm", "ov", "192.0.2.2"]);
    assert!(!c1.ping_within("10.55.0.50", secs(2)));
    assert!(
        !d.inspect("ov")["Options"]
            .as_object()
            .expect("options")
            .contains_key("vswitch.overlay.peers")
    );

    // Bad requests: one line each.
    for (args, says) in [
        (
            vec!["network", "peer", "add", "bridge", "192.0.2.2"],
            "not an overlay",
        ),
        (
            vec!["network", "peer", "add", "ov", "224.0.0.1"],
            "cannot be a VXLAN peer",
        ),
        (
            vec!["network", "create", "-d", "macvlan", "x"],
            "unknown driver",
        ),
    ] {
        let e = d.fails(&args);
        assert!(e.contains(says), "{args:?}: {e}");
    }
}
