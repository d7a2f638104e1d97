//! vswitch as the network of real podman (Debian's 4.3, CNI backend), in a sandbox that touches
//! nothing of the host's podman: a network namespace and a private mount namespace of the
//! test's own, with tmpfs over `/run` and `/var/lib` (podman's run state, CNI cache and blob
//! cache live there), and podman's `--root`, `--runroot`,
//! `--network-config-dir` and `CONTAINERS_CONF` pointing at the test's files. The vswitch
//! daemon runs in the same namespaces, as it would on a host. The image is a busybox rootfs
//! made with `podman import`.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::process::Output;

use vswitch_tests::{
    NsDaemon, Outside, Sandbox, busybox_tar, curl_ok, require_root, secs, text, vswitch_bin,
    wait_until,
};

/// Podman in a [`Sandbox`], with the daemon running beside it.
struct Podman {
    s: Sandbox,
}

impl Podman {
    fn new() -> Self {
        let mut s = Sandbox::new(&["/run", "/var/lib"]);
        fs::create_dir_all(s.path("net")).expect("dir");
        fs::create_dir_all(s.path("plugins")).expect("dir");
        symlink(vswitch_bin(), s.path("plugins/vswitch")).expect("plugin link");
        fs::write(
            s.path("containers.conf"),
            format!(
                "[containers]
# Root here lacks CAP_SYS_RESOURCE; podman's defaults ask for more.
default_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]
[network]
network_backend = \"cni\"
cni_plugin_dirs = [\"{plugins}\", \"/usr/lib/cni\"]
[engine]
runtime = \"runc\"
# vswitch listens on published host ports itself.
enable_port_reservation = false
",
                plugins = s.path("plugins").display()
            ),
        )
        .expect("containers.conf");
        s.start_daemon(&[]);
        Self { s }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.s.path(rel)
    }

    fn vs_ok(&self, args: &[&str]) -> String {
        self.s.vs_ok(args)
    }

    fn endpoints(&self, network: &str) -> Vec<String> {
        self.s.endpoints(network)
    }

    /// Runs podman in the sandbox.
    fn podman(&self, args: &[&str]) -> Output {
        let mut cmd = self.s.inside("podman");
        cmd.env("CONTAINERS_CONF", self.path("containers.conf"))
            .env("TMPDIR", &self.s.dir.0)
            .arg("--root")
            .arg(self.path("storage"))
            .args(["--runroot", "/run/containers/storage"])
            .arg("--network-config-dir")
            .arg(self.path("net"))
            .args(args);
        self.s.run_to_files(&mut cmd, secs(60))
    }

    fn podman_ok(&self, args: &[&str]) -> String {
        let out = self.podman(args);
        assert!(
            out.status.success(),
            "podman {args:?}: {}\ndaemon log:\n{}",
            text(&out.stderr),
            self.s.daemon_log()
        );
        text(&out.stdout)
    }

    /// `podman run -d` of the busybox image on the vswitch network (busybox ping needs
    /// NET_RAW, which podman drops).
    fn run_container(&self, name: &str, extra: &[&str], cmd: &[&str]) -> Output {
        let mut args = vec![
            "run",
            "-d",
            "--cap-add",
            "NET_RAW",
            "--network",
            "pmnet",
            "--name",
            name,
        ];
        args.extend_from_slice(extra);
        args.push("localhost/bb");
        args.extend_from_slice(cmd);
        self.podman(&args)
    }

    /// What busybox's nslookup in container `from` says of `name` (asking the gateway, the
    /// resolver podman wrote first into its resolv.conf).
    fn lookup(&self, from: &str, name: &str) -> String {
        let out = self.podman(&["exec", from, "nslookup", name]);
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    }

    fn ping(&self, from: &str, to: &str) -> bool {
        wait_until(secs(10), || {
            self.podman(&["exec", from, "ping", "-c1", "-W1", to])
                .status
                .success()
        })
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.podman(&["rm", "-a", "-f", "-t", "0"]);
    }
}

/// The address of container `name` on `network`, as podman reports it.
fn podman_ip(s: &Podman, name: &str, network: &str) -> String {
    let ip = s.podman_ok(&[
        "inspect",
        name,
        "--format",
        &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
    ]);
    let ip = ip.trim().to_string();
    assert!(ip.parse::<std::net::Ipv4Addr>().is_ok(), "{name}: {ip:?}");
    ip
}

#[test]
#[ignore = "needs root, podman, runc and /usr/lib/cni; run by scripts/test.sh as root"]
fn podman_runs_containers_on_a_vswitch_network() {
    require_root();
    let mut s = Podman::new();
    s.vs_ok(&["network", "create", "pmnet"]);
    let conflist = s.vs_ok(&["cni", "config", "pmnet"]);
    fs::write(s.path("net/pmnet.conflist"), conflist).expect("conflist");
    let tar = busybox_tar(&s.s.dir.0, "hello-from-podman\n");
    s.podman_ok(&[
        "import",
        "--change",
        "CMD [\"/bin/sh\"]",
        tar.to_str().expect("utf-8"),
        "localhost/bb:latest",
    ]);

    // 1. podman lists the network, with vswitch as its driver.
    let ls = s.podman_ok(&["network", "ls", "--format", "{{.Name}} {{.Driver}}"]);
    assert!(ls.lines().any(|l| l == "pmnet vswitch"), "{ls}");

    // 2. Two containers ping each other by name.
    let httpd = ["httpd", "-f", "-vv", "-p", "8080", "-h", "/www"];
    let out = s.run_container("c1", &["-p", "18080:8080"], &httpd);
    assert!(out.status.success(), "c1: {}", text(&out.stderr));
    let out = s.run_container("c2", &[], &["sleep", "600"]);
    assert!(out.status.success(), "c2: {}", text(&out.stderr));
    assert!(s.ping("c2", "c1"), "c2 cannot ping c1 by name");
    assert!(s.ping("c1", "c2"), "c1 cannot ping c2 by name");
    let c1_ip = podman_ip(&s, "c1", "pmnet");
    let mut eps = s.endpoints("pmnet");
    eps.sort();
    assert_eq!(eps, ["c1", "c2"]);

    // 3. A published port serves a client on the daemon's host side, and the container sees
    // that client's own address.
    let outside = Outside::behind(&s.s.ns.name);
    let curl_outside = || {
        curl_ok(
            &outside.ns.name,
            &format!("http://{}:18080/", Outside::DAEMON_IP),
        )
    };
    assert_eq!(curl_outside(), "hello-from-podman\n");
    let seen = wait_until(secs(5), || {
        text(&s.podman(&["logs", "c1"]).stderr).contains(Outside::IP)
            || text(&s.podman(&["logs", "c1"]).stdout).contains(Outside::IP)
    });
    assert!(seen, "c1's httpd did not see {}", Outside::IP);

    // 4. stop and start keep the name; rm -f removes the endpoint and the name.
    s.podman_ok(&["stop", "-t", "0", "c2"]);
    assert_eq!(
        s.endpoints("pmnet"),
        ["c1"],
        "a stopped container has no endpoint"
    );
    s.podman_ok(&["start", "c2"]);
    assert!(s.ping("c1", "c2"), "c2 unreachable by name after start");
    let c2_ip = podman_ip(&s, "c2", "pmnet");
    let found = s.lookup("c1", "c2");
    assert!(found.contains(&format!("Address: {c2_ip}")), "{found}");
    s.podman_ok(&["rm", "-f", "-t", "0", "c2"]);
    assert_eq!(s.endpoints("pmnet"), ["c1"]);
    let gone = s.lookup("c1", "c2");
    assert!(
        gone.contains("NXDOMAIN") && !gone.contains(&c2_ip),
        "c2 still resolves: {gone}"
    );

    // 5. SIGKILL the daemon and start it again: podman's containers stay connected, by name,
    // and the published port still serves.
    let out = s.run_container("c3", &[], &["sleep", "600"]);
    assert!(out.status.success(), "c3: {}", text(&out.stderr));
    assert!(s.ping("c3", "c1"));
    s.s.kill9_and_restart_daemon();
    assert!(s.ping("c3", "c1"), "c3 lost c1 after the daemon's restart");
    assert!(s.ping("c1", "c3"), "c1 lost c3 after the daemon's restart");
    assert_eq!(curl_outside(), "hello-from-podman\n");
    assert!(s.lookup("c3", "c1").contains(&format!("Address: {c1_ip}")));

    // 6. A run whose ADD fails (its host port is taken) leaves no endpoint and no name.
    let _taken = NsDaemon::spawn(
        &s.s.ns.name,
        &[
            "python3",
            "-c",
            "import socket,time; s=socket.socket(); s.bind(('0.0.0.0',18081)); s.listen(); time.sleep(600)",
        ],
    );
    assert!(wait_until(secs(10), || {
        s.s.ns
            .exec(&["ss", "-Htln", "sport = :18081"], secs(5))
            .stdout
            .len()
            > 1
    }));
    let out = s.run_container("c4", &["-p", "18081:8080"], &["sleep", "600"]);
    assert!(!out.status.success(), "c4 ran on a taken port");
    assert!(
        text(&out.stderr).contains("already in use"),
        "{}",
        text(&out.stderr)
    );
    let mut eps = s.endpoints("pmnet");
    eps.sort();
    assert_eq!(eps, ["c1", "c3"], "a failed ADD left an endpoint behind");
    let stale = s.lookup("c1", "c4");
    assert!(stale.contains("NXDOMAIN"), "c4 resolves: {stale}");
    assert!(s.ping("c1", "c3"), "the failed run disturbed the others");
}
