//! The walking skeleton end to end: daemon, networks, attach in all target forms, L2 switching,
//! gateway, detach, endpoint GC, restart after SIGKILL, bad input.

use std::time::Duration;

use vswitch_tests::{Daemon, Netns, NsProcess, require_root, secs, text, wait_until};

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn two_namespaces_ping_each_other_and_the_gateway() {
    require_root();
    let d = Daemon::start();
    d.ok(&["network", "create", "red", "--subnet", "10.77.0.0/24"]);
    let a = Netns::new("a");
    let b = Netns::new("b");
    d.ok(&["attach", "--network", "red", &a.name]);
    d.ok(&["attach", "--network", "red", &b.name]);
    let ip_b = d.ip_of("red", &b.name);
    assert_eq!(d.ip_of("red", &a.name), "10.77.0.2", "first free address");
    assert_eq!(ip_b, "10.77.0.3");
    assert!(a.ping_within(&ip_b, secs(5)), "a -> b");
    assert!(b.ping("10.77.0.2"), "b -> a");
    assert!(a.ping("10.77.0.1"), "gateway answers ping");

    // Inside: eth0 with the address, a default route via the gateway, lo up, no other device.
    assert_eq!(a.links(), vec!["lo", "eth0"]);
    assert!(
        a.addrs("eth0").contains("inet 10.77.0.2/24"),
        "{}",
        a.addrs("eth0")
    );
    let route = a.exec(&["ip", "route", "show", "default"], secs(5));
    assert!(
        text(&route.stdout).contains("via 10.77.0.1 dev eth0"),
        "{}",
        text(&route.stdout)
    );
    assert!(a.ping("127.0.0.1"), "lo is up");
    // The TAP was opened with a virtio-net header and offloads.
    let flags = a.exec(&["cat", "/sys/class/net/eth0/tun_flags"], secs(5));
    let flags = u32::from_str_radix(text(&flags.stdout).trim().trim_start_matches("0x"), 16)
        .expect("tun_flags");
    assert_eq!(
        flags & 0x4002,
        0x4002,
        "IFF_TAP|IFF_VNET_HDR, got {flags:#x}"
    );

    // Nothing was created in the daemon's namespace: no bridge, veth or stray TAP.
    assert_eq!(d.ns.links(), vec!["lo"], "daemon namespace stays empty");

    // Isolation: a namespace on another network sees none of red's broadcasts. Pinging an
    // absent address makes `a` broadcast ARP requests, which reach b and the gateway only.
    d.ok(&["network", "create", "other", "--subnet", "10.76.0.0/24"]);
    let c = Netns::new("c");
    d.ok(&["attach", "--network", "other", &c.name]);
    assert!(!a.ping("10.77.0.99"));
    let other = d.ok(&["stats", "other"]);
    let c_row = other.lines().find(|l| l.contains(&c.name)).expect("c row");
    let c_tx: u64 = c_row
        .split_whitespace()
        .nth(6)
        .and_then(|v| v.parse().ok())
        .expect("tx");
    assert_eq!(c_tx, 0, "nothing was sent to c: {other}");

    // The FDB learned both endpoints and the gateway; counters moved.
    let fdb = d.ok(&["fdb", "red"]);
    for (mac, who) in [
        ("02:42:0a:4d:00:02", &a.name),
        ("02:42:0a:4d:00:03", &b.name),
    ] {
        assert!(
            fdb.lines()
                .any(|l| l.contains(mac) && l.contains(who.as_str())),
            "{mac} {who} missing from\n{fdb}"
        );
    }
    assert!(
        fdb.contains("02:42:0a:4d:00:01") && fdb.contains("(gateway)"),
        "{fdb}"
    );
    let stats = d.ok(&["stats", "red"]);
    let row = stats
        .lines()
        .find(|l| l.contains(&a.name))
        .unwrap_or_else(|| panic!("no stats row for {}: {stats}", a.name));
    let rx_frames: u64 = row
        .split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .expect("rx");
    assert!(rx_frames >= 3, "{row}");
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn all_three_target_forms_and_static_ip() {
    require_root();
    let d = Daemon::start();
    // ip netns name (default network `bridge`).
    let named = Netns::new("n");
    d.ok(&["attach", &named.name]);
    // netns path.
    let pathy = Netns::new("p");
    d.ok(&[
        "attach",
        "--name",
        "bypath",
        "--ip",
        "172.17.5.5",
        &pathy.path(),
    ]);
    // PID.
    let proc_ns = NsProcess::new();
    d.ok(&["attach", "--name", "bypid", &proc_ns.pid().to_string()]);

    assert_eq!(d.ip_of("bridge", &named.name), "172.17.0.2");
    assert_eq!(d.ip_of("bridge", "bypath"), "172.17.5.5", "static IP");
    assert_eq!(d.ip_of("bridge", "bypid"), "172.17.0.3");
    assert!(named.ping_within("172.17.5.5", secs(5)));
    let ping = proc_ns.exec(&["ping", "-c", "1", "-W", "2", "172.17.0.2"], secs(10));
    assert!(
        ping.status.success(),
        "pid-attached namespace reaches the named one"
    );
    assert!(pathy.ping("172.17.0.1"));

    // The same path given as /proc/PID/ns/net.
    let other = NsProcess::new();
    let path = format!("/proc/{}/ns/net", other.pid());
    d.ok(&["attach", "--name", "procpath", &path]);
    assert_eq!(d.ip_of("bridge", "procpath"), "172.17.0.4");
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn detach_removes_the_device_names_and_address() {
    require_root();
    let d = Daemon::start();
    d.ok(&["network", "create", "blue"]);
    let a = Netns::new("a");
    let b = Netns::new("b");
    d.ok(&["attach", "--network", "blue", &a.name]);
    d.ok(&["attach", "--network", "blue", &b.name]);
    let ip_a = d.ip_of("blue", &a.name);
    assert!(
        ip_a.starts_with("172.18."),
        "automatic /16 from 172.18.0.0: {ip_a}"
    );
    let resolv = std::fs::read_to_string(format!("/etc/netns/{}/resolv.conf", a.name))
        .expect("resolv.conf written for ip netns names");
    assert!(resolv.contains("nameserver 172.18.0.1"), "{resolv}");
    assert!(!resolv.contains("search"), "no search domain: {resolv}");
    assert!(resolv.contains("options ndots:0"), "{resolv}");

    d.ok(&["detach", &a.name]);
    assert_eq!(a.links(), vec!["lo"], "eth0 removed");
    assert!(
        !std::path::Path::new(&format!("/etc/netns/{}/resolv.conf", a.name)).exists(),
        "resolv.conf removed"
    );
    let net = d.inspect("blue");
    assert_eq!(net["Containers"].as_object().map(|c| c.len()), Some(1));
    // The address is free again: the next attach gets it.
    let c = Netns::new("c");
    d.ok(&["attach", "--network", "blue", &c.name]);
    assert_eq!(d.ip_of("blue", &c.name), ip_a);
    assert!(c.ping_within(&d.ip_of("blue", &b.name), secs(5)));

    // network disconnect removes only the endpoint on that network.
    d.ok(&["network", "create", "green"]);
    d.ok(&["network", "connect", "green", &c.name]);
    assert!(
        c.links().contains(&"eth1".to_owned()),
        "second network gets eth1: {:?}",
        c.links()
    );
    d.ok(&["network", "disconnect", "green", &c.name]);
    assert_eq!(c.links(), vec!["lo", "eth0"]);
    assert!(c.ping(&d.ip_of("blue", &b.name)), "still on blue");
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn endpoints_are_collected_when_their_namespace_dies() {
    require_root();
    let d = Daemon::start();
    let tun_fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
            .map(|fds| {
                fds.flatten()
                    .filter(|f| {
                        std::fs::read_link(f.path())
                            .is_ok_and(|l| l == std::path::Path::new("/dev/net/tun"))
                    })
                    .count()
            })
            .unwrap_or(usize::MAX)
    };
    let mut p = NsProcess::new();
    d.ok(&["attach", "--name", "shortlived", &p.pid().to_string()]);
    let gone = Netns::new("g");
    d.ok(&["attach", &gone.name]);
    // A namespace file given as a path, later unmounted without being deleted (no directory
    // event; the periodic check finds it). /run/netns is a shared mount, so the unmount reaches
    // the daemon's mount namespace too.
    let held = Netns::new("h");
    d.ok(&["attach", "--name", "bound", &held.path()]);
    assert_eq!(
        d.inspect("bridge")["Containers"]
            .as_object()
            .map(|c| c.len()),
        Some(3)
    );
    assert_eq!(tun_fds(), 3, "one TAP fd per endpoint");

    p.kill();
    let n = gone.name.clone();
    drop(gone); // ip netns del
    let two_gone = wait_until(secs(3), || {
        d.inspect("bridge")["Containers"]
            .as_object()
            .is_some_and(|c| c.len() == 1)
    });
    assert!(two_gone, "endpoints not collected: {}", d.inspect("bridge"));
    assert!(!std::path::Path::new(&format!("/etc/netns/{n}")).exists());
    let out = vswitch_tests::run(
        std::process::Command::new("umount").arg(held.path()),
        secs(10),
    );
    assert!(out.status.success(), "umount: {}", text(&out.stderr));
    let empty = wait_until(secs(8), || {
        d.inspect("bridge")["Containers"]
            .as_object()
            .is_some_and(|c| c.is_empty())
    });
    assert!(
        empty,
        "bind-mounted endpoint not collected: {}",
        d.inspect("bridge")
    );
    // The daemon let go of the namespaces: no TAP fd is left to keep them alive.
    assert!(
        wait_until(secs(3), || tun_fds() == 0),
        "TAP fds left in the daemon: {}",
        tun_fds()
    );
    // Their addresses are free again.
    let q = Netns::new("q");
    d.ok(&["attach", &q.name]);
    assert_eq!(d.ip_of("bridge", &q.name), "172.17.0.2");
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn traffic_comes_back_after_the_daemon_is_killed_and_restarted() {
    require_root();
    let mut d = Daemon::start();
    d.ok(&["network", "create", "persist", "--subnet", "10.78.0.0/16"]);
    let a = Netns::new("a");
    let b = Netns::new("b");
    d.ok(&["attach", "--network", "persist", "--alias", "web", &a.name]);
    d.ok(&[
        "attach",
        "--network",
        "persist",
        "--ip",
        "10.78.9.9",
        &b.name,
    ]);
    assert!(a.ping_within("10.78.9.9", secs(5)));
    let before = d.inspect("persist");

    d.kill9_and_restart();
    assert!(
        a.ping_within("10.78.9.9", secs(10)),
        "traffic flows again after restart"
    );
    let after = d.inspect("persist");
    assert_eq!(before["Id"], after["Id"]);
    assert_eq!(
        before["Containers"], after["Containers"],
        "same endpoints, addresses, MACs"
    );
    assert!(b.ping("10.78.0.1"), "gateway back too");
    // The log says how far the restart is.
    let log = d.log();
    assert!(log.contains("restoring endpoints"), "{log}");
    assert!(
        log.contains("2 of 2 endpoints restored (0 failed)"),
        "{log}"
    );
    // A network created before the crash still refuses overlaps, and bridge is still there.
    d.fails(&["network", "create", "again", "--subnet", "10.78.0.0/24"]);
    assert!(d.ok(&["network", "ls"]).contains("bridge"));
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn the_first_network_keeps_the_default_route_and_the_next_takes_over() {
    require_root();
    let mut d = Daemon::start();
    d.ok(&[
        "network",
        "create",
        "back",
        "--subnet",
        "10.79.2.0/24",
        "--internal",
    ]);
    d.ok(&["network", "create", "front", "--subnet", "10.79.1.0/24"]);
    d.ok(&["network", "create", "side", "--subnet", "10.79.3.0/24"]);
    let a = Netns::new("a");
    let defaults = || text(&a.exec(&["ip", "route", "show", "default"], secs(5)).stdout);
    // Which way an outside address would go (a lookup: nothing is sent).
    let way_out = || text(&a.exec(&["ip", "route", "get", "192.0.2.1"], secs(5)).stdout);

    // An internal network gives no default route: it could not lead anywhere.
    d.ok(&["attach", "--network", "back", &a.name]);
    assert_eq!(defaults().trim(), "", "internal network: no default route");
    d.ok(&["attach", "--network", "front", &a.name]);
    d.ok(&["attach", "--network", "side", &a.name]);
    // One line per route: "default via GW dev IF proto static metric M".
    let has = |routes: &str, via: &str, dev: &str, metric: u32| {
        routes.lines().any(|l| {
            l.contains(&format!("via {via} dev {dev} "))
                && l.trim_end().ends_with(&format!("metric {metric}"))
        })
    };
    let routes = defaults();
    assert!(has(&routes, "10.79.1.1", "eth1", 100), "{routes}");
    assert!(
        has(&routes, "10.79.3.1", "eth2", 101),
        "a second network adds its route behind the first one: {routes}"
    );
    assert!(
        way_out().contains("via 10.79.1.1 dev eth1"),
        "{}",
        way_out()
    );

    // The first network leaves: the next one's route is the default, with nothing to do.
    d.ok(&["network", "disconnect", "front", &a.name]);
    assert!(
        way_out().contains("via 10.79.3.1 dev eth2"),
        "{}",
        way_out()
    );
    // Joining again never takes the way out from a network that is there already.
    d.ok(&["network", "connect", "front", &a.name]);
    assert!(has(&defaults(), "10.79.1.1", "eth1", 102), "{}", defaults());
    assert!(
        way_out().contains("via 10.79.3.1 dev eth2"),
        "{}",
        way_out()
    );

    // A route we did not make keeps its place: ours go around it.
    d.ok(&["network", "disconnect", "side", &a.name]);
    let foreign = a.exec(
        &[
            "ip", "route", "add", "default", "dev", "lo", "metric", "103",
        ],
        secs(5),
    );
    assert!(foreign.status.success(), "{}", text(&foreign.stderr));
    d.ok(&["network", "connect", "side", &a.name]);
    let routes = defaults();
    assert!(
        routes.contains("default dev lo scope link metric 103"),
        "{routes}"
    );
    assert!(has(&routes, "10.79.3.1", "eth2", 104), "{routes}");
    assert!(
        way_out().contains("via 10.79.1.1 dev eth1"),
        "{}",
        way_out()
    );

    // A restart plumbs everything again with the metrics it had.
    d.kill9_and_restart();
    assert!(
        wait_until(secs(10), || defaults().matches("via").count() == 2),
        "{}",
        defaults()
    );
    let routes = defaults();
    assert!(has(&routes, "10.79.1.1", "eth1", 102), "{routes}");
    assert!(has(&routes, "10.79.3.1", "eth2", 104), "{routes}");
    assert!(
        way_out().contains("via 10.79.1.1 dev eth1"),
        "{}",
        way_out()
    );
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn attach_never_takes_a_device_that_is_not_its_own() {
    require_root();
    let d = Daemon::start();
    d.ok(&["network", "create", "lan", "--subnet", "10.81.0.0/24"]);
    let a = Netns::new("a");
    // eth0 is somebody else's, with the very MAC vswitch derives for 10.81.0.2 (Docker's
    // scheme is the same, so a Docker container's eth0 can look exactly like this).
    let add = a.exec(
        &[
            "ip",
            "link",
            "add",
            "eth0",
            "address",
            "02:42:0a:51:00:02",
            "type",
            "veth",
            "peer",
            "name",
            "vp0",
        ],
        secs(5),
    );
    assert!(add.status.success(), "{}", text(&add.stderr));
    d.ok(&["attach", "--network", "lan", &a.name]);
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(
        sorted(a.links()),
        vec!["eth0", "eth1", "lo", "vp0"],
        "the next free name"
    );
    let kind = a.exec(&["ip", "-d", "link", "show", "eth0"], secs(5));
    assert!(text(&kind.stdout).contains("veth"), "eth0 untouched");
    assert!(
        a.addrs("eth1").contains("inet 10.81.0.2/24"),
        "{}",
        a.addrs("eth1")
    );
    let net = d.inspect("lan");
    let ep = net["Containers"]
        .as_object()
        .and_then(|c| c.values().next())
        .expect("endpoint");
    assert_eq!(ep["MacAddress"], "02:42:0a:51:00:02");
    // A name given with --ifname is taken as given: refused, nothing changed.
    let b = Netns::new("b");
    let add = b.exec(
        &["ip", "tuntap", "add", "dev", "wan0", "mode", "tap"],
        secs(5),
    );
    assert!(add.status.success(), "{}", text(&add.stderr));
    let err = d.fails(&["attach", "--network", "lan", "--ifname", "wan0", &b.name]);
    assert!(err.contains("wan0 already exists"), "{err}");
    assert_eq!(b.links(), vec!["lo", "wan0"]);
    // Detach removes our device only.
    d.ok(&["detach", &a.name]);
    assert_eq!(sorted(a.links()), vec!["eth0", "lo", "vp0"]);
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn resolv_conf_follows_the_namespace_and_spares_files_not_ours() {
    require_root();
    let d = Daemon::start();
    d.ok(&["network", "create", "one", "--subnet", "10.82.1.0/24"]);
    d.ok(&["network", "create", "two", "--subnet", "10.82.2.0/24"]);
    let read = |ns: &str| std::fs::read_to_string(format!("/etc/netns/{ns}/resolv.conf")).ok();

    // Given as /run/netns/X, the namespace is the `ip netns` name X: named after it, and its
    // resolv.conf is written.
    let m = Netns::new("m");
    d.ok(&[
        "attach",
        "--network",
        "one",
        &format!("/run/netns/{}", m.name),
    ]);
    assert_eq!(
        d.ip_of("one", &m.name),
        "10.82.1.2",
        "named after the netns"
    );
    assert!(
        read(&m.name).is_some_and(|t| t.contains("nameserver 10.82.1.1")),
        "{:?}",
        read(&m.name)
    );
    // The network that wrote it leaves while another stays: the file now points there.
    d.ok(&["network", "connect", "two", &m.name]);
    d.ok(&["network", "disconnect", "one", &m.name]);
    let text = read(&m.name).expect("resolv.conf kept while the namespace has a network");
    assert!(text.contains("nameserver 10.82.2.1"), "{text}");
    assert!(!text.contains("search"), "{text}");
    d.ok(&["network", "disconnect", "two", &m.name]);
    assert_eq!(read(&m.name), None, "removed with the last endpoint");

    // A resolv.conf the user wrote is neither replaced nor removed.
    let f = Netns::new("f");
    let dir = std::path::PathBuf::from(format!("/etc/netns/{}", f.name));
    let _cleanup = vswitch_tests::TempDir(dir.clone());
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("resolv.conf"), "nameserver 192.0.2.53\n").expect("write");
    d.ok(&["attach", "--network", "one", &f.name]);
    assert_eq!(read(&f.name).as_deref(), Some("nameserver 192.0.2.53\n"));
    d.ok(&["detach", &f.name]);
    assert_eq!(read(&f.name).as_deref(), Some("nameserver 192.0.2.53\n"));
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn automatic_subnets_stay_clear_of_host_routes() {
    require_root();
    let d = Daemon::start();
    // The daemon's namespace stands for the host: say a VPN there routes 172.18.0.0/16.
    for cmd in [
        vec!["ip", "link", "set", "lo", "up"],
        vec!["ip", "route", "add", "172.18.0.0/16", "dev", "lo"],
    ] {
        let out = d.ns.exec(&cmd, secs(5));
        assert!(out.status.success(), "{cmd:?}: {}", text(&out.stderr));
    }
    d.ok(&["network", "create", "auto"]);
    assert_eq!(
        d.inspect("auto")["IPAM"]["Config"][0]["Subnet"],
        "172.19.0.0/16"
    );
    // Given explicitly, the subnet is the user's call.
    d.ok(&["network", "create", "mine", "--subnet", "172.18.5.0/24"]);
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn a_container_cannot_take_the_gateways_mac_or_another_containers() {
    require_root();
    let d = Daemon::start();
    d.ok(&["network", "create", "gw", "--subnet", "10.85.0.0/24"]);
    let a = Netns::new("a");
    let b = Netns::new("b");
    d.ok(&["attach", "--network", "gw", &a.name]);
    d.ok(&["attach", "--network", "gw", &b.name]);
    let gw_mac = "02:42:0a:55:00:01";
    // a puts on the gateway's MAC and talks: broadcasts that would teach a plain learning
    // switch that the gateway now lives behind a's port.
    let set = a.exec(&["ip", "link", "set", "eth0", "address", gw_mac], secs(5));
    assert!(set.status.success(), "{}", text(&set.stderr));
    assert!(
        !a.ping("10.85.0.3"),
        "a's frames from the gateway's MAC are dropped"
    );
    // b still reaches the real gateway, and the table still puts it on the gateway's port.
    assert!(b.ping("10.85.0.1"), "b -> gateway");
    let fdb = d.ok(&["fdb", "gw"]);
    let row = fdb
        .lines()
        .find(|l| l.contains(gw_mac))
        .unwrap_or_else(|| panic!("{gw_mac} missing from\n{fdb}"));
    assert!(row.contains("gateway"), "{row}");
    let stats = d.ok(&["stats", "gw"]);
    let a_row = stats.lines().find(|l| l.contains(&a.name)).expect("a row");
    let rx_dropped: u64 = a_row
        .split_whitespace()
        .nth(5)
        .and_then(|v| v.parse().ok())
        .expect("rx dropped");
    assert!(rx_dropped > 0, "counted: {stats}");

    // Nor another container's: a puts on b's MAC, and c still reaches b, not a.
    let c = Netns::new("c");
    d.ok(&["attach", "--network", "gw", &c.name]);
    let b_mac = "02:42:0a:55:00:03";
    let set = a.exec(&["ip", "link", "set", "eth0", "address", b_mac], secs(5));
    assert!(set.status.success(), "{}", text(&set.stderr));
    assert!(!a.ping("10.85.0.4"), "a's frames from b's MAC are dropped");
    assert!(c.ping("10.85.0.3"), "c -> b");
    let fdb = d.ok(&["fdb", "gw"]);
    let row = fdb
        .lines()
        .find(|l| l.contains(b_mac))
        .unwrap_or_else(|| panic!("{b_mac} missing from\n{fdb}"));
    assert!(row.contains(&b.name), "{row}");
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn clients_that_stall_mid_body_do_not_lock_the_others_out() {
    use std::io::Write;
    require_root();
    let d = Daemon::start();
    // Every connection slot taken by a client that announces a body and stops sending it.
    let mut stalled = Vec::new();
    for _ in 0..256 {
        let mut s = std::os::unix::net::UnixStream::connect(&d.socket).expect("connect");
        s.write_all(
            b"POST /networks/create HTTP/1.1\r\nHost: d\r\nContent-Length: 100\r\n\r\n{\"Na",
        )
        .expect("write");
        stalled.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    // One more is told why, in one line, instead of finding the socket closed.
    let out = d.vs(&["network", "ls"]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("too many control connections"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // The stalled bodies time out and the slots come back.
    assert!(
        wait_until(secs(15), || d.vs(&["network", "ls"]).status.success()),
        "the daemon answers again"
    );
    drop(stalled);
    assert!(d.ok(&["network", "ls"]).contains("bridge"));
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn a_daemon_that_cannot_start_leaves_no_socket_behind() {
    require_root();
    let dir = std::env::temp_dir().join(vswitch_tests::unique("-badstate"));
    let _cleanup = vswitch_tests::TempDir(dir.clone());
    let state = dir.join("state");
    std::fs::create_dir_all(&state).expect("mkdir");
    std::fs::write(state.join("state.json"), "{ truncated").expect("write");
    let socket = dir.join("s.sock");
    let ns = Netns::new("bs");
    let out = ns.exec(
        &[
            vswitch_tests::vswitch_bin().to_str().expect("path"),
            "--socket",
            socket.to_str().expect("path"),
            "daemon",
            "--state-dir",
            state.to_str().expect("path"),
        ],
        secs(10),
    );
    assert!(!out.status.success());
    assert_eq!(
        text(&out.stderr).trim_end().lines().count(),
        1,
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("state.json"),
        "the error names the file: {}",
        text(&out.stderr)
    );
    assert!(!socket.exists(), "no socket left for clients to find dead");
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn a_frozen_daemon_stops_traffic() {
    require_root();
    let d = Daemon::start();
    let a = Netns::new("a");
    let b = Netns::new("b");
    d.ok(&["attach", &a.name]);
    d.ok(&["attach", &b.name]);
    assert!(a.ping_within("172.17.0.3", secs(5)));
    d.signal("STOP");
    let blocked = !a.ping("172.17.0.3");
    d.signal("CONT");
    assert!(blocked, "frames must go through the daemon");
    assert!(
        a.ping_within("172.17.0.3", secs(5)),
        "flows again after SIGCONT"
    );
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn ipv6_network() {
    require_root();
    let d = Daemon::start();
    d.ok(&[
        "network",
        "create",
        "six",
        "--ipv6",
        "--subnet",
        "fd00:77::/64",
        "--subnet",
        "10.79.0.0/24",
    ]);
    let a = Netns::new("a");
    let b = Netns::new("b");
    d.ok(&["network", "connect", "six", &a.name]);
    d.ok(&["network", "connect", "six", &b.name]);
    let net = d.inspect("six");
    assert_eq!(net["EnableIPv6"], true);
    let b6 = net["Containers"]
        .as_object()
        .and_then(|c| c.values().find(|e| e["Name"] == b.name.as_str()))
        .and_then(|e| e["IPv6Address"].as_str())
        .expect("IPv6Address")
        .to_owned();
    assert_eq!(b6, "fd00:77::3/64");
    assert!(
        a.ping_within("fd00:77::3", secs(5)),
        "IPv6 between endpoints"
    );
    assert!(a.ping("fd00:77::1"), "IPv6 gateway answers");
    // DNS on an IPv6 network: AAAA records, and queries over IPv6 to the gateway.
    let aaaa = a.exec(
        &["dig", "+short", "+time=3", "+tries=1", &b.name, "AAAA"],
        secs(10),
    );
    assert_eq!(text(&aaaa.stdout).trim(), "fd00:77::3");
    let over6 = a.exec(
        &[
            "dig",
            "+short",
            "+time=3",
            "+tries=1",
            "@fd00:77::1",
            &b.name,
        ],
        secs(10),
    );
    assert_eq!(text(&over6.stdout).trim(), "10.79.0.3");
    let tcp6 = a.exec(
        &[
            "dig",
            "+tcp",
            "+short",
            "+time=3",
            "+tries=1",
            "@fd00:77::1",
            &b.name,
            "AAAA",
        ],
        secs(10),
    );
    assert_eq!(text(&tcp6.stdout).trim(), "fd00:77::3");
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn inspect_and_ls_are_docker_shaped() {
    require_root();
    let d = Daemon::start();
    let id = d.ok(&[
        "network",
        "create",
        "shape",
        "--subnet",
        "10.80.0.0/16",
        "--gateway",
        "10.80.0.254",
        "--ip-range",
        "10.80.5.0/24",
        "--mtu",
        "1400",
        "--internal",
    ]);
    let id = id.trim();
    assert_eq!(id.len(), 64, "prints the id");
    let a = Netns::new("a");
    d.ok(&["attach", "--network", "shape", "--alias", "x", &a.name]);
    let n = d.inspect("shape");
    assert_eq!(n["Name"], "shape");
    assert_eq!(n["Id"], id);
    assert_eq!(n["Driver"], "vswitch");
    assert_eq!(n["Scope"], "local");
    assert_eq!(n["Internal"], true);
    assert_eq!(n["EnableIPv6"], false);
    assert!(n["Created"].as_str().is_some_and(|c| c.contains('T')));
    assert_eq!(n["IPAM"]["Config"][0]["Subnet"], "10.80.0.0/16");
    assert_eq!(n["IPAM"]["Config"][0]["Gateway"], "10.80.0.254");
    assert_eq!(n["IPAM"]["Config"][0]["IPRange"], "10.80.5.0/24");
    let c = n["Containers"].as_object().expect("Containers");
    let e = c.values().next().expect("one endpoint");
    assert_eq!(e["Name"], a.name.as_str());
    assert_eq!(
        e["IPv4Address"], "10.80.5.1/16",
        "allocated from the ip-range"
    );
    assert_eq!(e["MacAddress"], "02:42:0a:50:05:01");
    assert_eq!(e["EndpointID"].as_str().map(str::len), Some(64));
    assert_eq!(e["IPv6Address"], "");
    assert!(n["Options"].is_object() && n["Labels"].is_object());
    assert!(a.addrs("eth0").contains("10.80.5.1/16"));
    let mtu = a.exec(&["cat", "/sys/class/net/eth0/mtu"], secs(5));
    assert_eq!(text(&mtu.stdout).trim(), "1400");
    // Prefix of the id works like Docker's.
    assert_eq!(d.inspect(&id[..6])["Name"], "shape");

    let ls = d.ok(&["network", "ls"]);
    let header = ls.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("NETWORK ID")
            && header.contains("NAME")
            && header.contains("DRIVER")
            && header.contains("SCOPE"),
        "{ls}"
    );
    assert!(ls.lines().any(|l| l.starts_with(&id[..12])
        && l.contains("shape")
        && l.contains("vswitch")
        && l.contains("local")));
    let q = d.ok(&["network", "ls", "-q"]);
    assert_eq!(q.lines().count(), 2);
    assert!(q.lines().all(|l| l.len() == 12));
    let json = d.ok(&["network", "ls", "--format", "json"]);
    for line in json.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("json line");
        assert!(v["Name"].is_string());
    }
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn bad_input_is_one_line_nonzero_and_changes_nothing() {
    require_root();
    let d = Daemon::start();
    d.ok(&["network", "create", "taken", "--subnet", "10.81.0.0/16"]);
    let a = Netns::new("a");
    d.ok(&[
        "attach",
        "--network",
        "taken",
        "--ip",
        "10.81.0.10",
        "--name",
        "ep",
        &a.name,
    ]);
    let snapshot = || {
        (
            d.ok(&["network", "ls", "-q"]),
            d.ok(&["network", "inspect", "bridge", "taken"]),
        )
    };
    let before = snapshot();
    let b = Netns::new("b");

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["network", "create", "x", "--subnet", "10.0.0.0/33"],
            "invalid subnet",
        ),
        (
            vec!["network", "create", "x", "--subnet", "banana"],
            "invalid subnet",
        ),
        (
            vec!["network", "create", "x", "--subnet", "10.90.0.1/16"],
            "it should be 10.90.0.0/16",
        ),
        (
            vec![
                "network",
                "create",
                "x",
                "--subnet",
                "10.90.0.0/16",
                "--gateway",
                "10.91.0.1",
            ],
            "not a host address",
        ),
        (
            vec!["network", "create", "x", "--subnet", "10.81.128.0/17"],
            "overlaps with network taken",
        ),
        (
            vec!["network", "create", "x", "--subnet", "172.17.3.0/24"],
            "overlaps with network bridge",
        ),
        (vec!["network", "create", "taken"], "already exists"),
        // Special-purpose ranges (a multicast subnet panicked the control thread).
        (
            vec!["network", "create", "x", "--subnet", "224.0.0.0/24"],
            "overlaps multicast",
        ),
        (
            vec!["network", "create", "x", "--subnet", "127.0.0.0/16"],
            "overlaps loopback",
        ),
        (
            vec!["network", "create", "x", "--subnet", "169.254.0.0/16"],
            "overlaps link-local",
        ),
        (
            vec!["network", "create", "x", "--ipv6", "--subnet", "ff02::/64"],
            "overlaps multicast",
        ),
        (
            vec!["network", "create", "bad name"],
            "invalid network name",
        ),
        (vec!["network", "create", "x", "--mtu", "10"], "invalid MTU"),
        (
            vec!["network", "create", "x", "--ip-range", "10.0.0.0/24"],
            "needs --subnet",
        ),
        (vec!["network", "inspect", "nope"], "network nope not found"),
        (vec!["network", "rm", "nope"], "network nope not found"),
        (vec!["network", "rm", "bridge"], "cannot be removed"),
        (
            vec!["network", "rm", "taken"],
            "network taken has active endpoints",
        ),
        (
            vec!["attach", "--network", "nope", &b.name],
            "network nope not found",
        ),
        (
            vec!["attach", "--network", "taken", "vst-no-such-netns"],
            "cannot open the network namespace",
        ),
        (
            vec!["attach", "--network", "taken", "999999999"],
            "cannot open the network namespace",
        ),
        (
            vec!["attach", "--network", "taken", "/etc/hostname"],
            "not a network namespace",
        ),
        (
            vec!["attach", "--network", "taken", "--ip", "10.99.0.5", &b.name],
            "not a host address",
        ),
        (
            vec![
                "attach",
                "--network",
                "taken",
                "--ip",
                "10.81.0.10",
                &b.name,
            ],
            "already in use",
        ),
        (
            vec!["attach", "--network", "taken", "--ip", "10.81.0.1", &b.name],
            "already in use",
        ),
        (
            vec![
                "attach",
                "--network",
                "taken",
                "--ip",
                "10.81.255.255",
                &b.name,
            ],
            "not a host address",
        ),
        (
            vec!["attach", "--network", "taken", "--name", "ep", &b.name],
            "already in use",
        ),
        (
            vec!["attach", "--network", "taken", "--mac", "zz", &b.name],
            "invalid MAC",
        ),
        (
            vec!["attach", "--alias", "web", &b.name],
            "need a user-defined network",
        ),
        (
            vec![
                "attach",
                "--network",
                "taken",
                "--mac",
                "01:00:5e:00:00:01",
                &b.name,
            ],
            "not a unicast",
        ),
        (
            vec!["attach", "--network", "taken", &a.name],
            "already attached",
        ),
        (
            vec![
                "attach",
                "--network",
                "taken",
                "--ifname",
                "this-name-is-way-too-long",
                &b.name,
            ],
            "invalid interface name",
        ),
        (vec!["detach", "nobody"], "endpoint nobody not found"),
        (
            vec!["network", "disconnect", "taken", "nobody"],
            "not found",
        ),
        (vec!["fdb", "nope"], "not found"),
        (vec!["stats", "nope"], "not found"),
        // Rejected by the command-line parser: still one line.
        (
            vec!["network", "create", "x", "--mtu", "abc"],
            "invalid value 'abc' for '--mtu",
        ),
        (
            vec!["attach", "--bogus", &b.name],
            "unexpected argument '--bogus'",
        ),
        (vec!["no-such-command"], "unrecognized subcommand"),
    ];
    for (args, needle) in &cases {
        let err = d.fails(args);
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in {err:?}"
        );
        assert!(err.starts_with("Error: "), "{err}");
    }
    // The daemon's own namespace cannot be a target.
    let own = format!("/proc/{}/ns/net", d.pid());
    assert!(
        d.fails(&["attach", &own])
            .contains("daemon's own network namespace")
    );
    // An interface name that already exists inside the target is refused, leaving nothing.
    let ex = b.exec(
        &["ip", "tuntap", "add", "dev", "eth0", "mode", "tap"],
        secs(5),
    );
    assert!(ex.status.success(), "{}", text(&ex.stderr));
    assert!(
        d.fails(&["attach", "--network", "taken", "--ifname", "eth0", &b.name])
            .contains("already exists")
    );
    assert_eq!(
        b.links(),
        vec!["lo", "eth0"],
        "only the foreign eth0, no TAP of ours"
    );

    assert_eq!(snapshot(), before, "state unchanged by bad input");
    assert_eq!(
        b.links().iter().filter(|l| l.starts_with("vs")).count(),
        0,
        "no TAP left in the target"
    );
    assert_eq!(
        d.ns.links(),
        vec!["lo"],
        "no TAP left in the daemon's namespace"
    );
    assert!(a.ping("10.81.0.1"), "existing endpoint unaffected");
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn control_socket_survives_garbage_and_clients_name_the_socket() {
    require_root();
    let d = Daemon::start();
    let mode = std::fs::metadata(&d.socket).map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    assert_eq!(mode.ok(), Some(0o600), "socket is owner-only");

    let _ = d.raw(b"\x00\x01\x02 this is not http\r\n\r\n");
    let _ = d.raw(&vec![b'A'; 256 * 1024]);
    let big = format!(
        "POST /networks/create HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        8 << 20
    );
    let mut req = big.into_bytes();
    req.extend(std::iter::repeat_n(b'{', 64 << 10));
    let reply = d.raw(&req);
    assert!(
        text(&reply).starts_with("HTTP/1.1 4"),
        "oversized body refused: {}",
        text(&reply)
    );
    let reply =
        d.raw(b"POST /networks/create HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n{\"Name\":1");
    assert!(text(&reply).starts_with("HTTP/1.1 400"), "{}", text(&reply));
    let reply = d.raw(b"GET /no/such/path HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(text(&reply).starts_with("HTTP/1.1 404"), "{}", text(&reply));
    let reply = d.raw(b"GET /_ping HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        text(&reply).contains("OK"),
        "daemon alive: {}",
        text(&reply)
    );
    d.ok(&["network", "ls"]);

    // A client that cannot reach a daemon says so, naming the socket.
    let missing = d.dir.join("no-such.sock");
    let out = vswitch_tests::run(
        std::process::Command::new(vswitch_tests::vswitch_bin())
            .arg("--socket")
            .arg(&missing)
            .args(["network", "ls"]),
        secs(10),
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(&missing.display().to_string()), "{err}");
}

/// The `/proc` task directories of the daemon's threads named `dp-<network>`.
fn datapath_tasks(d: &Daemon, network: &str) -> Vec<std::path::PathBuf> {
    let want = format!("dp-{network}");
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", d.pid())) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .map(|t| t.path())
        .filter(|dir| std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == want))
        .collect()
}

/// Nice values of the daemon's threads named `dp-<network>`.
fn datapath_nice(d: &Daemon, network: &str) -> Vec<i64> {
    datapath_tasks(d, network)
        .iter()
        .filter_map(|dir| {
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            // Fields after the ")" that closes the name: state is field 3, nice field 19.
            let rest = stat.rsplit_once(')')?.1;
            rest.split_whitespace().nth(16)?.parse().ok()
        })
        .collect()
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn datapath_threads_run_at_the_configured_nice_value() {
    require_root();
    let d = Daemon::start();
    d.ok(&["network", "create", "prio", "--subnet", "10.79.0.0/24"]);
    assert!(
        wait_until(secs(5), || datapath_nice(&d, "prio") == vec![-10]),
        "default -10: {:?}",
        datapath_nice(&d, "prio")
    );
    drop(d);
    let d = Daemon::start_with(&["--datapath-nice", "3"]);
    d.ok(&["network", "create", "prio", "--subnet", "10.79.0.0/24"]);
    assert!(
        wait_until(secs(5), || datapath_nice(&d, "prio") == vec![3]),
        "configured 3: {:?}",
        datapath_nice(&d, "prio")
    );
    // Out of range: one line, non-zero, no daemon.
    daemon_refuses(&["--datapath-nice", "40"]);
}

/// `vswitch daemon ARGS` fails at once with one error line that names the first argument.
fn daemon_refuses(args: &[&str]) {
    let out = vswitch_tests::run(
        std::process::Command::new(vswitch_tests::vswitch_bin())
            .arg("daemon")
            .args(args),
        secs(10),
    );
    assert!(!out.status.success(), "daemon {args:?} should have failed");
    let err = text(&out.stderr);
    assert!(err.contains(args[0]), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

/// Voluntary context switches (times it went to sleep) of a network's datapath thread.
fn datapath_sleeps(d: &Daemon, network: &str) -> Option<u64> {
    let dir = datapath_tasks(d, network).into_iter().next()?;
    std::fs::read_to_string(dir.join("status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
        .trim()
        .parse()
        .ok()
}

/// Sleeps of the datapath while `a` pings `ip` 1000 times, 200 us apart.
fn sleeps_during_fast_ping(d: &Daemon, a: &Netns, ip: &str) -> u64 {
    assert!(a.ping_within(ip, secs(5)));
    let before = datapath_sleeps(d, "bench").expect("datapath thread");
    let out = a.exec(&["ping", "-q", "-c", "1000", "-i", "0.0002", ip], secs(30));
    assert!(out.status.success(), "ping: {}", text(&out.stderr));
    datapath_sleeps(d, "bench").expect("datapath thread") - before
}

/// Kills the process on drop.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sleeps of the datapath during 200 UDP request/response exchanges, 5 ms apart, between a
/// client in `a` and a Python echo server in `b`.
fn sleeps_during_udp_exchanges(d: &Daemon, a: &Netns, b: &Netns, ip: &str) -> u64 {
    let _server = Reaped(
        std::process::Command::new("ip")
            .args(["netns", "exec", &b.name, "python3", "-c"])
            .arg(
                "import socket\n\
                 s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                 s.bind(('0.0.0.0', 7777))\n\
                 while True:\n    d, peer = s.recvfrom(64)\n    s.sendto(d, peer)\n",
            )
            .spawn()
            .expect("echo server"),
    );
    let client = format!(
        "import socket, time\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(0.5)\n\
         for _ in range(100):\n    \
             try:\n        s.sendto(b'x', ('{ip}', 7777)); s.recv(64); break\n    \
             except OSError: time.sleep(0.1)\n\
         else:\n    raise SystemExit('no echo')\n\
         import sys; sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.readline()\n\
         for _ in range(200):\n    s.sendto(b'x', ('{ip}', 7777)); s.recv(64); time.sleep(0.005)\n"
    );
    use std::io::{BufRead, Write};
    let mut c = Reaped(
        std::process::Command::new("ip")
            .args(["netns", "exec", &a.name, "python3", "-c", &client])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("client"),
    );
    let mut line = String::new();
    let mut out = std::io::BufReader::new(c.0.stdout.take().expect("stdout"));
    out.read_line(&mut line).expect("client output");
    assert_eq!(line.trim(), "ready", "echo server not reachable");
    let before = datapath_sleeps(d, "bench").expect("datapath thread");
    let mut stdin = c.0.stdin.take().expect("stdin");
    stdin.write_all(b"go\n").expect("start client");
    let ok = wait_until(secs(30), || matches!(c.0.try_wait(), Ok(Some(_))));
    assert!(ok, "client did not finish");
    assert!(c.0.wait().expect("client").success(), "an exchange failed");
    datapath_sleeps(d, "bench").expect("datapath thread") - before
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn datapath_busy_polls_after_traffic_when_told() {
    require_root();
    let run = |poll: &str| {
        let d = Daemon::start_with(&["--datapath-busy-poll", poll]);
        d.ok(&["network", "create", "bench", "--subnet", "10.79.1.0/24"]);
        let a = Netns::new("a");
        let b = Netns::new("b");
        d.ok(&["attach", "--network", "bench", &a.name]);
        d.ok(&[
            "attach",
            "--network",
            "bench",
            "--ip",
            "10.79.1.20",
            &b.name,
        ]);
        (
            sleeps_during_fast_ping(&d, &a, "10.79.1.20"),
            sleeps_during_udp_exchanges(&d, &a, &b, "10.79.1.20"),
        )
    };
    let (ping_sleeping, udp_sleeping) = run("0");
    let (ping_polling, udp_polling) = run("1000");
    eprintln!(
        "datapath sleeps: 1000 pings 200 us apart: {ping_sleeping} without busy-polling, \
         {ping_polling} with 1 ms; 200 UDP exchanges 5 ms apart: {udp_sleeping} / {udp_polling}"
    );
    // Pings 200 us apart: without busy-polling the thread sleeps between the echoes (about
    // once per ping); polling for 1 ms it stays awake through the gaps.
    assert!(
        ping_sleeping > 200,
        "without busy-polling: {ping_sleeping} sleeps"
    );
    assert!(
        ping_polling < ping_sleeping / 4,
        "busy-polling 1 ms: {ping_polling} sleeps, {ping_sleeping} without"
    );
    // Exchanges 5 ms apart, answered by a process: each request wakes the thread either way,
    // but only without busy-polling must the answer wake it a second time. (The window opens
    // when the request has been forwarded, not when the long sleep before it began.)
    assert!(
        udp_sleeping > 340,
        "without busy-polling: {udp_sleeping} sleeps for 200 exchanges"
    );
    assert!(
        udp_polling < 280,
        "busy-polling 1 ms: {udp_polling} sleeps for 200 exchanges"
    );
    // Out of range: one line, non-zero, no daemon.
    daemon_refuses(&["--datapath-busy-poll", "5000"]);
}
