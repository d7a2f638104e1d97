//! Published ports and outbound NAT with real clients and servers.

use std::time::{Duration, Instant};

use vswitch_tests::{Daemon, HttpServer, Netns, Outside, curl, require_root, secs, text};

/// A directory with an index and a 5 MB file of random bytes; returns it and the file's sha256.
fn webroot(d: &Daemon) -> (std::path::PathBuf, String) {
    let dir = d.dir.join("www");
    std::fs::create_dir_all(&dir).expect("www");
    std::fs::write(dir.join("index.html"), "hello from the container\n").expect("index");
    let out = vswitch_tests::run(
        std::process::Command::new("sh").args([
            "-c",
            &format!(
                "head -c 5000000 /dev/urandom > {0}/big.bin && sha256sum {0}/big.bin",
                dir.display()
            ),
        ]),
        secs(20),
    );
    let sum = text(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned();
    assert_eq!(sum.len(), 64);
    (dir, sum)
}

fn sha_of(ns: &str, url: &str) -> String {
    let out = vswitch_tests::run(
        std::process::Command::new("ip").args([
            "netns",
            "exec",
            ns,
            "sh",
            "-c",
            &format!("curl -s --max-time 20 {url} | sha256sum"),
        ]),
        secs(30),
    );
    text(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn published_ports_reach_the_container_with_the_clients_address() {
    require_root();
    let mut d = Daemon::start();
    let outside = Outside::new(&d);
    let (www, sum) = webroot(&d);
    d.ok(&["network", "create", "web", "--subnet", "10.96.0.0/24"]);
    let a = Netns::new("a");
    d.ok(&[
        "attach",
        "--network",
        "web",
        "--name",
        "tomcat81",
        "-p",
        "8081:8080",
        "-p",
        "127.0.0.1:8082:8080",
        "-p",
        "8080",
        &a.name,
    ]);
    let server = HttpServer::start(&a.name, 8080, &www);

    // From the host side over loopback: the connection is made inside the container's
    // namespace, so the container sees its own address.
    let (rc, body) = curl(&d.ns.name, &["http://127.0.0.1:8081/"]);
    assert_eq!((rc, body.as_str()), (0, "hello from the container\n"));
    // From a real outside client: the container sees the client's own address.
    let (rc, _) = curl(
        &outside.ns.name,
        &[&format!("http://{}:8081/", Outside::DAEMON_IP)],
    );
    assert_eq!(rc, 0);
    let log = server.log();
    let own = d.ip_of("web", "tomcat81");
    assert!(
        log.contains(&format!("{own} - -")),
        "loopback client appears as the container's own address {own}: {log}"
    );
    assert!(!log.contains("127.0.0.1"), "never as loopback: {log}");
    // Without a host IP the port is published on IPv6 too, as Docker does.
    let (rc, body) = curl(&d.ns.name, &["-g", "http://[::1]:8081/"]);
    assert_eq!(
        (rc, body.as_str()),
        (0, "hello from the container\n"),
        "[::1]"
    );
    assert!(
        log.contains("192.0.2.2 - -"),
        "outside client keeps its address: {log}"
    );
    // Host-IP binding: 8082 only on 127.0.0.1.
    assert_eq!(curl(&d.ns.name, &["http://127.0.0.1:8082/"]).0, 0);
    let (rc, _) = curl(
        &outside.ns.name,
        &[&format!("http://{}:8082/", Outside::DAEMON_IP)],
    );
    assert_ne!(rc, 0, "8082 is bound to loopback only");
    // Random host port, shown by `vswitch port`.
    let ports = d.ok(&["port", "tomcat81"]);
    assert!(ports.contains("8080/tcp -> 0.0.0.0:8081"), "{ports}");
    assert!(ports.contains("8080/tcp -> 127.0.0.1:8082"), "{ports}");
    let random: u16 = ports
        .lines()
        .filter(|l| !l.ends_with(":8081") && !l.ends_with(":8082"))
        .find_map(|l| l.rsplit(':').next()?.parse().ok())
        .expect("a random host port");
    assert!(random > 1024);
    let inspect = d.inspect("web");
    let entry = inspect["Containers"]
        .as_object()
        .and_then(|c| c.values().next())
        .cloned();
    let listed = entry.map(|e| e["Ports"].to_string()).unwrap_or_default();
    assert!(
        listed.contains("8080/tcp -> 0.0.0.0:8081"),
        "inspect shows ports: {listed}"
    );
    assert_eq!(
        curl(&d.ns.name, &[&format!("http://127.0.0.1:{random}/")]).0,
        0
    );
    // A multi-megabyte body arrives intact.
    assert_eq!(sha_of(&d.ns.name, "http://127.0.0.1:8081/big.bin"), sum);

    // 2000 sequential connections all succeed.
    let loop_ = d.ns.exec(
        &[
            "python3", "-c",
            "import socket\nok=0\nfor i in range(2000):\n  s=socket.create_connection(('127.0.0.1',8081),timeout=5)\n  s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n  d=b''\n  while True:\n    c=s.recv(65536)\n    if not c: break\n    d+=c\n  s.close()\n  ok+= b'200' in d\nprint(ok)",
        ],
        secs(240),
    );
    assert_eq!(
        text(&loop_.stdout).trim(),
        "2000",
        "{}",
        text(&loop_.stderr)
    );

    // After a crash and restart the published ports are bound again.
    d.kill9_and_restart();
    let back = vswitch_tests::wait_until(secs(10), || {
        curl(&d.ns.name, &["http://127.0.0.1:8081/"]).0 == 0
    });
    assert!(back, "published port serves again after restart");
    assert!(
        d.ok(&["port", "tomcat81"]).contains(&format!(":{random}")),
        "same random port"
    );

    // Detach closes the listeners.
    d.ok(&["detach", "tomcat81"]);
    assert_ne!(
        curl(&d.ns.name, &["http://127.0.0.1:8081/"]).0,
        0,
        "listener closed"
    );
}

/// A TCP server for the in-kernel path: per connection it logs the peer, reads until EOF, then
/// answers "<bytes read> <peer address>" and closes.
const COUNT_SERVER: &str = "import socket,threading,sys
log=open(sys.argv[2],'a',buffering=1)
l=socket.socket(); l.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)
l.bind(('0.0.0.0',int(sys.argv[1]))); l.listen(16)
def serve(c,a):
  log.write('conn %s\\n' % a[0]); n=0
  while True:
    b=c.recv(65536)
    if not b: break
    n+=len(b)
  try: c.sendall(('%d %s' % (n,a[0])).encode()); c.close()
  except OSError: pass
while True:
  c,a=l.accept(); threading.Thread(target=serve,args=(c,a),daemon=True).start()
";

/// Connects to 127.0.0.1:PORT, sends N bytes (then half-closes unless N is 0: then it only
/// waits) and prints what comes back until EOF, or the error.
const COUNT_CLIENT: &str = "import socket,sys
n=int(sys.argv[2])
try:
  s=socket.create_connection(('127.0.0.1',int(sys.argv[1])),timeout=20)
  if n:
    s.sendall(b'v'*n); s.shutdown(socket.SHUT_WR)
  d=b''
  while True:
    c=s.recv(65536)
    if not c: break
    d+=c
  print('got', d.decode())
except OSError as e:
  print('error', e)
";

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn loopback_clients_are_spliced_in_the_kernel_with_half_close_and_resets() {
    require_root();
    let d = Daemon::start();
    d.ok(&["network", "create", "web", "--subnet", "10.98.0.0/24"]);
    let a = Netns::new("a");
    d.ok(&[
        "attach",
        "--network",
        "web",
        "--name",
        "counter",
        "-p",
        "9001:9001",
        "-p",
        "9002:9002",
        &a.name,
    ]);
    let own = d.ip_of("web", "counter");
    let log = d.dir.join("count.log");
    let _server = vswitch_tests::NsDaemon::spawn(
        &a.name,
        &[
            "python3",
            "-c",
            COUNT_SERVER,
            "9001",
            &log.display().to_string(),
        ],
    );
    let client = |port: &str, n: &str| {
        text(
            &d.ns
                .exec(&["python3", "-c", COUNT_CLIENT, port, n], secs(30))
                .stdout,
        )
        .trim()
        .to_owned()
    };
    // Half-close both ways: the server only answers after it has seen the client's FIN, and
    // the client only stops reading at the server's FIN. 3 MB arrive intact. The peer is the
    // container's own address: proof the bytes did not go through the gateway.
    let ok = vswitch_tests::wait_until(secs(10), || {
        client("9001", "3000000") == format!("got 3000000 {own}")
    });
    assert!(
        ok,
        "half-close through the in-kernel path: {}",
        client("9001", "3000000")
    );

    // 50 connections at once, then nothing of them is left in the daemon (sockets, pipes).
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
            .map(|r| r.count())
            .unwrap_or(0)
    };
    let before = fds();
    let parallel = d.ns.exec(
        &[
            "python3",
            "-c",
            "import socket,threading\nok=[]\ndef one(i):\n  s=socket.create_connection(('127.0.0.1',9001),timeout=20)\n  s.sendall(b'p'*(1000+i)); s.shutdown(socket.SHUT_WR)\n  d=b''\n  while True:\n    c=s.recv(65536)\n    if not c: break\n    d+=c\n  ok.append(d.split()[0]==str(1000+i).encode())\nts=[threading.Thread(target=one,args=(i,)) for i in range(50)]\n[t.start() for t in ts]; [t.join() for t in ts]\nprint(sum(ok))",
        ],
        secs(60),
    );
    assert_eq!(
        text(&parallel.stdout).trim(),
        "50",
        "{}",
        text(&parallel.stderr)
    );
    assert!(
        vswitch_tests::wait_until(secs(5), || fds() <= before + 2),
        "daemon fds back to {before}: {}",
        fds()
    );

    // Nothing listens on 9002 in the container: the client is cut off at once, not left
    // hanging on an accepted connection.
    let started = Instant::now();
    let out = client("9002", "10");
    assert!(
        out.starts_with("error") || out == "got",
        "refused in the container: {out}"
    );
    assert!(
        started.elapsed() < secs(10),
        "refusal took {:?}",
        started.elapsed()
    );

    // An open connection ends when the endpoint is detached.
    let mut held = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &d.ns.name,
            "python3",
            "-c",
            COUNT_CLIENT,
            "9001",
            "0",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("client");
    let before = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .count();
    let connected = vswitch_tests::wait_until(secs(10), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count()
            > before
    });
    assert!(connected, "held connection reached the server");
    d.ok(&["detach", "counter"]);
    let ended = vswitch_tests::wait_until(secs(10), || matches!(held.try_wait(), Ok(Some(_))));
    if !ended {
        let _ = held.kill();
    }
    let _ = held.wait();
    assert!(ended, "detach ends spliced connections");
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn port_conflicts_are_clear_errors_that_leave_nothing_behind() {
    require_root();
    let d = Daemon::start();
    d.ok(&["network", "create", "web", "--subnet", "10.97.0.0/24"]);
    d.ok(&[
        "network",
        "create",
        "sealed",
        "--subnet",
        "10.98.0.0/24",
        "--internal",
    ]);
    let a = Netns::new("a");
    let b = Netns::new("b");
    d.ok(&["attach", "--network", "web", "-p", "8081:80", &a.name]);
    let before = d.ok(&["network", "inspect", "web"]);
    let err = d.fails(&["attach", "--network", "web", "-p", "8081:80", &b.name]);
    assert!(
        err.contains("8081") && err.contains("already in use"),
        "{err}"
    );
    let err = d.fails(&[
        "attach",
        "--network",
        "web",
        "-p",
        "9001:80",
        "-p",
        "9001:81",
        &b.name,
    ]);
    assert!(err.contains("given twice"), "{err}");
    let err = d.fails(&["attach", "--network", "web", "-p", "80:80:80:80", &b.name]);
    assert!(err.contains("invalid"), "{err}");
    let err = d.fails(&["attach", "--network", "sealed", "-p", "9002:80", &b.name]);
    assert!(err.contains("internal"), "{err}");
    assert_eq!(
        d.ok(&["network", "inspect", "web"]),
        before,
        "nothing changed"
    );
    assert_eq!(b.links(), vec!["lo"], "no device left behind");
    // The port that failed on b is still a's.
    assert!(d.ok(&["port", a.name.as_str()]).contains(":8081"));
    let c = Netns::new("c");
    d.ok(&[
        "attach",
        "--network",
        "web",
        "-p",
        "9100-9102:8000-8002/udp",
        &c.name,
    ]);
    let ports = d.ok(&["port", c.name.as_str()]);
    assert_eq!(
        ports.lines().count(),
        3,
        "a range is three mappings: {ports}"
    );
    assert!(ports.contains("8002/udp -> 0.0.0.0:9102"), "{ports}");

    // A host range for one container port takes the first free one (Docker's form): 8081 is
    // a's, so 8082; with the whole range taken, a clear error and nothing left behind.
    let e = Netns::new("e");
    d.ok(&["attach", "--network", "web", "-p", "8081-8083:80", &e.name]);
    let ports = d.ok(&["port", e.name.as_str()]);
    assert_eq!(ports.trim(), "80/tcp -> 0.0.0.0:8082", "{ports}");
    let f = Netns::new("f");
    let err = d.fails(&["attach", "--network", "web", "-p", "8081-8082:80", &f.name]);
    assert!(err.contains("no free host port in 8081-8082"), "{err}");
    assert_eq!(f.links(), vec!["lo"], "no device left behind");
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn containers_reach_the_outside_and_refusals_look_refused() {
    require_root();
    let d = Daemon::start();
    let outside = Outside::new(&d);
    let (www, sum) = webroot(&d);
    let _far = HttpServer::start(&outside.ns.name, 80, &www);
    d.ok(&["network", "create", "out", "--subnet", "10.99.0.0/24"]);
    let a = Netns::new("a");
    d.ok(&["attach", "--network", "out", &a.name]);
    let url = format!("http://{}/", Outside::IP);
    assert_eq!(
        curl(&a.name, &[&url]),
        (0, "hello from the container\n".to_owned())
    );
    assert_eq!(
        sha_of(&a.name, &format!("http://{}/big.bin", Outside::IP)),
        sum,
        "download intact"
    );
    // Ping reaches the outside (ping socket, or raw socket as root); an address nobody has
    // stays silent instead of being answered by the gateway.
    assert!(a.ping(Outside::IP), "outbound ping");
    assert!(!a.ping("192.0.2.99"), "no fake echo replies");
    // A closed port: refused at once (RST), not a connection that opens and dies.
    let started = Instant::now();
    let (rc, _) = curl(&a.name, &[&format!("http://{}:81/", Outside::IP)]);
    assert_eq!(rc, 7, "curl: couldn't connect");
    assert!(started.elapsed() < secs(3), "refusal was quick");

    // An internal network has no way out.
    d.ok(&[
        "network",
        "create",
        "sealed",
        "--subnet",
        "10.100.0.0/24",
        "--internal",
    ]);
    let s = Netns::new("s");
    d.ok(&["attach", "--network", "sealed", &s.name]);
    let (rc, _) = curl(&s.name, &["--connect-timeout", "2", &url]);
    assert_ne!(rc, 0, "internal network blocked");
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn hairpin_to_a_published_port_from_another_container() {
    require_root();
    let d = Daemon::start();
    let (www, _) = webroot(&d);
    d.ok(&["network", "create", "hp", "--subnet", "10.101.0.0/24"]);
    let a = Netns::new("a");
    let b = Netns::new("b");
    d.ok(&["attach", "--network", "hp", "-p", "8085:8080", &a.name]);
    d.ok(&["attach", "--network", "hp", &b.name]);
    let _srv = HttpServer::start(&a.name, 8080, &www);
    let (rc, body) = curl(&b.name, &["http://10.101.0.1:8085/"]);
    assert_eq!((rc, body.as_str()), (0, "hello from the container\n"));

    // The host's loopback services are not reachable through the gateway by default: only
    // published ports are.
    let _host_only = HttpServer::start(&d.ns.name, 8099, &www);
    assert_eq!(
        curl(&d.ns.name, &["http://127.0.0.1:8099/"]).0,
        0,
        "it does listen"
    );
    let (rc, _) = curl(
        &b.name,
        &["--connect-timeout", "3", "http://10.101.0.1:8099/"],
    );
    assert_eq!(rc, 7, "host loopback closed to containers");

    // Networks stay isolated through NAT: a container on another network is not reachable by
    // its address.
    d.ok(&["network", "create", "other", "--subnet", "10.103.0.0/24"]);
    let c = Netns::new("c");
    d.ok(&["attach", "--network", "other", &c.name]);
    let _srv_c = HttpServer::start(&c.name, 8080, &www);
    let (rc, _) = curl(
        &b.name,
        &["--connect-timeout", "3", "http://10.103.0.2:8080/"],
    );
    assert_ne!(rc, 0, "no path between networks");
}

const UDP_ECHO: &str = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',7000))\nwhile True:\n  d,a=s.recvfrom(65535)\n  s.sendto(d+(' from %s:%d'%a).encode(),a)";
const UDP_ASK: &str = "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(3)\ns.sendto(b'hello',(sys.argv[1],int(sys.argv[2])))\nprint(s.recvfrom(200)[0].decode())";

fn udp_ask(ns: &str, ip: &str, port: &str) -> String {
    let out = vswitch_tests::run(
        std::process::Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", UDP_ASK, ip, port]),
        secs(10),
    );
    text(&out.stdout).trim().to_owned()
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn udp_published_and_outbound() {
    require_root();
    let d = Daemon::start();
    let outside = Outside::new(&d);
    d.ok(&["network", "create", "u", "--subnet", "10.102.0.0/24"]);
    let a = Netns::new("a");
    d.ok(&["attach", "--network", "u", "-p", "7001:7000/udp", &a.name]);
    let _echo = vswitch_tests::NsDaemon::spawn(&a.name, &["python3", "-c", UDP_ECHO]);
    let _far = vswitch_tests::NsDaemon::spawn(&outside.ns.name, &["python3", "-c", UDP_ECHO]);
    std::thread::sleep(Duration::from_millis(500));
    // Published: from loopback (seen as the gateway) and from outside (seen as itself).
    let r = udp_ask(&d.ns.name, "127.0.0.1", "7001");
    assert!(r.starts_with("hello from 10.102.0.1:"), "{r}");
    let r = udp_ask(&outside.ns.name, Outside::DAEMON_IP, "7001");
    assert!(r.starts_with("hello from 192.0.2.2:"), "{r}");
    assert!(
        d.ok(&["port", &a.name])
            .contains("7000/udp -> 0.0.0.0:7001")
    );
    // Outbound: the outside sees the daemon's address.
    let r = udp_ask(&a.name, Outside::IP, "7000");
    assert!(r.starts_with("hello from 192.0.2.1:"), "{r}");

    // A peer sprays the published port from 4200 source ports, more than the whole flow table
    // holds. New clients of the port and the container's own outbound UDP still get through.
    let spray = vswitch_tests::run(
        std::process::Command::new("ip").args([
            "netns",
            "exec",
            &outside.ns.name,
            "python3",
            "-c",
            SPRAY,
            Outside::DAEMON_IP,
            "7001",
            "4200",
        ]),
        secs(60),
    );
    assert!(spray.status.success(), "{}", text(&spray.stderr));
    std::thread::sleep(Duration::from_secs(1));
    let r = udp_ask(&outside.ns.name, Outside::DAEMON_IP, "7001");
    assert!(
        r.starts_with("hello from 192.0.2.2:"),
        "a new client after the spray: {r}"
    );
    let r = udp_ask(&a.name, Outside::IP, "7000");
    assert!(
        r.starts_with("hello from 192.0.2.1:"),
        "outbound after the spray: {r}"
    );
}

/// One datagram from each of N source ports (20000 up), paced so that the daemon's socket
/// buffer does not drop them.
const SPRAY: &str = "import socket,sys,time\nfor i in range(int(sys.argv[3])):\n  s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n  s.bind(('0.0.0.0',20000+i))\n  s.sendto(b'x',(sys.argv[1],int(sys.argv[2])))\n  s.close()\n  if i%50==49: time.sleep(0.02)";

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn a_host_port_taken_while_the_daemon_was_down_costs_the_mapping_not_the_endpoint() {
    require_root();
    let mut d = Daemon::start();
    d.ok(&["network", "create", "rs", "--subnet", "10.103.0.0/24"]);
    let a = Netns::new("a");
    d.ok(&[
        "attach",
        "--network",
        "rs",
        "--name",
        "keep",
        "-p",
        "18081:80",
        "-p",
        "18082:81",
        &a.name,
    ]);
    let ns = d.ns.name.clone();
    let mut squatter = None;
    d.kill9_and_restart_after(|| {
        // Somebody else takes 18081 while the daemon is down.
        let p = vswitch_tests::NsDaemon::spawn(
            &ns,
            &[
                "python3",
                "-c",
                "import socket,time\ns=socket.socket()\ns.bind(('0.0.0.0',18081))\ns.listen()\ntime.sleep(120)",
            ],
        );
        let bound = vswitch_tests::wait_until(secs(10), || {
            let out = vswitch_tests::run(
                std::process::Command::new("ip")
                    .args(["netns", "exec", &ns, "ss", "-Hltn", "sport = :18081"]),
                secs(5),
            );
            !text(&out.stdout).trim().is_empty()
        });
        assert!(bound, "the squatter holds 18081");
        squatter = Some(p);
    });
    // The endpoint is back, with the mapping it could still bind.
    assert_eq!(d.ip_of("rs", "keep"), "10.103.0.2");
    assert!(
        a.ping_within("10.103.0.1", secs(5)),
        "the container keeps its network"
    );
    let ports = d.ok(&["port", "keep"]);
    assert!(ports.contains(":18082"), "{ports}");
    assert!(!ports.contains(":18081"), "{ports}");
    assert!(
        d.log().contains("published port dropped at restart"),
        "logged"
    );
    drop(squatter);
}
