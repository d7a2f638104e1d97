//! A container as a hostile tenant, with real namespaces: addresses it was not given get it
//! nothing (port security), and what it can make the daemon do stays bounded.

use vswitch_tests::{Daemon, Netns, NsDaemon, Outside, require_root, secs, text, wait_until};

/// A container adds an address it was not given (another container's, then an outside one)
/// and sends from it: nothing gets through, and the drops are counted. On a network created
/// with `--opt port-security=off` the same works, as on a Linux bridge.
#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn addresses_a_container_was_not_given_get_it_nothing() {
    require_root();
    let d = Daemon::start();
    d.ok(&["network", "create", "strict", "--subnet", "10.120.0.0/24"]);
    d.ok(&[
        "network",
        "create",
        "open",
        "--subnet",
        "10.120.1.0/24",
        "--opt",
        "port-security=off",
    ]);
    let inspect = d.inspect("open");
    assert_eq!(
        inspect["Options"]["com.vswitch.network.port-security"].as_str(),
        Some("off")
    );
    for (net, prefix, blocked) in [("strict", "10.120.0", true), ("open", "10.120.1", false)] {
        let a = Netns::new("a");
        let b = Netns::new("b");
        d.ok(&[
            "attach",
            "--network",
            net,
            "--ip",
            &format!("{prefix}.10"),
            &a.name,
        ]);
        d.ok(&[
            "attach",
            "--network",
            net,
            "--ip",
            &format!("{prefix}.11"),
            &b.name,
        ]);
        assert!(
            a.ping_within(&format!("{prefix}.11"), secs(5)),
            "{net}: its own address works"
        );
        // A second address on a's eth0, one nobody was given.
        let extra = format!("{prefix}.99");
        let add = a.exec(
            &["ip", "addr", "add", &format!("{extra}/24"), "dev", "eth0"],
            secs(5),
        );
        assert!(add.status.success());
        let spoofed = a.exec(
            &[
                "ping",
                "-c",
                "2",
                "-W",
                "1",
                "-I",
                &extra,
                &format!("{prefix}.11"),
            ],
            secs(10),
        );
        let gateway = a.exec(
            &[
                "ping",
                "-c",
                "2",
                "-W",
                "1",
                "-I",
                &extra,
                &format!("{prefix}.1"),
            ],
            secs(10),
        );
        assert_eq!(
            !spoofed.status.success(),
            blocked,
            "{net}: {}",
            text(&spoofed.stdout)
        );
        assert_eq!(
            !gateway.status.success(),
            blocked,
            "{net}: {}",
            text(&gateway.stdout)
        );
        let s = d.stats(net);
        let dropped = s["Spoofed"].as_u64().unwrap_or(0);
        if blocked {
            assert!(dropped >= 4, "{net}: counted: {s}");
        } else {
            assert_eq!(dropped, 0, "{net}: {s}");
        }
        // b's own traffic was never in danger.
        assert!(b.ping_within(&format!("{prefix}.10"), secs(5)));
    }
}

/// A directory with one file `who` saying `text`.
fn site(d: &Daemon, name: &str, text: &str) -> std::path::PathBuf {
    let dir = d.state.with_file_name(format!("www-{name}"));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("who"), text).expect("write");
    dir
}

/// A container reaching its gateway on a published port number reaches exactly that mapping,
/// as a client on the host would: never a host service listening on the loopback with the
/// same number, and never a port published only on the host's loopback.
#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn a_published_port_number_is_not_a_way_into_the_hosts_loopback() {
    require_root();
    let d = Daemon::start();
    let _outside = vswitch_tests::Outside::new(&d); // gives the daemon's host 192.0.2.1
    // A host service on 127.0.0.1:9090, which containers must not reach.
    let host_site = site(&d, "host", "host\n");
    let _host = vswitch_tests::NsDaemon::spawn(
        &d.ns.name,
        &[
            "python3",
            "-m",
            "http.server",
            "9090",
            "--bind",
            "127.0.0.1",
            "--directory",
            host_site.to_str().expect("path"),
        ],
    );
    assert!(
        vswitch_tests::wait_until(secs(10), || {
            vswitch_tests::curl(&d.ns.name, &["http://127.0.0.1:9090/who"]).1 == "host\n"
        }),
        "the host service did not start"
    );
    d.ok(&["network", "create", "pub", "--subnet", "10.121.0.0/24"]);
    let a = Netns::new("a");
    let c = Netns::new("c");
    let b = Netns::new("b");
    d.ok(&[
        "attach",
        "--network",
        "pub",
        "-p",
        "192.0.2.1:9090:8080",
        &a.name,
    ]);
    d.ok(&[
        "attach",
        "--network",
        "pub",
        "-p",
        "127.0.0.1:9091:8080",
        &c.name,
    ]);
    d.ok(&["attach", "--network", "pub", &b.name]);
    let _sa = vswitch_tests::HttpServer::start(&a.name, 8080, &site(&d, "a", "container a\n"));
    let _sc = vswitch_tests::HttpServer::start(&c.name, 8080, &site(&d, "c", "container c\n"));
    let (_, body) = vswitch_tests::curl(&b.name, &["http://10.121.0.1:9090/who"]);
    assert_eq!(
        body, "container a\n",
        "the mapping on 192.0.2.1, not the host's loopback"
    );
    let (rc, body) = vswitch_tests::curl(&b.name, &["http://10.121.0.1:9091/who"]);
    assert_ne!(
        rc, 0,
        "a port published on the host's loopback is the host's: {body}"
    );
    // From the host, both mappings answer as published.
    let (_, body) = vswitch_tests::curl(&d.ns.name, &["http://127.0.0.1:9091/who"]);
    assert_eq!(body, "container c\n");
}

/// The host side keeps to itself: the state directory is private, the host's initial network
/// namespace is attached only when asked with `--force`, an `ip netns` resolv.conf exists
/// exactly while the state holds its endpoint (restored when a crash lost it), and a restart
/// waits for the lock of a daemon that is still going away.
#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn the_host_side_stays_private_and_consistent() {
    use std::os::unix::fs::PermissionsExt;
    require_root();
    let mut d = Daemon::start();
    let mode = std::fs::metadata(&d.state)
        .expect("state dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "state directory mode {mode:o}");

    d.ok(&["network", "create", "hyg", "--subnet", "10.121.0.0/24"]);
    let before = d.ok(&["network", "inspect", "hyg"]);
    // PID 1's namespace, or kthreadd's where PID 1 may not be inspected (as in some sandboxes).
    let host = ["/proc/1/ns/net", "/proc/2/ns/net"]
        .into_iter()
        .filter(|p| {
            p.starts_with("/proc/1/")
                || std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd")
        })
        .find(|p| std::fs::File::open(p).is_ok())
        .expect("the host's initial network namespace can be opened");
    let err = d.fails(&["attach", "--network", "hyg", host]);
    assert!(
        err.contains("initial network namespace") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        d.ok(&["network", "inspect", "hyg"]),
        before,
        "nothing attached"
    );

    // The file a crash lost comes back; the file of a namespace deleted while the daemon was
    // down goes with its endpoint.
    let keep = Netns::new("keep");
    let gone = Netns::new("gone");
    d.ok(&["attach", "--network", "hyg", &keep.name]);
    d.ok(&["attach", "--network", "hyg", &gone.name]);
    let file = |ns: &Netns| std::path::PathBuf::from(format!("/etc/netns/{}/resolv.conf", ns.name));
    assert!(file(&keep).exists() && file(&gone).exists());
    let gone_file = file(&gone);
    d.kill9_and_restart_after(|| {
        std::fs::remove_file(file(&keep)).expect("remove");
        drop(gone);
        // What `ip netns del` leaves when the namespace's files were not removed with it.
        std::fs::create_dir_all(gone_file.parent().expect("dir")).expect("mkdir");
        std::fs::write(
            &gone_file,
            "# written by vswitch for network hyg\nnameserver 10.121.0.1\noptions ndots:0\n",
        )
        .expect("write");
    });
    let restored = std::fs::read_to_string(file(&keep)).unwrap_or_default();
    assert!(restored.contains("nameserver 10.121.0.1"), "{restored:?}");
    assert!(
        !gone_file.exists(),
        "resolv.conf of a namespace the state no longer holds"
    );

    // Someone still holds the lock for a moment (as a SIGKILLed daemon does until the kernel
    // has closed its files): the new daemon waits instead of giving up.
    let holder = std::process::Command::new("flock")
        .arg(d.state.join("lock"))
        .args(["sleep", "1.5"])
        .spawn()
        .expect("flock");
    let mut holder = KillOnDrop(holder);
    std::thread::sleep(std::time::Duration::from_millis(300));
    d.kill9_and_restart();
    assert!(
        d.log().contains("waiting for the previous daemon"),
        "{}",
        d.log()
    );
    let _ = holder.0.wait();
    assert!(keep.ping_within("10.121.0.1", secs(10)));
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Containers on two networks ping one outside address with the same echo id and different
/// payloads, as the daemon's raw ICMP socket carries them (ping sockets are closed in a new
/// namespace): each gets its own replies, once, with its own payload.
#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn pings_with_one_echo_id_from_two_networks_get_their_own_replies() {
    require_root();
    let d = Daemon::start();
    let _outside = Outside::new(&d);
    d.ok(&["network", "create", "p1", "--subnet", "10.122.1.0/24"]);
    d.ok(&["network", "create", "p2", "--subnet", "10.122.2.0/24"]);
    let a = Netns::new("a");
    let b = Netns::new("b");
    d.ok(&["attach", "--network", "p1", &a.name]);
    d.ok(&["attach", "--network", "p2", &b.name]);
    assert!(a.ping_within(Outside::IP, secs(5)) && b.ping_within(Outside::IP, secs(5)));
    let ping = |ns: &Netns, pattern: &str| {
        let out = ns.exec(
            &[
                "ping",
                "-n",
                "-e",
                "4242",
                "-p",
                pattern,
                "-c",
                "10",
                "-i",
                "0.2",
                "-W",
                "2",
                Outside::IP,
            ],
            secs(20),
        );
        text(&out.stdout)
    };
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| ping(&a, "aa"));
        let tb = s.spawn(|| ping(&b, "bb"));
        (ta.join().expect("a"), tb.join().expect("b"))
    });
    for (who, out) in [("a", &ra), ("b", &rb)] {
        assert!(out.contains(" 10 received"), "{who}: {out}");
        assert!(!out.contains("DUP!"), "{who} got another's replies: {out}");
        assert!(
            !out.contains("wrong data"),
            "{who} got another's payload: {out}"
        );
    }
}

/// Sends `count` queries for random names to `server` port 53 from inside `ns`, as fast as
/// it can, without waiting for answers.
fn flood_dns(ns: &Netns, server: &str, count: u32) {
    let script = format!(
        r#"
import os, socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range({count}):
    name = b"".join(bytes([len(l)]) + l for l in (os.urandom(6).hex().encode(), b"flood", b"test"))
    q = struct.pack(">HHHHHH", i & 0xffff, 0x0100, 1, 0, 0, 0) + name + b"\0" + struct.pack(">HH", 1, 1)
    s.sendto(q, ("{server}", 53))
"#
    );
    let out = ns.exec(&["python3", "-c", &script], secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// One container floods random names that its network forwards to an upstream that never
/// answers, so that every forward holds its slot until the deadline: another network's
/// lookups are still forwarded and answered, and so are its own neighbour's (SERVFAIL from
/// the silent upstream in time, not REFUSED).
#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn a_dns_flood_leaves_other_networks_and_neighbours_their_share() {
    require_root();
    let d = Daemon::start_with(&["--dns-upstream", "127.0.0.1:5399"]);
    let outside = Outside::new(&d);
    let _good = NsDaemon::spawn(
        &d.ns.name,
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--port=5399",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--address=/example.test/192.0.2.7",
            "--pid-file=",
        ],
    );
    // Reads queries and never answers.
    let _silent = NsDaemon::spawn(
        &outside.ns.name,
        &[
            "python3",
            "-c",
            "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.bind(('0.0.0.0', 53))\nwhile True: s.recv(4096)",
        ],
    );
    let silent = format!("{}:53", Outside::IP);
    d.ok(&[
        "network",
        "create",
        "flood",
        "--subnet",
        "10.123.0.0/24",
        "--dns",
        &silent,
    ]);
    d.ok(&["network", "create", "calm", "--subnet", "10.123.1.0/24"]);
    let f = Netns::new("f");
    let n = Netns::new("n");
    let c = Netns::new("c");
    d.ok(&["attach", "--network", "flood", &f.name]);
    d.ok(&["attach", "--network", "flood", &n.name]);
    d.ok(&["attach", "--network", "calm", &c.name]);
    let ready = wait_until(secs(5), || {
        c.dig(&["+short", "example.test"]).contains("192.0.2.7")
    });
    assert!(ready, "upstream answers");

    flood_dns(&f, "10.123.0.1", 3000);
    // The flooder's forwards hold their slots for seconds; the others ask now.
    let calm = c.dig(&["example.test"]);
    assert!(
        calm.contains("status: NOERROR") && calm.contains("192.0.2.7"),
        "{calm}"
    );
    let neighbour = n.exec(
        &["dig", "+time=8", "+tries=1", "neighbour.flood.test"],
        secs(15),
    );
    let neighbour = text(&neighbour.stdout);
    assert!(neighbour.contains("status: SERVFAIL"), "{neighbour}");
}

/// A container may pick any number of link-local addresses (port security lets them through:
/// its kernel picks them), so they get nothing beyond the link: no DNS answer, no connection
/// through the gateway. Its own address still does.
#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn link_local_sources_get_nothing_beyond_the_link() {
    require_root();
    let d = Daemon::start();
    d.ok(&[
        "network",
        "create",
        "ll",
        "--ipv6",
        "--subnet",
        "fd00:7a::/64",
        "--subnet",
        "10.125.0.0/24",
    ]);
    let a = Netns::new("a");
    let b = Netns::new("b");
    d.ok(&["attach", "--network", "ll", &a.name]);
    d.ok(&["attach", "--network", "ll", &b.name]);
    let ok = a.exec(
        &[
            "ip",
            "-6",
            "addr",
            "add",
            "fe80::1234/64",
            "dev",
            "eth0",
            "nodad",
        ],
        secs(5),
    );
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    // DNS over IPv6 to the gateway: from its own address, answered; from a link-local one,
    // not.
    let own = a.dig(&["@fd00:7a::1", "+short", &b.name]);
    assert!(own.contains("10.125.0.3"), "{own}");
    let ask = |src: &str| {
        let script = format!(
            "import socket, struct\n\
             s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
             s.settimeout(2)\n\
             s.bind(('{src}', 0, 0, socket.if_nametoindex('eth0')))\n\
             name = b''.join(bytes([len(l)]) + l for l in b'{}'.split(b'.'))\n\
             s.sendto(struct.pack('>HHHHHH', 7, 0x0100, 1, 0, 0, 0) + name + bytes(1) + \
             struct.pack('>HH', 1, 1), ('fd00:7a::1', 53))\n\
             try:\n    print(len(s.recv(512)))\nexcept socket.timeout:\n    print('timeout')\n",
            b.name
        );
        let out = a.exec(&["python3", "-c", &script], secs(10));
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_owned()
    };
    assert_ne!(ask("fd00:7a::2"), "timeout", "its own address is answered");
    assert_eq!(ask("fe80::1234"), "timeout", "answered a link-local source");
    // A TCP connection through the gateway from a link-local source is neither held nor
    // answered.
    let _ = a.exec(
        &[
            "python3",
            "-c",
            "import socket\ns = socket.socket(socket.AF_INET6)\ns.settimeout(2)\n\
             s.bind(('fe80::1234', 0, 0, socket.if_nametoindex('eth0')))\n\
             try: s.connect(('2001:db8::1', 80))\nexcept OSError: pass\n",
        ],
        secs(10),
    );
    let stats = d.stats("ll");
    assert_eq!(stats["TcpFlows"], 0, "{stats}");
}
