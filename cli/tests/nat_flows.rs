//! TCP flows through the gateway's own stack (a published port's outside client, and a
//! container's outbound connection): bytes both ways, half-closes, resets, and nothing left
//! behind.

use vswitch_tests::{Daemon, Netns, NsDaemon, Outside, require_root, secs, text};

/// Per connection: reads until EOF, then sends "<peer address>\n" and as many bytes as it
/// read, and closes. A connection whose first bytes are "reset" is reset at once instead; one
/// the peer resets is logged as "reset <peer>" in the log file.
const SERVER: &str = "import socket,struct,threading,sys
log=open(sys.argv[2],'a',buffering=1)
l=socket.socket(); l.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)
l.bind(('0.0.0.0',int(sys.argv[1]))); l.listen(64)
def serve(c,a):
  n=0; first=b''
  try:
    while True:
      b=c.recv(262144)
      if not b: break
      if n==0: first=b[:5]
      n+=len(b)
      if first==b'reset':
        c.setsockopt(socket.SOL_SOCKET,socket.SO_LINGER,struct.pack('ii',1,0)); c.close(); return
  except ConnectionResetError:
    log.write('reset %s\\n' % a[0]); return
  c.sendall(('%s\\n' % a[0]).encode()); c.sendall(b'r'*n); c.close()
while True:
  c,a=l.accept(); threading.Thread(target=serve,args=(c,a),daemon=True).start()
";

/// Connects to HOST:PORT and sends N bytes, then half-closes and prints "<first line> <bytes
/// after it>" once the server closes. With "reset" as N it sends that word and prints what
/// ending it saw; with "abort" it sends 100 kB and resets the connection itself; with "hold"
/// it waits for the connection to end.
const CLIENT: &str = "import socket,struct,sys,time
s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=20)
arg=sys.argv[3]
if arg=='hold':
  s.settimeout(60)
  try: print('ended', len(s.recv(10)))
  except ConnectionResetError: print('ended reset')
  sys.exit()
if arg=='abort':
  s.sendall(b'a'*100000); time.sleep(0.5)
  s.setsockopt(socket.SOL_SOCKET,socket.SO_LINGER,struct.pack('ii',1,0)); s.close(); print('aborted'); sys.exit()
try:
  s.sendall(b'reset' if arg=='reset' else b'v'*int(arg)); s.shutdown(socket.SHUT_WR)
  d=b''
  while True:
    c=s.recv(262144)
    if not c: break
    d+=c
  head,_,rest=d.partition(b'\\n')
  print(head.decode(), len(rest), rest.count(b'r'))
except ConnectionResetError:
  print('reset')
";

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn gateway_flows_carry_bytes_half_closes_and_resets_both_ways() {
    require_root();
    let d = Daemon::start();
    let outside = Outside::new(&d);
    d.ok(&["network", "create", "flows", "--subnet", "10.101.0.0/24"]);
    let a = Netns::new("a");
    d.ok(&[
        "attach",
        "--network",
        "flows",
        "--name",
        "svc",
        "-p",
        "9001:9001",
        &a.name,
    ]);
    let inside_log = d.dir.join("inside.log");
    let outside_log = d.dir.join("outside.log");
    let _inside = NsDaemon::spawn(
        &a.name,
        &[
            "python3",
            "-c",
            SERVER,
            "9001",
            &inside_log.display().to_string(),
        ],
    );
    let _far = NsDaemon::spawn(
        &outside.ns.name,
        &[
            "python3",
            "-c",
            SERVER,
            "9001",
            &outside_log.display().to_string(),
        ],
    );
    let client = |ns: &str, host: &str, arg: &str| {
        let out = vswitch_tests::run(
            std::process::Command::new("ip").args([
                "netns", "exec", ns, "python3", "-c", CLIENT, host, "9001", arg,
            ]),
            secs(40),
        );
        format!("{}{}", text(&out.stdout).trim(), text(&out.stderr).trim())
    };
    let published = |arg: &str| client(&outside.ns.name, Outside::DAEMON_IP, arg);
    let outbound = |arg: &str| client(&a.name, Outside::IP, arg);
    assert!(
        vswitch_tests::wait_until(secs(10), || published("1").starts_with(Outside::IP)),
        "the published port answers: {}",
        published("1")
    );

    // 3 MB each way with a half-close in between: the server answers only after the client's
    // FIN, and the client reads until the server's. The container sees the client as itself;
    // the outside sees the daemon.
    let big = "3000000";
    assert_eq!(
        published(big),
        format!("{} 3000000 3000000", Outside::IP),
        "published port, outside client"
    );
    assert_eq!(
        outbound(big),
        format!("{} 3000000 3000000", Outside::DAEMON_IP),
        "outbound"
    );

    // A reset on one side is a reset on the other, never a clean end.
    assert_eq!(published("reset"), "reset", "the container resets");
    assert_eq!(outbound("reset"), "reset", "the outside resets");
    assert_eq!(published("abort"), "aborted");
    assert_eq!(outbound("abort"), "aborted");
    let logged = |log: &std::path::Path, peer: &str| {
        vswitch_tests::wait_until(secs(10), || {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .contains(&format!("reset {peer}"))
        })
    };
    assert!(
        logged(&inside_log, Outside::IP),
        "the container saw the client's reset"
    );
    assert!(
        logged(&outside_log, Outside::DAEMON_IP),
        "the outside saw the container's reset"
    );

    // 40 connections at once each way, then the daemon holds no more sockets than before.
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
            .map(|r| r.count())
            .unwrap_or(0)
    };
    let before = fds();
    let parallel = |ns: &str, host: &str| {
        let script = format!(
            "import subprocess,sys\n\
             ps=[subprocess.Popen([sys.executable,'-c',sys.argv[1],'{host}','9001',str(50000+i)],stdout=subprocess.PIPE) for i in range(40)]\n\
             ok=sum(p.communicate()[0].split()[1:]==[str(50000+i).encode()]*2 for i,p in enumerate(ps))\n\
             print(ok)"
        );
        let out = vswitch_tests::run(
            std::process::Command::new("ip")
                .args(["netns", "exec", ns, "python3", "-c", &script, CLIENT]),
            secs(90),
        );
        text(&out.stdout).trim().to_owned()
    };
    assert_eq!(parallel(&outside.ns.name, Outside::DAEMON_IP), "40");
    assert_eq!(parallel(&a.name, Outside::IP), "40");
    assert!(
        vswitch_tests::wait_until(secs(10), || fds() <= before + 2),
        "daemon fds back to {before}: {}",
        fds()
    );
    let flows = || d.stats("flows")["TcpFlows"].as_u64();
    assert!(
        vswitch_tests::wait_until(secs(10), || flows() == Some(0)),
        "no flows left: {:?}",
        flows()
    );

    // A client held open on the published port, and a connection the container holds open
    // to the outside, are cut off when the endpoint is detached, not left until the flows
    // time out.
    let resets_outside = || {
        std::fs::read_to_string(&outside_log)
            .unwrap_or_default()
            .matches(&format!("reset {}", Outside::DAEMON_IP))
            .count()
    };
    let before_detach = resets_outside();
    let _out = NsDaemon::spawn(
        &a.name,
        &["python3", "-c", CLIENT, Outside::IP, "9001", "hold"],
    );
    let mut held = std::process::Command::new("ip")
        .args(["netns", "exec", &outside.ns.name, "python3", "-c", CLIENT])
        .args([Outside::DAEMON_IP, "9001", "hold"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("client");
    assert!(
        vswitch_tests::wait_until(secs(10), || flows() == Some(2)),
        "the held connections are flows: {:?}",
        flows()
    );
    d.ok(&["detach", "svc"]);
    let ended = vswitch_tests::wait_until(secs(10), || matches!(held.try_wait(), Ok(Some(_))));
    if !ended {
        let _ = held.kill();
    }
    let out = held.wait_with_output().expect("client output");
    assert!(ended, "detach ends gateway flows");
    assert_eq!(text(&out.stdout).trim(), "ended reset");
    assert!(
        vswitch_tests::wait_until(secs(10), || resets_outside() > before_detach),
        "the container's own connection to the outside is reset at detach"
    );
}
