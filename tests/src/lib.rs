//! Harness for the integration tests (in `cli/tests/`, so that cargo always builds the
//! `vswitch` binary they run): the real binary, real network namespaces.
//!
//! Every privileged test is `#[ignore]`d with a reason, so a plain `cargo test` lists them as
//! ignored instead of passing them; `.ci/run` runs them as root with `--ignored`. Run by hand
//! with `sudo -E cargo test -p vswitch --test skeleton -- --ignored`. A privileged test that finds itself
//! without root fails rather than skipping.
//!
//! Each test starts its own daemon, in its own network namespace, with its own socket and
//! state directory, so tests run in parallel. Namespaces are named `vst<pid>x<n>...` and are
//! removed by guards on success and on failure. Every wait is bounded.

pub mod sandbox;
mod vtep;
pub use sandbox::{Sandbox, busybox_tar, curl_ok};
pub use vtep::kernel_vtep;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Fails the test unless it runs as root.
pub fn require_root() {
    // SAFETY-free check: /proc/self/status shows the effective uid on the Uid: line.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("?");
    assert_eq!(
        euid, "0",
        "this privileged test needs root (network namespaces, TAP devices)"
    );
}

/// The vswitch binary built next to this test binary (or `$VSWITCH_BIN`).
pub fn vswitch_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VSWITCH_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/vswitch
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("vswitch"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build -p vswitch) or set VSWITCH_BIN",
        bin.display()
    );
    bin
}

/// A unique name for this test process: `vst<pid>x<n>` plus a suffix.
pub fn unique(suffix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "vst{}x{}{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        suffix
    )
}

/// A directory removed with everything in it when this is dropped, on success or failure.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `s` seconds, for bounds on waits.
pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Runs a command with a timeout; returns its output.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    run_with_input(cmd, None, timeout)
}

/// Runs a command with `input` on its stdin (none: /dev/null) and a timeout; returns its
/// output.
pub fn run_with_input(cmd: &mut Command, input: Option<&[u8]>, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
    }
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let status = wait_child(&mut child, timeout, cmd);
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// Waits for `child` (started from `cmd`) at most `timeout`, killing it after that.
pub fn wait_child(child: &mut Child, timeout: Duration, cmd: &Command) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            eprintln!("timed out after {timeout:?}: {cmd:?}");
            return child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether a TCP connection to `host:port` opens from inside namespace `ns`.
pub fn tcp_open(ns: &str, host: &str, port: u16) -> bool {
    run(
        Command::new("ip").args([
            "netns",
            "exec",
            ns,
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{host}/{port}"),
        ]),
        Duration::from_secs(2),
    )
    .status
    .success()
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A network namespace made with `ip netns add`, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(suffix: &str) -> Self {
        let name = unique(suffix);
        let out = run(
            Command::new("ip").args(["netns", "add", &name]),
            Duration::from_secs(10),
        );
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            text(&out.stderr)
        );
        Self { name }
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str], timeout: Duration) -> Output {
        run(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(args),
            timeout,
        )
    }

    /// One ping to `ip`, 1 s timeout.
    pub fn ping(&self, ip: &str) -> bool {
        self.exec(&["ping", "-c", "1", "-W", "1", ip], Duration::from_secs(5))
            .status
            .success()
    }

    /// Pings until one answer arrives or `timeout` passes (ARP and the first frames may take
    /// a moment after attach).
    pub fn ping_within(&self, ip: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.ping(ip))
    }

    /// Runs `dig +short`-style queries: returns (stdout, exit success).
    pub fn dig(&self, args: &[&str]) -> String {
        let mut all = vec!["dig", "+time=3", "+tries=1"];
        all.extend_from_slice(args);
        text(&self.exec(&all, Duration::from_secs(15)).stdout)
    }

    /// Names of the links in the namespace.
    pub fn links(&self) -> Vec<String> {
        let out = run(
            Command::new("ip").args(["-n", &self.name, "-o", "link", "show"]),
            Duration::from_secs(5),
        );
        text(&out.stdout)
            .lines()
            .filter_map(|l| l.split(':').nth(1).map(|s| s.trim().to_owned()))
            .map(|s| s.split('@').next().unwrap_or("").to_owned())
            .collect()
    }

    /// The `ip -o addr` lines of an interface.
    pub fn addrs(&self, ifname: &str) -> String {
        let out = run(
            Command::new("ip").args(["-n", &self.name, "-o", "addr", "show", "dev", ifname]),
            Duration::from_secs(5),
        );
        text(&out.stdout)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(
            Command::new("ip").args(["netns", "del", &self.name]),
            Duration::from_secs(10),
        );
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

/// A process in a fresh, anonymous network namespace (`unshare -n sleep`), killed on drop.
pub struct NsProcess {
    pub child: Child,
}

impl NsProcess {
    pub fn new() -> Self {
        let child = Command::new("unshare")
            .args(["-n", "sleep", "300"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare");
        let me = Self { child };
        // unshare execs sleep after unsharing; wait until the PID's netns differs from ours.
        let ours = std::fs::read_link("/proc/self/ns/net").ok();
        let pid = me.pid();
        assert!(
            wait_until(Duration::from_secs(5), || {
                let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
                theirs.is_some() && theirs != ours
            }),
            "unshare -n did not make a namespace"
        );
        me
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn exec(&self, args: &[&str], timeout: Duration) -> Output {
        run(
            Command::new("nsenter")
                .args(["-t", &self.pid().to_string(), "-n"])
                .args(args),
            timeout,
        )
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Default for NsProcess {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A vswitch daemon in its own network namespace with its own socket and state directory.
pub struct Daemon {
    pub ns: Netns,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    starts: u32,
    extra: Vec<String>,
}

impl Daemon {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a daemon with extra `vswitch daemon` flags.
    pub fn start_with(extra: &[&str]) -> Self {
        let ns = Netns::new("d");
        // The daemon's namespace stands in for a host, and hosts have loopback up (published
        // ports reached from the host side and hairpin go through it).
        let lo = run(
            Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]),
            Duration::from_secs(5),
        );
        assert!(lo.status.success());
        let dir = std::env::temp_dir().join(format!("{}-dir", ns.name));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut d = Self {
            socket: dir.join("vswitch.sock"),
            state: dir.join("state"),
            log: dir.join("daemon.log"),
            dir,
            ns,
            child: None,
            starts: 0,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns.name])
            .arg(vswitch_bin())
            .arg("--socket")
            .arg(&self.socket)
            .arg("daemon")
            .arg("--state-dir")
            .arg(&self.state)
            .args(["--log-level", "debug"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        self.child = Some(child);
        let socket = self.socket.clone();
        let ok = wait_until(Duration::from_secs(15), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        assert!(ok, "daemon did not start; log:\n{}", self.log());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `vswitch --socket S ARGS...`.
    pub fn vs(&self, args: &[&str]) -> Output {
        run(
            Command::new(vswitch_bin())
                .arg("--socket")
                .arg(&self.socket)
                .args(args),
            Duration::from_secs(30),
        )
    }

    /// Runs the client and insists on success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.vs(args);
        assert!(
            out.status.success(),
            "vswitch {args:?} failed: {}\ndaemon log:\n{}",
            text(&out.stderr),
            self.log()
        );
        text(&out.stdout)
    }

    /// Runs the client and insists on failure with exactly one line on stderr; returns it.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.vs(args);
        let err = text(&out.stderr);
        assert!(
            !out.status.success(),
            "vswitch {args:?} should have failed; stdout: {}",
            text(&out.stdout)
        );
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "vswitch {args:?} should print one error line, got: {err:?}"
        );
        err.trim_end().to_owned()
    }

    /// The network's counters, as `GET /stats?network=NETWORK` gives them.
    pub fn stats(&self, network: &str) -> serde_json::Value {
        let raw = self.raw(
            format!(
                "GET /stats?network={network} HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        );
        let body = text(&raw);
        let json = body.split("\r\n\r\n").nth(1).unwrap_or("");
        let v: serde_json::Value = serde_json::from_str(json).expect("stats JSON");
        v[0].clone()
    }

    pub fn inspect(&self, network: &str) -> serde_json::Value {
        let out = self.ok(&["network", "inspect", network]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("inspect JSON");
        v[0].clone()
    }

    /// The IPv4 address (without prefix) of endpoint `name` on `network`.
    pub fn ip_of(&self, network: &str, name: &str) -> String {
        let net = self.inspect(network);
        let containers = net["Containers"].as_object().expect("Containers");
        let entry = containers
            .values()
            .find(|c| c["Name"] == name)
            .unwrap_or_else(|| panic!("{name} not on {network}: {net}"));
        let cidr = entry["IPv4Address"].as_str().expect("IPv4Address");
        cidr.split('/').next().expect("ip").to_owned()
    }

    /// Sends a signal to the daemon process.
    pub fn signal(&self, sig: &str) {
        let _ = run(
            Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]),
            Duration::from_secs(5),
        );
    }

    /// SIGKILLs the daemon and starts it again on the same socket and state directory.
    pub fn kill9_and_restart(&mut self) {
        self.kill9_and_restart_after(|| {});
    }

    /// As [`Self::kill9_and_restart`], running `meanwhile` while the daemon is down.
    pub fn kill9_and_restart_after(&mut self, meanwhile: impl FnOnce()) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        meanwhile();
        self.spawn();
    }

    /// Sends raw bytes to the control socket and returns what comes back (bounded).
    pub fn raw(&self, bytes: &[u8]) -> Vec<u8> {
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        s.set_write_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        let _ = s.take(1 << 20).read_to_end(&mut out);
        out
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Containers outlive their daemon by design; a test's must not outlive the test.
        if self.child.is_some() {
            let _ = run(
                Command::new("kill").args(["-CONT", &self.pid().to_string()]),
                Duration::from_secs(5),
            );
            let ps = self.vs(&["ps", "-a"]);
            let ids: Vec<String> = text(&ps.stdout)
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                .collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids.iter().map(String::as_str));
                let _ = self.vs(&args);
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = run(
                Command::new("kill").args(["-CONT", &c.id().to_string()]),
                Duration::from_secs(5),
            );
            let _ = run(
                Command::new("kill").args(["-TERM", &c.id().to_string()]),
                Duration::from_secs(5),
            );
            let exited = wait_until(Duration::from_secs(5), || {
                matches!(c.try_wait(), Ok(Some(_)))
            });
            if !exited {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "---- daemon log ({}) ----\n{}",
                self.log.display(),
                self.log()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A process started inside a namespace (`ip netns exec NS CMD...`), killed on drop.
pub struct NsDaemon {
    child: Child,
}

impl NsDaemon {
    pub fn spawn(ns: &str, args: &[&str]) -> Self {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {args:?}: {e}"));
        Self { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let _ = run(
            Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]),
            Duration::from_secs(5),
        );
    }
}

impl Drop for NsDaemon {
    fn drop(&mut self) {
        self.signal("CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An "outside" for NAT tests: a namespace linked to the daemon's namespace by a veth pair,
/// 192.0.2.1/24 on the daemon side and 192.0.2.2/24 outside (TEST-NET-1, only ever inside
/// these namespaces).
pub struct Outside {
    pub ns: Netns,
}

impl Outside {
    pub const DAEMON_IP: &'static str = "192.0.2.1";
    pub const IP: &'static str = "192.0.2.2";

    pub fn new(daemon: &Daemon) -> Self {
        Self::behind(&daemon.ns.name)
    }

    /// An outside behind the namespace `host` (where some daemon runs).
    pub fn behind(host: &str) -> Self {
        let ns = Netns::new("o");
        let sh = |args: &[&str]| {
            let out = run(Command::new("ip").args(args), Duration::from_secs(10));
            assert!(out.status.success(), "ip {args:?}: {}", text(&out.stderr));
        };
        sh(&[
            "-n", host, "link", "add", "vout", "type", "veth", "peer", "name", "vin", "netns",
            &ns.name,
        ]);
        sh(&["-n", host, "addr", "add", "192.0.2.1/24", "dev", "vout"]);
        sh(&["-n", host, "link", "set", "vout", "up"]);
        sh(&["-n", host, "link", "set", "lo", "up"]);
        sh(&["-n", &ns.name, "addr", "add", "192.0.2.2/24", "dev", "vin"]);
        sh(&["-n", &ns.name, "link", "set", "vin", "up"]);
        sh(&["-n", &ns.name, "link", "set", "lo", "up"]);
        Self { ns }
    }
}

/// `python3 -m http.server PORT` serving `dir` inside a namespace, with its log (which shows
/// each client's address) in `dir/../http-PORT.log`.
pub struct HttpServer {
    _proc: NsDaemon,
    pub log: PathBuf,
}

impl HttpServer {
    pub fn start(ns: &str, port: u16, dir: &Path) -> Self {
        Self::start_on(ns, "0.0.0.0", port, dir)
    }

    /// The same, bound to `bind` (`::` serves both families).
    pub fn start_on(ns: &str, bind: &str, port: u16, dir: &Path) -> Self {
        let log = dir.with_file_name(format!("http-{ns}-{port}.log"));
        let script = format!(
            "exec python3 -m http.server {port} --bind {bind} --directory {} 2>{}",
            dir.display(),
            log.display()
        );
        let proc_ = NsDaemon::spawn(ns, &["sh", "-c", &script]);
        let ok = wait_until(Duration::from_secs(10), || tcp_open(ns, "127.0.0.1", port));
        assert!(ok, "http.server on {ns}:{port} did not start");
        Self { _proc: proc_, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Runs curl inside a namespace; returns (exit code, stdout).
pub fn curl(ns: &str, args: &[&str]) -> (i32, String) {
    let out = run(
        Command::new("ip")
            .args(["netns", "exec", ns, "curl", "-s", "--max-time", "10"])
            .args(args),
        Duration::from_secs(20),
    );
    (out.status.code().unwrap_or(-1), text(&out.stdout))
}
