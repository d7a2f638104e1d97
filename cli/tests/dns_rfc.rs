//! The embedded DNS server as resolvers that check their answers see it: dig, glibc, and a
//! dnsmasq upstream whose query log shows what reached it. What is not a container name must
//! reach the upstream (the root, TLD delegations), what is must not leak, and answers follow
//! the RFCs (opcode and question echoed, BADVERS, OPT on SERVFAIL, no zone transfers).

use std::path::PathBuf;
use std::time::Instant;

use vswitch_tests::{Daemon, Netns, NsDaemon, require_root, secs, text, wait_until};

const UPSTREAM_PORT: &str = "5389";
const OWN_UPSTREAM_PORT: &str = "5388";

/// A daemon whose upstream is a dnsmasq in its namespace that logs every query it gets and
/// answers example.test with 192.0.2.7 (and nothing else: it has no upstream of its own).
struct Scene {
    d: Daemon,
    upstream: NsDaemon,
    log: PathBuf,
}

impl Scene {
    fn new() -> Self {
        Self::with(&[])
    }

    /// A scene whose daemon has these flags too.
    fn with(extra: &[&str]) -> Self {
        let upstream = format!("127.0.0.1:{UPSTREAM_PORT}");
        let mut args = vec!["--dns-upstream", upstream.as_str()];
        args.extend_from_slice(extra);
        let d = Daemon::start_with(&args);
        let log = std::env::temp_dir().join(format!("{}-dnsmasq.log", d.ns.name));
        let upstream = dnsmasq(&d, UPSTREAM_PORT, "192.0.2.7", &log);
        Self { d, upstream, log }
    }

    /// Whether the upstream was asked `what` (as dnsmasq logs it: `query[NS] . from`).
    fn asked(&self, what: &str) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|l| l.contains(what))
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A dnsmasq on 127.0.0.1:`port` in the daemon's namespace, logging its queries to `log`.
fn dnsmasq(d: &Daemon, port: &str, example: &str, log: &std::path::Path) -> NsDaemon {
    let up = d.ns.exec(&["ip", "link", "set", "lo", "up"], secs(5));
    assert!(up.status.success());
    let server = NsDaemon::spawn(
        &d.ns.name,
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--port",
            port,
            "--listen-address",
            "127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            &format!("--address=/example.test/{example}"),
            "--log-queries",
            &format!("--log-facility={}", log.display()),
            "--pid-file=",
        ],
    );
    let ready = wait_until(secs(5), || {
        d.ns.dig(&["@127.0.0.1", "-p", port, "+short", "example.test"])
            .contains(example)
    });
    assert!(ready, "dnsmasq on port {port} did not come up");
    server
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
fn the_root_and_tlds_reach_the_upstream_and_short_names_do_not_leak() {
    require_root();
    let s = Scene::new();
    // A network named like a TLD: the case where a search domain sent `db` to `db.dev`.
    s.d.ok(&["network", "create", "dev", "--subnet", "10.94.0.0/24"]);
    let a = Netns::new("a");
    s.d.ok(&["attach", "--network", "dev", "--name", "web", &a.name]);
    let resolv =
        std::fs::read_to_string(format!("/etc/netns/{}/resolv.conf", a.name)).expect("resolv");
    assert!(!resolv.contains("search"), "no search line: {resolv}");
    assert!(resolv.contains("nameserver 10.94.0.1"), "{resolv}");

    // What a validating resolver asks first goes upstream, whatever the answer there.
    for (args, logged) in [
        (vec![".", "NS"], "query[NS] . from"),
        (vec![".", "DNSKEY"], "query[DNSKEY] . from"),
        (vec!["com", "DS"], "query[DS] com from"),
        (vec!["arpa", "NS"], "query[NS] arpa from"),
    ] {
        let out = a.dig(&args);
        assert_ne!(status(&out), "NXDOMAIN", "{args:?} answered locally: {out}");
        assert!(
            wait_until(secs(3), || s.asked(logged)),
            "{args:?} did not reach the upstream"
        );
    }

    // A short name that is no container: NXDOMAIN at once, through glibc too, and the upstream
    // hears neither `db` nor `db.dev`.
    assert_eq!(status(&a.dig(&["db"])), "NXDOMAIN");
    let started = Instant::now();
    let getent = a.exec(&["getent", "ahosts", "db"], secs(30));
    assert!(!getent.status.success(), "{}", text(&getent.stdout));
    assert!(
        started.elapsed() < secs(3),
        "getent took {:?}",
        started.elapsed()
    );
    assert!(!s.asked("db.dev"), "the short name leaked upstream");
    assert!(!s.asked(" db from"), "the short name leaked upstream");
    // The container's own name still resolves through glibc.
    let getent = a.exec(&["getent", "ahosts", "web"], secs(10));
    assert!(text(&getent.stdout).contains("10.94.0.2"));
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn answers_follow_the_rfcs_for_opcodes_edns_transfers_and_empty_names() {
    require_root();
    let s = Scene::new();
    s.d.ok(&["network", "create", "lab", "--subnet", "10.95.0.0/24"]);
    let a = Netns::new("a");
    s.d.ok(&["attach", "--network", "lab", "--name", "box", &a.name]);

    // NOTIFY: NOTIMP with the opcode and the question echoed, so dig accepts it.
    let out = a.dig(&["+opcode=notify", "lab", "SOA"]);
    assert!(out.contains("opcode: NOTIFY, status: NOTIMP"), "{out}");
    assert!(!out.contains("mismatch"), "{out}");
    assert!(out.contains(";lab.\t"), "question echoed: {out}");

    // EDNS version 1: BADVERS.
    let out = a.dig(&["+edns=1", "+noednsnegotiation", "box"]);
    assert_eq!(status(&out), "BADVERS", "{out}");

    // The network's own name, with names under it: NODATA, not NXDOMAIN.
    let out = a.dig(&["lab"]);
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert!(out.contains("ANSWER: 0"), "{out}");
    assert_eq!(a.dig(&["+short", "box.lab"]).trim(), "10.95.0.2");

    // No zone transfers.
    let out = a.dig(&["lab", "AXFR"]);
    assert!(out.contains("Transfer failed"), "{out}");

    // SERVFAIL to an EDNS query carries an OPT record.
    s.upstream.signal("STOP");
    let out = a.dig(&["+edns=0", "+time=8", "down.example.test"]);
    s.upstream.signal("CONT");
    assert_eq!(status(&out), "SERVFAIL", "{out}");
    assert!(out.contains("OPT PSEUDOSECTION"), "{out}");
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn the_host_and_localhost_names_resolve_for_dig_and_containers() {
    require_root();
    let s = Scene::new();
    s.d.ok(&["network", "create", "out", "--subnet", "10.96.0.0/24"]);
    s.d.ok(&[
        "network",
        "create",
        "sealed",
        "--internal",
        "--subnet",
        "10.96.1.0/24",
    ]);
    let a = Netns::new("a");
    let z = Netns::new("z");
    s.d.ok(&["attach", "--network", "out", &a.name]);
    s.d.ok(&["attach", "--network", "sealed", &z.name]);
    for name in ["host.containers.internal", "host.docker.internal"] {
        assert_eq!(a.dig(&["+short", name]).trim(), "10.96.0.1", "{name}");
        assert_eq!(status(&z.dig(&[name])), "NXDOMAIN", "no way out: {name}");
    }
    assert_eq!(a.dig(&["+short", "localhost"]).trim(), "127.0.0.1");
    assert_eq!(a.dig(&["+short", "localhost", "AAAA"]).trim(), "::1");
    assert!(!s.asked("localhost"), "localhost went upstream");
    // A container of `vswitch run` has them in its /etc/hosts.
    let run = s.d.vs(&[
        "run",
        "--network",
        "out",
        "--",
        "getent",
        "hosts",
        "host.docker.internal",
    ]);
    let out = text(&run.stdout);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(out.starts_with("10.96.0.1"), "{out}");
    let run =
        s.d.vs(&["run", "--network", "out", "--", "cat", "/etc/resolv.conf"]);
    let out = text(&run.stdout);
    assert!(
        out.contains("nameserver 10.96.0.1") && !out.contains("search"),
        "{out}"
    );
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn a_network_forwards_to_its_own_dns_servers() {
    require_root();
    // The servers are on the daemon's loopback, which containers may then reach anyway.
    let s = Scene::with(&["--allow-host-loopback"]);
    let own_log = std::env::temp_dir().join(format!("{}-own.log", s.d.ns.name));
    let _own = dnsmasq(&s.d, OWN_UPSTREAM_PORT, "192.0.2.99", &own_log);
    let own = format!("127.0.0.1:{OWN_UPSTREAM_PORT}");
    s.d.ok(&[
        "network",
        "create",
        "mine",
        "--subnet",
        "10.97.0.0/24",
        "--dns",
        &own,
    ]);
    s.d.ok(&["network", "create", "theirs", "--subnet", "10.97.1.0/24"]);
    let opt = &s.d.inspect("mine")["Options"]["com.vswitch.network.dns"];
    assert_eq!(opt.as_str(), Some(own.as_str()), "shown in inspect");
    let m = Netns::new("m");
    let t = Netns::new("t");
    s.d.ok(&["attach", "--network", "mine", &m.name]);
    s.d.ok(&["attach", "--network", "theirs", &t.name]);
    assert_eq!(m.dig(&["+short", "example.test"]).trim(), "192.0.2.99");
    assert_eq!(
        m.dig(&["+tcp", "+short", "example.test"]).trim(),
        "192.0.2.99"
    );
    assert_eq!(t.dig(&["+short", "example.test"]).trim(), "192.0.2.7");
    // Bad servers are one clear line and no network.
    let err =
        s.d.fails(&["network", "create", "bad", "--dns", "dns.example"]);
    assert!(err.contains("invalid DNS upstream"), "{err}");
    let err = s.d.fails(&[
        "network",
        "create",
        "bad",
        "--internal",
        "--dns",
        "192.0.2.1",
    ]);
    assert!(err.contains("internal"), "{err}");
    // (By the NAME column: a hex id may contain "bad".)
    let ls = s.d.ok(&["network", "ls"]);
    assert!(
        !ls.lines()
            .any(|l| l.split_whitespace().nth(1) == Some("bad")),
        "{ls}"
    );
    let _ = std::fs::remove_file(&own_log);
}

/// A resolv.conf that an earlier version wrote with a `search` line is rewritten when the
/// daemon starts, in place, so that namespaces and running containers that have it bound see
/// the new one.
#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn resolv_conf_files_of_an_earlier_version_are_rewritten_at_start() {
    require_root();
    let mut d = Daemon::start();
    d.ok(&["network", "create", "dev", "--subnet", "10.98.0.0/24"]);
    let a = Netns::new("a");
    d.ok(&["attach", "--network", "dev", &a.name]);
    let id = d
        .ok(&[
            "run",
            "-d",
            "--name",
            "c1",
            "--network",
            "dev",
            "--",
            "sleep",
            "600",
        ])
        .trim()
        .to_owned();
    let old = "nameserver 10.98.0.1\nsearch dev\noptions ndots:0\n";
    let netns_file = PathBuf::from(format!("/etc/netns/{}/resolv.conf", a.name));
    let container_file = d.state.join("containers").join(&id).join("resolv.conf");
    d.kill9_and_restart_after(|| {
        std::fs::write(
            &netns_file,
            format!("# written by vswitch for network dev\n{old}"),
        )
        .expect("write");
        std::fs::write(&container_file, old).expect("write");
    });
    let new = |path: &PathBuf| std::fs::read_to_string(path).is_ok_and(|t| !t.contains("search"));
    assert!(
        wait_until(secs(5), || new(&netns_file) && new(&container_file)),
        "not rewritten:\n{}\n{}",
        std::fs::read_to_string(&netns_file).unwrap_or_default(),
        std::fs::read_to_string(&container_file).unwrap_or_default()
    );
    // The running container sees it: the file was rewritten in place.
    let inside = d.ok(&["exec", "c1", "--", "cat", "/etc/resolv.conf"]);
    assert!(!inside.contains("search"), "{inside}");
    assert!(inside.contains("nameserver 10.98.0.1"), "{inside}");
    d.ok(&["rm", "-f", "c1"]);
}

/// A validating resolver in a container, with the gateway as its server, checks a name of a
/// root zone signed here: it fetches the root's DNSKEY through the gateway, which must pass it
/// on (an NXDOMAIN for `.` made every validation fail). delv is BIND's validating resolver;
/// ldns-testns serves the signed records from the daemon's namespace.
#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn a_validating_resolver_walks_down_from_a_locally_signed_root() {
    require_root();
    const PORT: &str = "5387";
    let d = Daemon::start_with(&["--dns-upstream", &format!("127.0.0.1:{PORT}")]);
    let dir = std::env::temp_dir().join(vswitch_tests::unique("-dnssec"));
    let _cleanup = vswitch_tests::TempDir(dir.clone());
    std::fs::create_dir_all(&dir).expect("mkdir");
    let anchors = sign_a_root(&dir);
    let up = d.ns.exec(&["ip", "link", "set", "lo", "up"], secs(5));
    assert!(up.status.success());
    let data = dir.join("testns.data");
    let _root = NsDaemon::spawn(
        &d.ns.name,
        &["ldns-testns", "-p", PORT, data.to_str().expect("path")],
    );
    assert!(
        wait_until(secs(5), || {
            d.ns.dig(&["@127.0.0.1", "-p", PORT, "+short", "www.test"])
                .contains("192.0.2.10")
        }),
        "the signed root did not come up"
    );
    d.ok(&["network", "create", "sec", "--subnet", "10.99.0.0/24"]);
    let a = Netns::new("a");
    d.ok(&["attach", "--network", "sec", &a.name]);
    let out = a.exec(
        &[
            "delv",
            "-a",
            anchors.to_str().expect("path"),
            "www.test",
            "A",
        ],
        secs(20),
    );
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(all.contains("; fully validated"), "{all}");
    assert!(all.contains("192.0.2.10"), "{all}");
}

/// Makes a root zone with `www.test A 192.0.2.10`, signs it with a fresh key, writes the
/// records ldns-testns serves (`testns.data`) and returns delv's trust-anchor file.
fn sign_a_root(dir: &std::path::Path) -> PathBuf {
    let sh = |cmd: &mut std::process::Command| {
        let out = vswitch_tests::run(cmd.current_dir(dir), secs(20));
        assert!(out.status.success(), "{cmd:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let key =
        sh(std::process::Command::new("ldns-keygen").args(["-a", "ECDSAP256SHA256", "-k", "."]));
    let key = key.trim();
    let dnskey = std::fs::read_to_string(dir.join(format!("{key}.key"))).expect("key");
    let zone = format!(
        ".\t3600\tIN\tSOA\tns. admin. 1 3600 600 86400 60\n\
         .\t3600\tIN\tNS\tns.\n\
         ns.\t3600\tIN\tA\t192.0.2.53\n\
         www.test.\t3600\tIN\tA\t192.0.2.10\n{dnskey}"
    );
    std::fs::write(dir.join("root.zone"), zone).expect("zone");
    sh(std::process::Command::new("ldns-signzone").args(["root.zone", key]));
    let signed = std::fs::read_to_string(dir.join("root.zone.signed")).expect("signed");
    let records: Vec<Vec<&str>> = signed
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .map(|l| {
            l.split(';')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect()
        })
        .collect();
    let mut data = String::new();
    for (name, rtype) in [
        (".", "DNSKEY"),
        ("www.test.", "A"),
        (".", "SOA"),
        (".", "NS"),
    ] {
        data.push_str(&format!(
            "ENTRY_BEGIN\nMATCH opcode qtype qname\nADJUST copy_id\nREPLY QR AA NOERROR\n\
             SECTION QUESTION\n{name} IN {rtype}\nSECTION ANSWER\n"
        ));
        for r in &records {
            let covers = r.get(3) == Some(&rtype)
                || (r.get(3) == Some(&"RRSIG") && r.get(4) == Some(&rtype));
            if r.first() == Some(&name) && covers {
                data.push_str(&r.join(" "));
                data.push('\n');
            }
        }
        data.push_str("ENTRY_END\n\n");
    }
    std::fs::write(dir.join("testns.data"), data).expect("data");
    let public = dnskey
        .split_whitespace()
        .nth(6)
        .expect("the key's public part");
    let anchors = dir.join("anchors.conf");
    std::fs::write(
        &anchors,
        format!("trust-anchors {{ . static-key 257 3 13 \"{public}\"; }};\n"),
    )
    .expect("anchors");
    anchors
}
