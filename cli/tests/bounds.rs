//! What a hostile container can make the daemon hold, measured from `/proc/PID/status` with
//! generous margins (`benches/bounds.sh` gives the exact figures): held SYNs cost next to
//! nothing, established flows what their bounded buffers hold, and all of it goes back when
//! the flows end.

use std::time::Duration;

use vswitch_tests::{Daemon, Netns, NsDaemon, Outside, require_root, secs, text, wait_until};

const MIB: u64 = 1024;

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// The network's TCP flows, held SYNs included.
fn tcp_flows(d: &Daemon, network: &str) -> u64 {
    d.stats(network)["TcpFlows"].as_u64().expect("TcpFlows")
}

/// Runs a Python script inside `ns` in the background (killed on drop).
fn python(ns: &str, script: &str) -> NsDaemon {
    NsDaemon::spawn(ns, &["python3", "-c", script])
}

/// A container opens thousands of connections to a destination that drops SYNs, then many
/// connections that receive a lot and read nothing: the daemon's memory stays within what
/// the flow bounds allow, and comes back once the flows are over.
#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn pending_and_stuffed_connections_hold_bounded_memory_and_give_it_back() {
    require_root();
    let d = Daemon::start();
    let outside = Outside::new(&d);
    for rule in [
        "add table inet vst",
        "add chain inet vst input { type filter hook input priority 0; }",
        "add rule inet vst input tcp dport 9 drop",
    ] {
        let args: Vec<&str> = std::iter::once("nft").chain(rule.split(' ')).collect();
        let out = outside.ns.exec(&args, secs(5));
        assert!(out.status.success(), "nft {rule}: {}", text(&out.stderr));
    }
    // Port 8000 outside: 1 MiB to every client, then it waits for the client to go.
    let _sink = python(
        &outside.ns.name,
        "import socket, threading\n\
         def serve(c):\n    try:\n        c.sendall(b'x' * (1 << 20)); c.recv(1)\n    except OSError: pass\n    c.close()\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', 8000)); s.listen(1024)\n\
         while True:\n    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()\n",
    );
    d.ok(&["network", "create", "mem", "--subnet", "10.124.0.0/24"]);
    let c = Netns::new("c");
    d.ok(&["attach", "--network", "mem", &c.name]);
    let ready = wait_until(secs(10), || {
        c.exec(
            &[
                "python3",
                "-c",
                &format!(
                    "import socket; socket.create_connection(('{}', 8000), 2).recv(1)",
                    Outside::IP
                ),
            ],
            secs(5),
        )
        .status
        .success()
    });
    assert!(ready, "the sink answers");
    wait_until(secs(10), || tcp_flows(&d, "mem") == 0);
    let base = rss_kib(d.pid());

    // 3000 connections whose SYNs are dropped outside.
    let pending = python(
        &c.name,
        &format!(
            "import resource, socket, time\n\
             resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))\n\
             socks = []\n\
             for i in range(3000):\n    s = socket.socket(); s.setblocking(False); s.connect_ex(('{}', 9)); socks.append(s)\n\
             time.sleep(120)\n",
            Outside::IP
        ),
    );
    assert!(
        wait_until(secs(20), || tcp_flows(&d, "mem") >= 2900),
        "held: {}",
        tcp_flows(&d, "mem")
    );
    let held = rss_kib(d.pid()).saturating_sub(base);
    drop(pending);
    // Their dials give up (10 s) and the container is refused.
    assert!(
        wait_until(secs(40), || tcp_flows(&d, "mem") == 0),
        "flows left: {}",
        tcp_flows(&d, "mem")
    );
    wait_until(secs(15), || {
        rss_kib(d.pid()).saturating_sub(base) < 16 * MIB
    });
    let after_held = rss_kib(d.pid()).saturating_sub(base);

    // 200 connections that are sent 1 MiB each and read none of it.
    let stuffed = python(
        &c.name,
        &format!(
            "import socket, time\n\
             socks = [socket.create_connection(('{}', 8000), 5) for _ in range(200)]\n\
             time.sleep(120)\n",
            Outside::IP
        ),
    );
    assert!(wait_until(secs(20), || tcp_flows(&d, "mem") >= 200));
    // Let the buffers fill.
    std::thread::sleep(Duration::from_secs(3));
    let stuffed_rss = rss_kib(d.pid()).saturating_sub(base);
    drop(stuffed);
    assert!(
        wait_until(secs(30), || tcp_flows(&d, "mem") == 0),
        "flows left: {}",
        tcp_flows(&d, "mem")
    );
    // The daemon hands freed heap memory back every 10 s (two rounds, and time for the flows
    // to close on a machine busy with other tests).
    wait_until(secs(30), || {
        rss_kib(d.pid()).saturating_sub(base) < 24 * MIB
    });
    let after_stuffed = rss_kib(d.pid()).saturating_sub(base);

    eprintln!(
        "daemon RSS over {base} KiB: 3000 held SYNs +{held} KiB, after +{after_held} KiB; \
         200 stuffed flows +{stuffed_rss} KiB, after +{after_stuffed} KiB"
    );
    assert!(held < 64 * MIB, "3000 held SYNs cost {held} KiB");
    assert!(
        after_held < 16 * MIB,
        "{after_held} KiB kept after the held SYNs"
    );
    // 64 large flows (a 1 MiB send buffer each, and nothing queued beside it) and 136 small
    // ones.
    assert!(
        stuffed_rss < 256 * MIB,
        "200 stuffed flows cost {stuffed_rss} KiB"
    );
    assert!(
        after_stuffed < 24 * MIB,
        "{after_stuffed} KiB kept after the stuffed flows"
    );
}
