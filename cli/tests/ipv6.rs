//! IPv6 as a user tries it (issue 19): outbound ping and UDP, and published ports reached over
//! IPv6.

use std::time::Duration;

use vswitch_tests::{
    Daemon, HttpServer, Netns, NsDaemon, Outside, curl, require_root, run, secs, text,
};

/// IPv6 as a user tries it: `ping -6` out (through the raw socket of a root daemon, then
/// through ping sockets once the namespace allows them), a published port reached over IPv6
/// showing the client's own IPv6 address, and outbound UDP over IPv6.
#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn ipv6_goes_out_and_clients_come_in_as_themselves() {
    require_root();
    let mut d = Daemon::start();
    let outside = Outside::new(&d);
    let ip = |ns: &str, args: &[&str]| {
        let out = run(
            std::process::Command::new("ip").args(["-n", ns]).args(args),
            secs(10),
        );
        assert!(out.status.success(), "ip {args:?}: {}", text(&out.stderr));
    };
    ip(
        &d.ns.name,
        &["addr", "add", "2001:db8:77::1/64", "dev", "vout", "nodad"],
    );
    ip(
        &outside.ns.name,
        &["addr", "add", "2001:db8:77::2/64", "dev", "vin", "nodad"],
    );
    d.ok(&[
        "network",
        "create",
        "six",
        "--ipv6",
        "--subnet",
        "fd79::/64",
    ]);
    let c = Netns::new("c6");
    d.ok(&[
        "attach",
        "--network",
        "six",
        "--name",
        "six1",
        "-p",
        "18081:8080",
        &c.name,
    ]);

    // ping -6 to the outside, as root without ping sockets (a raw ICMPv6 socket).
    assert!(c.ping_within("2001:db8:77::2", secs(10)), "{}", d.log());
    assert_eq!(
        d.log()
            .matches("outbound ping uses a raw ICMP socket")
            .count(),
        1,
        "the raw ICMPv6 socket"
    );

    // A published port reached over IPv6: the container sees the client's own address.
    let www = d.dir.join("www6");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("index.html"), "hello from the container\n").expect("index");
    let server = HttpServer::start_on(&c.name, "::", 8080, &www);
    let (rc, body) = curl(&outside.ns.name, &["-g", "http://[2001:db8:77::1]:18081/"]);
    assert_eq!((rc, body.as_str()), (0, "hello from the container\n"));
    let served = server.log();
    assert!(
        served.contains("2001:db8:77::2 - -"),
        "client shown as itself: {served}"
    );

    // Outbound UDP over IPv6, answered.
    let echo = "import socket; s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); \
                s.bind(('::', 9999)); d, a = s.recvfrom(100); s.sendto(d.upper(), a)";
    let _udp = NsDaemon::spawn(&outside.ns.name, &["python3", "-c", echo]);
    std::thread::sleep(Duration::from_millis(300));
    let ask = "import socket; s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); \
               s.settimeout(5); s.sendto(b'ping6', ('2001:db8:77::2', 9999)); \
               print(s.recvfrom(100)[0].decode())";
    let out = c.exec(&["python3", "-c", ask], secs(10));
    assert_eq!(text(&out.stdout).trim(), "PING6", "{}", text(&out.stderr));

    // With ping sockets allowed in the daemon's namespace, a restarted daemon uses those.
    let sysctl = d.ns.exec(
        &["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"],
        secs(5),
    );
    assert!(sysctl.status.success());
    let raw_before = d
        .log()
        .matches("outbound ping uses a raw ICMP socket")
        .count();
    d.kill9_and_restart();
    assert!(c.ping_within("2001:db8:77::2", secs(10)), "{}", d.log());
    let raw_after = d
        .log()
        .matches("outbound ping uses a raw ICMP socket")
        .count();
    assert_eq!(
        raw_before, raw_after,
        "ping sockets, not raw ones, after the restart"
    );
}
