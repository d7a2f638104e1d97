//! `vswitch run` and friends: every network mode, exit codes, exec, stop/start/rm, logs,
//! container:X semantics, and containers surviving a daemon restart.

use vswitch_tests::{Daemon, curl, require_root, secs, text, wait_until};

/// Runs the client and returns (exit code, stdout, stderr).
fn vs(d: &Daemon, args: &[&str]) -> (i32, String, String) {
    let out = d.vs(args);
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn run_modes_exit_codes_and_exec() {
    require_root();
    let d = Daemon::start();
    d.ok(&[
        "network",
        "create",
        "you_network",
        "--subnet",
        "10.110.0.0/24",
    ]);
    // Foreground: output streamed, exit code returned.
    let (code, out, _) = vs(
        &d,
        &["run", "--", "sh", "-c", "echo hello from run; exit 3"],
    );
    assert_eq!((code, out.as_str()), (3, "hello from run\n"));
    // A command that does not exist: 127, like a shell, with one line saying so.
    let (code, out, _) = vs(&d, &["run", "--", "no-such-command-here"]);
    assert_eq!(code, 127, "{out}");
    assert!(out.contains("no-such-command-here"), "{out}");
    // none: only lo.
    let (code, out, _) = vs(&d, &["run", "--network", "none", "--", "ip", "-o", "link"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("lo:"), "{out}");
    // host: the daemon's own namespace.
    let (code, out, _) = vs(
        &d,
        &[
            "run",
            "--network",
            "host",
            "--",
            "readlink",
            "/proc/self/ns/net",
        ],
    );
    let daemon_ns = std::fs::read_link(format!("/proc/{}/ns/net", d.pid())).expect("ns");
    assert_eq!(
        (code, out.trim()),
        (0, daemon_ns.to_string_lossy().as_ref())
    );

    // User network: names, hostname, hosts, resolv.conf, exec exit codes.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "tomcat81",
        "--network",
        "you_network",
        "--",
        "sleep",
        "300",
    ]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "tomcat82",
        "--network",
        "you_network",
        "--",
        "sleep",
        "300",
    ]);
    let (code, out, _) = vs(
        &d,
        &[
            "exec", "tomcat81", "--", "ping", "-c", "1", "-W", "2", "tomcat82",
        ],
    );
    assert_eq!(code, 0, "ping by name from a container: {out}");
    assert_eq!(
        vs(&d, &["exec", "tomcat81", "--", "hostname"]).1.trim(),
        "tomcat81"
    );
    let hosts = vs(&d, &["exec", "tomcat81", "--", "cat", "/etc/hosts"]).1;
    assert!(hosts.contains("10.110.0.2\ttomcat81"), "{hosts}");
    let resolv = vs(&d, &["exec", "tomcat81", "--", "cat", "/etc/resolv.conf"]).1;
    assert!(
        resolv.contains("nameserver 10.110.0.1") && !resolv.contains("search"),
        "the gateway, and no search domain (it sent short names upstream): {resolv}"
    );
    assert_eq!(
        vs(&d, &["exec", "tomcat81", "--", "sh", "-c", "exit 7"]).0,
        7
    );
    assert_eq!(
        vs(&d, &["exec", "tomcat81", "--", "no-such-command-here"]).0,
        127
    );
    // The host's own /etc/resolv.conf is untouched by all this.
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    assert!(!host_resolv.contains("10.110.0.1"));

    let ps = d.ok(&["ps"]);
    let row = ps.lines().find(|l| l.contains("tomcat81")).expect("ps row");
    assert!(
        row.contains("you_network") && row.contains("10.110.0.2") && row.contains("running"),
        "{ps}"
    );
    // Default bridge: no names.
    d.ok(&["run", "-d", "--name", "plain", "--", "sleep", "300"]);
    let (code, _, _) = vs(&d, &["exec", "plain", "--", "getent", "hosts", "tomcat81"]);
    assert_ne!(code, 0, "bridge resolves no container names");

    // stop: SIGTERM -> exited (143); rm; logs.
    d.ok(&["stop", "-t", "5", "tomcat82"]);
    let ps = d.ok(&["ps", "-a"]);
    assert!(
        ps.lines()
            .any(|l| l.contains("tomcat82") && l.contains("exited (143)")),
        "{ps}"
    );
    assert!(
        !d.ok(&["ps"]).contains("tomcat82"),
        "ps shows running ones only"
    );
    let ip_free = wait_until(secs(3), || {
        !d.ok(&["network", "inspect", "you_network"])
            .contains("tomcat82")
    });
    assert!(ip_free, "stopped container's endpoint removed");
    d.ok(&["rm", "tomcat82"]);
    assert!(!d.ok(&["ps", "-a"]).contains("tomcat82"));
    d.ok(&[
        "run",
        "-d",
        "--name",
        "talker",
        "--",
        "sh",
        "-c",
        "echo logged line; sleep 300",
    ]);
    assert!(wait_until(secs(5), || d
        .ok(&["logs", "talker"])
        .contains("logged line")));
    d.fails(&["rm", "talker"]); // running: needs -f
    d.ok(&["rm", "-f", "talker", "plain", "tomcat81"]);
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn published_ports_and_a_sidecar_sharing_the_network() {
    require_root();
    let d = Daemon::start();
    d.ok(&["network", "create", "web", "--subnet", "10.111.0.0/24"]);
    let www = d.dir.join("www");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("index.html"), "tomcat81 says hi\n").expect("index");
    d.ok(&[
        "run",
        "-d",
        "--name",
        "tomcat81",
        "--network",
        "web",
        "-p",
        "8081:8080",
        "--",
        "python3",
        "-m",
        "http.server",
        "8080",
        "--directory",
        &www.display().to_string(),
    ]);
    let up = wait_until(secs(10), || {
        curl(&d.ns.name, &["http://127.0.0.1:8081/"]).0 == 0
    });
    assert!(up, "published port of a container");
    assert_eq!(
        curl(&d.ns.name, &["http://127.0.0.1:8081/"]).1,
        "tomcat81 says hi\n"
    );
    assert!(
        d.ok(&["port", "tomcat81"])
            .contains("8080/tcp -> 0.0.0.0:8081")
    );
    let (code, out, _) = vs(
        &d,
        &[
            "run",
            "--name",
            "sidecar",
            "--network",
            "container:tomcat81",
            "--",
            "curl",
            "-s",
            "http://localhost:8080/",
        ],
    );
    assert_eq!(
        (code, out.as_str()),
        (0, "tomcat81 says hi\n"),
        "sidecar shares localhost"
    );
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn container_mode_follows_its_parent() {
    require_root();
    let d = Daemon::start();
    d.ok(&["network", "create", "fam", "--subnet", "10.112.0.0/24"]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "parent",
        "--network",
        "fam",
        "--",
        "sleep",
        "300",
    ]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "child",
        "--network",
        "container:parent",
        "--",
        "sleep",
        "300",
    ]);
    let links = vs(
        &d,
        &["exec", "child", "--", "ip", "-o", "addr", "show", "eth0"],
    )
    .1;
    assert!(
        links.contains("10.112.0.2"),
        "child shares the parent's eth0: {links}"
    );
    d.ok(&["stop", "-t", "2", "parent"]);
    let only_lo = wait_until(secs(3), || {
        vs(&d, &["exec", "child", "--", "ip", "-o", "link"])
            .1
            .lines()
            .count()
            == 1
    });
    assert!(only_lo, "dependant keeps only lo when its parent stops");
    d.ok(&["stop", "-t", "2", "child"]);
    let err = d.fails(&["start", "child"]);
    assert!(
        err.contains("parent") && err.contains("not running"),
        "{err}"
    );
    d.ok(&["start", "parent"]);
    d.ok(&["start", "child"]);
    let links = vs(
        &d,
        &["exec", "child", "--", "ip", "-o", "addr", "show", "eth0"],
    )
    .1;
    assert!(
        links.contains("10.112.0."),
        "restarted child rejoined: {links}"
    );
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn container_bad_input() {
    require_root();
    let d = Daemon::start();
    d.ok(&["run", "-d", "--name", "one", "--", "sleep", "300"]);
    for (args, needle) in [
        (vec!["exec", "nobody", "--", "true"], "no such container"),
        (vec!["stop", "nobody"], "no such container"),
        (vec!["rm", "nobody"], "no such container"),
        (vec!["logs", "nobody"], "no such container"),
        (vec!["run", "--name", "one", "--", "true"], "already in use"),
        (
            vec!["run", "--network", "container:ghost", "--", "true"],
            "no such container",
        ),
        (
            vec!["run", "--network", "host", "-p", "8080:80", "--", "true"],
            "conflicting options",
        ),
        (
            vec!["run", "--network", "none", "-p", "8080:80", "--", "true"],
            "conflicting options",
        ),
        (
            vec![
                "run",
                "--network",
                "container:one",
                "-p",
                "8080:80",
                "--",
                "true",
            ],
            "conflicting options",
        ),
        (
            vec!["run", "--network", "nonet", "--", "true"],
            "network nonet not found",
        ),
        (
            vec!["run", "--name", "bad name", "--", "true"],
            "invalid container name",
        ),
        // Accepted and ignored would be worse than refused: the default bridge resolves no
        // names, a shared network namespace has no endpoint of its own, and host mode keeps
        // the host's hostname.
        (
            vec!["run", "--alias", "web", "--", "true"],
            "need a user-defined network",
        ),
        (
            vec![
                "run",
                "--network",
                "container:one",
                "--alias",
                "web",
                "--",
                "true",
            ],
            "conflicting options",
        ),
        (
            vec!["run", "--network", "host", "--hostname", "h", "--", "true"],
            "conflicting options",
        ),
    ] {
        let err = d.fails(&args);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    d.ok(&["stop", "-t", "2", "one"]);
    let err = d.fails(&["run", "--network", "container:one", "--", "true"]);
    assert!(err.contains("not running"), "{err}");
    let ps = d.ok(&["ps", "-a"]);
    assert_eq!(
        ps.lines().count(),
        2,
        "nothing left behind by the failures: {ps}"
    );
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn running_containers_survive_a_daemon_restart() {
    require_root();
    let mut d = Daemon::start();
    d.ok(&["network", "create", "keep", "--subnet", "10.113.0.0/24"]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "a1",
        "--network",
        "keep",
        "--",
        "sleep",
        "300",
    ]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "a2",
        "--network",
        "keep",
        "--",
        "sleep",
        "300",
    ]);
    d.kill9_and_restart();
    let ps = d.ok(&["ps"]);
    assert!(
        ps.contains("a1") && ps.contains("a2"),
        "still running: {ps}"
    );
    let ok = wait_until(secs(10), || {
        vs(
            &d,
            &["exec", "a1", "--", "ping", "-c", "1", "-W", "1", "a2"],
        )
        .0 == 0
    });
    assert!(ok, "attached and resolving again after the restart");
    // An exit noticed by the restarted daemon (not its child any more).
    d.ok(&["stop", "-t", "2", "a2"]);
    assert!(
        d.ok(&["ps", "-a"])
            .lines()
            .any(|l| l.contains("a2") && l.contains("exited"))
    );
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn foreground_run_passes_signals_on() {
    require_root();
    let d = Daemon::start();
    let child = std::process::Command::new(vswitch_tests::vswitch_bin())
        .arg("--socket")
        .arg(&d.socket)
        .args(["run", "--name", "fg", "--", "sleep", "60"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let running = wait_until(secs(10), || d.ok(&["ps"]).contains("fg"));
    assert!(running);
    let _ = vswitch_tests::run(
        std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]),
        secs(5),
    );
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(143),
        "SIGTERM reached the container"
    );
    assert!(
        d.ok(&["ps", "-a"])
            .lines()
            .any(|l| l.contains("fg") && l.contains("exited (143)"))
    );
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn network_connect_by_container_name_lasts_until_disconnect() {
    require_root();
    let d = Daemon::start();
    d.ok(&["network", "create", "front", "--subnet", "10.84.1.0/24"]);
    d.ok(&["network", "create", "back", "--subnet", "10.84.2.0/24"]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "web",
        "--network",
        "front",
        "--",
        "sleep",
        "300",
    ]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "db",
        "--network",
        "back",
        "--",
        "sleep",
        "300",
    ]);
    // As `docker network connect back web`: the container's name is the target.
    d.ok(&["network", "connect", "back", "--alias", "api", "web"]);
    let ip = d.ip_of("back", "web");
    assert!(ip.starts_with("10.84.2."), "{ip}");
    let addrs = vs(&d, &["exec", "web", "--", "ip", "-o", "addr"]).1;
    assert!(addrs.contains(&format!("inet {ip}/24")), "{addrs}");
    // db (back only) reaches it by name and by alias.
    for name in ["web", "api"] {
        let (code, out, err) = vs(
            &d,
            &["exec", "db", "--", "ping", "-c", "1", "-W", "2", name],
        );
        assert_eq!(code, 0, "db -> {name}: {out}{err}");
    }

    // Joined for good: after a stop and a start, web is on both networks again.
    d.ok(&["stop", "-t", "2", "web"]);
    d.ok(&["start", "web"]);
    assert!(d.ip_of("front", "web").starts_with("10.84.1."));
    assert_eq!(d.ip_of("back", "web"), ip, "same address again");
    let (code, _, _) = vs(
        &d,
        &["exec", "db", "--", "ping", "-c", "1", "-W", "2", "api"],
    );
    assert_eq!(code, 0, "alias back too");

    // Disconnected for good too.
    d.ok(&["network", "disconnect", "back", "web"]);
    d.ok(&["stop", "-t", "2", "web"]);
    d.ok(&["start", "web"]);
    let back = d.inspect("back");
    let names: Vec<&str> = back["Containers"]
        .as_object()
        .map(|c| c.values().filter_map(|e| e["Name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, vec!["db"], "web stays off back");

    // What cannot join: a container without a network of its own, ports after the fact.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "hosty",
        "--network",
        "host",
        "--",
        "sleep",
        "300",
    ]);
    let err = d.fails(&["network", "connect", "back", "hosty"]);
    assert!(err.contains("only containers on a network"), "{err}");
    let err = d.fails(&["network", "connect", "back", "-p", "9090:80", "web"]);
    assert!(err.contains("when it is created"), "{err}");
    let err = d.fails(&["network", "connect", "back", "--ifname", "eth7", "web"]);
    assert!(err.contains("--ip and --alias only"), "{err}");

    // A stopped container can leave a network too, and stays off it.
    d.ok(&["network", "connect", "back", "web"]);
    d.ok(&["stop", "-t", "2", "web"]);
    d.ok(&["network", "disconnect", "back", "web"]);
    d.ok(&["start", "web"]);
    let back = d.inspect("back");
    assert_eq!(
        back["Containers"].as_object().map(|c| c.len()),
        Some(1),
        "only db: {back}"
    );
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn a_container_has_a_session_of_its_own_and_survives_a_huge_stop_timeout() {
    require_root();
    let d = Daemon::start();
    d.ok(&["run", "-d", "--name", "solo", "--", "sleep", "300"]);
    let reply = d.raw(b"GET /containers/solo HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n");
    let reply = text(&reply);
    let body = reply.split("\r\n\r\n").nth(1).expect("body");
    let info: serde_json::Value = serde_json::from_str(body).expect("json");
    let pid = info["Pid"].as_u64().expect("pid");
    // Field 6 of /proc/PID/stat is the session: the container leads its own, so signals to
    // the daemon's process group or terminal (kill %1, Ctrl-C, a hangup) do not reach it.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .expect("fields");
    assert_eq!(fields[3], pid.to_string(), "session id == pid: {stat}");
    assert_eq!(
        fields[2],
        pid.to_string(),
        "process group of its own: {stat}"
    );
    // A stop timeout too large to add to a clock is no crash: SIGTERM stops sleep at once.
    let reply = text(&d.raw(
        format!(
            "POST /containers/solo/stop?t={} HTTP/1.1\r\nHost: d\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            u64::MAX
        )
        .as_bytes(),
    ));
    assert!(reply.starts_with("HTTP/1.1 2"), "{reply}");
    assert!(d.ok(&["ps", "-a"]).contains("exited"));
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn what_a_container_started_goes_with_it() {
    require_root();
    let d = Daemon::start();
    let marker = format!("{}.7", std::process::id() % 1000 + 3000);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "parent",
        "--",
        "sh",
        "-c",
        &format!("sleep {marker} & sleep {marker}"),
    ]);
    let count = || {
        let out = vswitch_tests::run(
            std::process::Command::new("pgrep").args(["-f", &format!("^sleep {marker}$")]),
            secs(5),
        );
        text(&out.stdout).lines().count()
    };
    assert!(
        vswitch_tests::wait_until(secs(5), || count() == 2),
        "both sleeps run"
    );
    // sh dies of the SIGTERM; the sleeps it started (background and foreground) go with it.
    d.ok(&["stop", "-t", "2", "parent"]);
    assert!(
        vswitch_tests::wait_until(secs(5), || count() == 0),
        "{} left behind",
        count()
    );
}

/// A start checks the name and starts the process in one hold of the daemon's lock, then lets
/// go of it while the process makes its namespaces: two `run`s of one name at once still make
/// one container, and the other gets a conflict. The requests are sent raw, released together.
#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn two_runs_of_one_name_at_once_make_one_container() {
    use std::io::{Read, Write};
    require_root();
    let d = Daemon::start();
    for round in 0..10 {
        let name = format!("twin{round}");
        let body = format!(r#"{{"Name":"{name}","Network":"none","Cmd":["sleep","60"]}}"#);
        let request = format!(
            "POST /containers/run HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let gate = std::sync::Arc::new(std::sync::Barrier::new(2));
        let runs: Vec<_> = (0..2)
            .map(|_| {
                let mut conn = std::os::unix::net::UnixStream::connect(&d.socket).expect("connect");
                conn.set_read_timeout(Some(secs(30))).expect("timeout");
                let (gate, request) = (gate.clone(), request.clone());
                std::thread::spawn(move || {
                    gate.wait();
                    conn.write_all(request.as_bytes()).expect("send");
                    let mut answer = String::new();
                    let _ = conn.read_to_string(&mut answer);
                    answer
                })
            })
            .collect();
        let answers: Vec<String> = runs
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect();
        let created = answers
            .iter()
            .filter(|a| a.starts_with("HTTP/1.1 201"))
            .count();
        let refused = answers
            .iter()
            .filter(|a| a.starts_with("HTTP/1.1 409"))
            .count();
        assert_eq!((created, refused), (1, 1), "round {round}: {answers:?}");
        let listed = d
            .ok(&["ps", "-a"])
            .lines()
            .filter(|l| l.split_whitespace().any(|w| w == name))
            .count();
        assert_eq!(listed, 1, "round {round}: one container called {name}");
        d.ok(&["rm", "-f", &name]);
    }
}
