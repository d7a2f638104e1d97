//! The embedded DNS server with real clients: dig, glibc (getent, ping), over UDP and TCP,
//! forwarding to a dnsmasq upstream that the test runs inside the daemon's own namespace.

use std::time::{Duration, Instant};

use vswitch_tests::{Daemon, Netns, NsDaemon, NsProcess, require_root, secs, text, wait_until};

const UPSTREAM_PORT: &str = "5399";

/// A daemon whose upstream is a dnsmasq on 127.0.0.1:5399 in the daemon's namespace, which
/// answers example.test and says NXDOMAIN for nx.test. Also serves the host on 127.0.0.1:5398.
fn daemon_with_upstream() -> (Daemon, NsDaemon) {
    let d = Daemon::start_with(&[
        "--dns-upstream",
        &format!("127.0.0.1:{UPSTREAM_PORT}"),
        "--dns-listen",
        "127.0.0.1:5398",
    ]);
    let up = d.ns.exec(&["ip", "link", "set", "lo", "up"], secs(5));
    assert!(up.status.success());
    let dnsmasq = NsDaemon::spawn(
        &d.ns.name,
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--port",
            UPSTREAM_PORT,
            "--listen-address",
            "127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--address=/example.test/192.0.2.7",
            "--address=/nx.test/",
            "--pid-file=",
        ],
    );
    let ready = wait_until(secs(5), || {
        d.ns.dig(&["@127.0.0.1", "-p", UPSTREAM_PORT, "+short", "example.test"])
            .contains("192.0.2.7")
    });
    assert!(ready, "dnsmasq upstream did not come up");
    (d, dnsmasq)
}

fn status(dig_output: &str) -> String {
    dig_output
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .and_then(|r| r.split(',').next())
        .unwrap_or("no answer")
        .to_owned()
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn container_names_resolve_for_dig_and_glibc() {
    require_root();
    let (d, _up) = daemon_with_upstream();
    d.ok(&["network", "create", "red", "--subnet", "10.90.0.0/24"]);
    let a = Netns::new("a");
    let b = Netns::new("b");
    let c = Netns::new("c");
    d.ok(&[
        "attach",
        "--network",
        "red",
        "--name",
        "tomcat81",
        "--alias",
        "web",
        &a.name,
    ]);
    d.ok(&[
        "attach",
        "--network",
        "red",
        "--name",
        "tomcat82",
        "--alias",
        "web",
        &b.name,
    ]);
    d.ok(&["attach", "--network", "red", "--name", "client", &c.name]);
    // Names work the moment attach returns: no waiting here.
    assert_eq!(c.dig(&["+short", "tomcat82"]).trim(), "10.90.0.3");
    assert_eq!(
        c.dig(&["+short", "TomCat82"]).trim(),
        "10.90.0.3",
        "case-insensitive"
    );
    assert_eq!(
        c.dig(&["+short", "tomcat82.red"]).trim(),
        "10.90.0.3",
        "name.network"
    );
    assert_eq!(
        c.dig(&["+tcp", "+short", "tomcat81"]).trim(),
        "10.90.0.2",
        "TCP"
    );
    let mut web: Vec<String> = c
        .dig(&["+short", "web"])
        .lines()
        .map(str::to_owned)
        .collect();
    web.sort();
    assert_eq!(
        web,
        vec!["10.90.0.2", "10.90.0.3"],
        "alias shared by two endpoints"
    );
    let aaaa = c.dig(&["tomcat82", "AAAA"]);
    assert_eq!(status(&aaaa), "NOERROR", "NODATA, not NXDOMAIN: {aaaa}");
    assert!(aaaa.contains("ANSWER: 0"), "{aaaa}");
    assert_eq!(
        c.dig(&["+short", "-x", "10.90.0.3"]).trim(),
        "tomcat82.red.",
        "PTR"
    );
    let ptr = c.dig(&["-x", "10.90.0.3"]);
    assert!(ptr.contains("ANSWER: 1"), "one PTR answer: {ptr}");
    let started = Instant::now();
    assert_eq!(status(&c.dig(&["nosuchname"])), "NXDOMAIN");
    assert!(
        started.elapsed() < secs(2),
        "unknown single label answered at once"
    );
    // Not ours to deny: with a dot, an unknown name goes upstream (which knows nothing of it).
    assert_eq!(c.dig(&["+short", "nosuch.red"]).trim(), "");

    // glibc: getent and ping by name (resolv.conf from /etc/netns/NAME via ip netns exec).
    let getent = c.exec(&["getent", "hosts", "tomcat82"], secs(10));
    assert!(
        text(&getent.stdout).starts_with("10.90.0.3"),
        "{}",
        text(&getent.stdout)
    );
    let ping = c.exec(&["ping", "-c", "1", "-W", "2", "tomcat81"], secs(10));
    assert!(
        ping.status.success(),
        "ping by name: {}",
        text(&ping.stdout)
    );
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn forwarding_keeps_protocol_and_rcodes_and_servfails_in_time() {
    require_root();
    let (d, up) = daemon_with_upstream();
    d.ok(&["network", "create", "fwd", "--subnet", "10.91.0.0/24"]);
    let a = Netns::new("a");
    d.ok(&["attach", "--network", "fwd", &a.name]);
    assert_eq!(
        a.dig(&["+short", "example.test"]).trim(),
        "192.0.2.7",
        "UDP forward"
    );
    assert_eq!(
        a.dig(&["+tcp", "+short", "www.example.test"]).trim(),
        "192.0.2.7",
        "TCP forward"
    );
    assert_eq!(
        status(&a.dig(&["nx.test"])),
        "NXDOMAIN",
        "upstream rcode passed through"
    );
    // A network named like a public domain does not take that domain from its containers.
    d.ok(&["network", "create", "test", "--subnet", "10.91.1.0/24"]);
    let t = Netns::new("t");
    d.ok(&["attach", "--network", "test", "--name", "probe", &t.name]);
    assert_eq!(t.dig(&["+short", "example.test"]).trim(), "192.0.2.7");
    assert_eq!(t.dig(&["+short", "probe.test"]).trim(), "10.91.1.2");
    // The default bridge network has no names but forwards like the others.
    let p = Netns::new("p");
    d.ok(&["attach", &p.name]);
    assert_eq!(p.dig(&["+short", "example.test"]).trim(), "192.0.2.7");

    // A frozen upstream: no answer, no ICMP. The client still gets SERVFAIL within 5 s.
    up.signal("STOP");
    let started = Instant::now();
    let out = a.dig(&["+time=10", "other.example.test"]);
    let took = started.elapsed();
    up.signal("CONT");
    assert_eq!(status(&out), "SERVFAIL", "{out}");
    assert!(took < secs(5), "SERVFAIL took {took:?}");
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn names_are_scoped_to_the_networks_of_the_asker() {
    require_root();
    let (d, _up) = daemon_with_upstream();
    d.ok(&["network", "create", "red", "--subnet", "10.92.0.0/24"]);
    d.ok(&["network", "create", "blue", "--subnet", "10.93.0.0/24"]);
    let r = Netns::new("r");
    let b = Netns::new("b");
    let both = Netns::new("x");
    d.ok(&["attach", "--network", "red", "--name", "redbox", &r.name]);
    d.ok(&["attach", "--network", "blue", "--name", "bluebox", &b.name]);
    d.ok(&["attach", "--network", "red", "--name", "both", &both.name]);
    d.ok(&["network", "connect", "blue", "--name", "both", &both.name]);
    assert_eq!(
        status(&b.dig(&["redbox"])),
        "NXDOMAIN",
        "blue cannot see red"
    );
    assert_eq!(
        status(&b.dig(&["redbox.red"])),
        "NXDOMAIN",
        "not even as name.network, and not forwarded"
    );
    assert_eq!(r.dig(&["+short", "both"]).trim(), "10.92.0.3");
    assert_eq!(
        both.dig(&["+short", "bluebox"]).trim(),
        "10.93.0.2",
        "attached to both: sees both"
    );
    assert_eq!(both.dig(&["+short", "redbox"]).trim(), "10.92.0.2");
    // Default bridge: no container names.
    let p1 = Netns::new("p");
    let p2 = Netns::new("q");
    d.ok(&["attach", "--name", "plain1", &p1.name]);
    d.ok(&["attach", "--name", "plain2", &p2.name]);
    let out = p1.dig(&["plain2"]);
    assert!(out.contains("ANSWER: 0"), "bridge resolves no names: {out}");
    assert_ne!(status(&out), "NOERROR", "{out}");
    let resolv =
        std::fs::read_to_string(format!("/etc/netns/{}/resolv.conf", p1.name)).expect("resolv");
    assert!(
        !resolv.contains("search"),
        "no search domain on bridge: {resolv}"
    );
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn names_disappear_at_detach_and_gc_and_the_host_can_resolve() {
    require_root();
    let (d, _up) = daemon_with_upstream();
    d.ok(&["network", "create", "life", "--subnet", "10.94.0.0/24"]);
    let a = Netns::new("a");
    let b = Netns::new("b");
    let mut p = NsProcess::new();
    d.ok(&["attach", "--network", "life", "--name", "asker", &a.name]);
    d.ok(&["attach", "--network", "life", "--name", "leaver", &b.name]);
    d.ok(&[
        "attach",
        "--network",
        "life",
        "--name",
        "dier",
        &p.pid().to_string(),
    ]);
    assert_eq!(a.dig(&["+short", "leaver"]).trim(), "10.94.0.3");
    assert_eq!(a.dig(&["+short", "dier"]).trim(), "10.94.0.4");

    // From the host side (the daemon's namespace), through --dns-listen.
    let host =
        d.ns.dig(&["@127.0.0.1", "-p", "5398", "+short", "leaver.life"]);
    assert_eq!(host.trim(), "10.94.0.3");
    let host =
        d.ns.dig(&["@127.0.0.1", "-p", "5398", "+tcp", "+short", "dier.life"]);
    assert_eq!(host.trim(), "10.94.0.4");
    let bare = d.ns.dig(&["@127.0.0.1", "-p", "5398", "leaver"]);
    assert_eq!(status(&bare), "REFUSED", "the host uses name.network");

    d.ok(&["detach", "leaver"]);
    assert_eq!(status(&a.dig(&["leaver"])), "NXDOMAIN", "gone at detach");
    p.kill();
    let gone = wait_until(secs(3), || status(&a.dig(&["dier"])) == "NXDOMAIN");
    assert!(gone, "gone after endpoint GC");
    assert_eq!(
        status(&d.ns.dig(&["@127.0.0.1", "-p", "5398", "dier.life"])),
        "NXDOMAIN"
    );
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn silent_and_trickling_tcp_clients_do_not_block_others() {
    require_root();
    let (d, _up) = daemon_with_upstream();
    d.ok(&["network", "create", "tcp", "--subnet", "10.95.0.0/24"]);
    let a = Netns::new("a");
    d.ok(&["attach", "--network", "tcp", "--name", "target", &a.name]);
    // Ten connections that never send a byte, held open in the background.
    let hog = NsDaemon::spawn(
        &a.name,
        &[
            "python3",
            "-c",
            "import socket,time\ns=[socket.create_connection(('10.95.0.1',53)) for _ in range(10)]\ntime.sleep(30)",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        a.dig(&["+tcp", "+short", "target"]).trim(),
        "10.95.0.2",
        "others still served"
    );
    // The idle ones are cut after the idle timeout: a read on them sees EOF/RST within ~6 s.
    let probe = a.exec(
        &[
            "python3", "-c",
            "import socket,time\ns=socket.create_connection(('10.95.0.1',53))\ns.settimeout(10)\nt=time.time()\ntry:\n  s.recv(1)\nexcept OSError:\n  pass\nprint(round(time.time()-t,1))",
        ],
        secs(20),
    );
    let cut_after: f64 = text(&probe.stdout).trim().parse().unwrap_or(99.0);
    assert!(cut_after < 8.0, "idle TCP client cut after {cut_after} s");
    drop(hog);
    // A flood of garbage over UDP does not stop the switch.
    let flood = a.exec(
        &[
            "python3", "-c",
            "import socket,os\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor i in range(20000): s.sendto(os.urandom(i%700),('10.95.0.1',53))",
        ],
        secs(30),
    );
    assert!(flood.status.success());
    assert!(
        a.ping("10.95.0.1"),
        "gateway and switch still working after the flood"
    );
    assert_eq!(a.dig(&["+short", "target"]).trim(), "10.95.0.2");
}
