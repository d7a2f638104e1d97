//! The stack as an unprivileged user: daemon, attach by PID of a user-owned namespace, DNS,
//! published ports, outbound TCP, run/exec, GC, and no process of the daemon running as root.
//!
//! The test itself runs as root (to build the scene) and runs vswitch as the unprivileged user
//! `vswitch-rootless` (scripts/test.sh creates it and makes /dev/net/tun 0666 for the run).
//! The daemon lives in a namespace the test made, standing in for the user's host namespace.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use vswitch_tests::{
    Netns, NsDaemon, curl, require_root, run, secs, text, unique, vswitch_bin, wait_until,
};

const USER: &str = "vswitch-rootless";

fn id_of(flag: &str) -> String {
    let out = run(Command::new("id").args([flag, USER]), secs(5));
    assert!(
        out.status.success(),
        "user {USER} is missing: scripts/test.sh creates it (useradd {USER})"
    );
    text(&out.stdout).trim().to_owned()
}

struct Rootless {
    ns: Netns,
    dir: PathBuf,
    bin: PathBuf,
    daemon: Option<Child>,
    uid: String,
    gid: String,
}

impl Rootless {
    fn start() -> Self {
        require_root();
        let mode = std::fs::metadata("/dev/net/tun").map(|m| m.permissions().mode() & 0o777);
        assert_eq!(
            mode.ok(),
            Some(0o666),
            "/dev/net/tun must be 0666 (scripts/test.sh sets it)"
        );
        let (uid, gid) = (id_of("-u"), id_of("-g"));
        let ns = Netns::new("r");
        let up = run(
            Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]),
            secs(5),
        );
        assert!(up.status.success());
        let dir = std::env::temp_dir().join(unique("-rootless"));
        std::fs::create_dir_all(dir.join("run")).expect("dir");
        // The user may not be able to reach the build directory: give it its own copy.
        let bin = dir.join("vswitch");
        std::fs::copy(vswitch_bin(), &bin).expect("copy binary");
        let chown = run(
            Command::new("chown")
                .args(["-R", &format!("{uid}:{gid}")])
                .arg(&dir),
            secs(5),
        );
        assert!(chown.status.success());
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut me = Self {
            ns,
            dir,
            bin,
            daemon: None,
            uid,
            gid,
        };
        let log = std::fs::File::create(me.dir.join("daemon.log")).expect("log");
        let child = me
            .as_user(&[])
            .arg(&me.bin)
            .args(["--socket"])
            .arg(me.dir.join("vswitch.sock"))
            .args(["daemon", "--state-dir"])
            .arg(me.dir.join("state"))
            .args(["--log-level", "debug"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("daemon");
        me.daemon = Some(child);
        let sock = me.dir.join("vswitch.sock");
        assert!(
            wait_until(secs(15), || std::os::unix::net::UnixStream::connect(&sock)
                .is_ok()),
            "rootless daemon did not start: {}",
            me.log()
        );
        me
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// `ip netns exec NS setpriv --reuid U --regid G --clear-groups env HOME=.. EXTRA...`
    fn as_user(&self, extra: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &self.ns.name,
            "setpriv",
            "--reuid",
            &self.uid,
            "--regid",
            &self.gid,
            "--clear-groups",
            "env",
        ])
        .arg(format!("HOME={}", self.dir.display()))
        .arg(format!(
            "XDG_RUNTIME_DIR={}",
            self.dir.join("run").display()
        ))
        .args(extra);
        c
    }

    fn vs(&self, args: &[&str]) -> (bool, String, String) {
        let mut c = self.as_user(&[]);
        c.arg(&self.bin)
            .arg("--socket")
            .arg(self.dir.join("vswitch.sock"))
            .args(args);
        let out = run(&mut c, secs(60));
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.vs(args);
        assert!(
            ok,
            "vswitch {args:?} as {USER} failed: {err}\ndaemon log:\n{}",
            self.log()
        );
        out
    }

    /// A process in a user and network namespace owned by the user (`unshare -U -r -n`).
    fn user_netns(&self) -> NsDaemon {
        let p = NsDaemon::spawn(
            &self.ns.name,
            &[
                "setpriv",
                "--reuid",
                &self.uid,
                "--regid",
                &self.gid,
                "--clear-groups",
                "unshare",
                "-U",
                "-r",
                "-n",
                "sleep",
                "120",
            ],
        );
        let pid = p.pid();
        let ours = std::fs::read_link(format!("/proc/{pid}/ns/user")).ok();
        assert!(wait_until(secs(5), || {
            let now = std::fs::read_link(format!("/proc/{pid}/ns/user")).ok();
            now.is_some() && now != ours
                || std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()
                    != std::fs::read_link("/proc/self/ns/net").ok()
                    && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c.trim() == "sleep")
        }));
        p
    }
}

impl Drop for Rootless {
    fn drop(&mut self) {
        let ps = self.vs(&["ps", "-a"]).1;
        for id in ps
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
        {
            let _ = self.vs(&["rm", "-f", id]);
        }
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- rootless daemon log ----\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn uid_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("?")
        .to_owned()
}

fn nsenter(pid: u32, args: &[&str]) -> (bool, String) {
    let out = run(
        Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-n"])
            .args(args),
        secs(15),
    );
    (out.status.success(), text(&out.stdout))
}

#[test]
#[ignore = "privileged: needs root to build the scene; runs vswitch as an unprivileged user"]
fn the_whole_stack_as_an_unprivileged_user() {
    let r = Rootless::start();
    let daemon_pid = r.daemon.as_ref().map(Child::id).expect("pid");
    // `ip netns exec` execs setpriv, which execs env, which execs vswitch: same PID.
    assert!(
        wait_until(secs(3), || uid_of(daemon_pid) == r.uid),
        "daemon runs as {USER}"
    );
    assert_ne!(uid_of(daemon_pid), "0");

    r.ok(&["network", "create", "rl", "--subnet", "10.120.0.0/24"]);
    let a = r.user_netns();
    let b = r.user_netns();
    r.ok(&[
        "attach",
        "--network",
        "rl",
        "--name",
        "alpha",
        &a.pid().to_string(),
    ]);
    r.ok(&[
        "attach",
        "--network",
        "rl",
        "--name",
        "beta",
        &b.pid().to_string(),
    ]);
    let (ok, out) = nsenter(a.pid(), &["ping", "-c", "1", "-W", "2", "10.120.0.3"]);
    assert!(ok, "ping between user-owned namespaces: {out}");
    let (_, out) = nsenter(
        a.pid(),
        &[
            "dig",
            "+short",
            "+time=2",
            "+tries=1",
            "@10.120.0.1",
            "beta",
        ],
    );
    assert_eq!(out.trim(), "10.120.0.3", "DNS by name");
    // A non-PID target cannot be entered without privileges: a clear error.
    let (ok, _, err) = r.vs(&[
        "attach",
        "--network",
        "rl",
        "--name",
        "x",
        &format!("/run/netns/{}", r.ns.name),
    ]);
    assert!(!ok && err.lines().count() == 1, "{err}");

    // run/exec: a user namespace per container, names, a published port, outbound TCP.
    let www = r.dir.join("www");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("index.html"), "rootless hello\n").expect("index");
    let _ = run(
        Command::new("chown")
            .args(["-R", &format!("{}:{}", r.uid, r.gid)])
            .arg(&www),
        secs(5),
    );
    r.ok(&[
        "run",
        "-d",
        "--name",
        "web",
        "--network",
        "rl",
        "-p",
        "18080:8080",
        "--",
        "python3",
        "-m",
        "http.server",
        "8080",
        "--directory",
        &www.display().to_string(),
    ]);
    let up = wait_until(secs(10), || {
        curl(&r.ns.name, &["http://127.0.0.1:18080/"]).1 == "rootless hello\n"
    });
    assert!(up, "published port of a rootless container\n{}", r.log());
    // The loopback client took the in-kernel path (a socket helper inside the container's
    // namespaces): the server saw the container's own address, not the gateway's.
    let (_, addr, _) = r.vs(&[
        "exec", "web", "--", "ip", "-4", "-o", "addr", "show", "eth0",
    ]);
    let own = addr
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or("?")
        .to_owned();
    let (_, logs, _) = r.vs(&["logs", "web"]);
    assert!(
        logs.contains(&format!("{own} - -")),
        "rootless loopback client seen as the container ({own}): {logs}"
    );
    // With newuidmap and /etc/subuid ranges (scripts/test.sh installs uidmap, useradd makes
    // the ranges), the container's user namespace maps the user to root and the ranges above.
    let (_, map, _) = r.vs(&["exec", "web", "--", "cat", "/proc/self/uid_map"]);
    let lines: Vec<Vec<String>> = map
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    assert_eq!(lines.len(), 2, "root plus the subordinate range: {map}");
    assert_eq!(
        lines[0],
        vec!["0".to_owned(), r.uid.clone(), "1".to_owned()],
        "{map}"
    );
    let (ok, out, err) = r.vs(&["exec", "web", "--", "ping", "-c", "1", "-W", "2", "alpha"]);
    assert!(ok, "exec + ping by name: {out} {err}");
    // Outbound TCP: to a server in the daemon's namespace through its gateway? No: that is the
    // host loopback, closed by default. To a published port (hairpin) is allowed:
    let (ok, out, err) = r.vs(&[
        "exec", "web", "--", "python3", "-c",
        "import urllib.request;print(urllib.request.urlopen('http://10.120.0.1:18080/').read().decode(),end='')",
    ]);
    assert!(
        ok && out == "rootless hello\n",
        "outbound TCP through the NAT: {out} {err}"
    );

    // A privileged host port is a clear error naming the sysctl.
    let (ok, _, err) = r.vs(&[
        "run",
        "-d",
        "--network",
        "rl",
        "-p",
        "80:8080",
        "--",
        "sleep",
        "30",
    ]);
    assert!(!ok && err.contains("ip_unprivileged_port_start"), "{err}");

    // Outbound TCP and ping to a real outside (a namespace behind the daemon's namespace),
    // with ping sockets allowed for everybody there.
    let outside = vswitch_tests::Outside::behind(&r.ns.name);
    let sysctl = run(
        Command::new("ip").args([
            "netns",
            "exec",
            &r.ns.name,
            "sysctl",
            "-qw",
            "net.ipv4.ping_group_range=0 2147483647",
        ]),
        secs(5),
    );
    assert!(sysctl.status.success());
    let _far = vswitch_tests::HttpServer::start(&outside.ns.name, 80, &www);
    let (ok, out, err) = r.vs(&[
        "exec", "web", "--", "python3", "-c",
        "import urllib.request;print(urllib.request.urlopen('http://192.0.2.2/').read().decode(),end='')",
    ]);
    assert!(
        ok && out == "rootless hello\n",
        "outbound TCP from a rootless container: {out} {err}"
    );
    let (ok, out, _) = r.vs(&[
        "exec",
        "web",
        "--",
        "ping",
        "-c",
        "1",
        "-W",
        "2",
        "192.0.2.2",
    ]);
    assert!(
        ok,
        "outbound ping through an unprivileged ping socket: {out}"
    );

    // The demo, as the user.
    let mut demo = r.as_user(&[]);
    demo.arg(&r.bin).arg("demo");
    let out = run(&mut demo, secs(180));
    assert!(
        out.status.success(),
        "rootless demo:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("demo OK"));

    // Without XDG_RUNTIME_DIR there is no default socket: one clear line.
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        &r.ns.name,
        "setpriv",
        "--reuid",
        &r.uid,
        "--regid",
        &r.gid,
        "--clear-groups",
        "env",
        "-u",
        "XDG_RUNTIME_DIR",
    ])
    .arg(&r.bin)
    .args(["network", "ls"]);
    let out = run(&mut c, secs(10));
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("XDG_RUNTIME_DIR") && err.lines().count() == 1,
        "{err}"
    );

    // GC by process exit.
    drop(a);
    let gone = wait_until(secs(4), || {
        !r.ok(&["network", "inspect", "rl"]).contains("alpha")
    });
    assert!(gone, "endpoint collected when its process exited");

    // No process of the daemon runs as root (helpers and containers included).
    let ps = run(Command::new("ps").args(["-eo", "uid=,args="]), secs(5));
    let dir = r.dir.display().to_string();
    for line in text(&ps.stdout)
        .lines()
        .filter(|l| l.contains(&dir) && l.contains("vswitch"))
    {
        assert!(!line.trim_start().starts_with("0 "), "runs as root: {line}");
    }
    drop(b);
}
