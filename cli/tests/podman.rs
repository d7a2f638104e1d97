//! vswitch as the network of real podman (Debian's 4.3, CNI backend), in a sandbox that touches
//! nothing of the host's podman: a network namespace and a private mount namespace of the
//! test's own, with tmpfs over `/run/containers`, `/run/libpod`, `/run/netns` and `/var/lib`
//! (podman's CNI cache and blob cache live there), and podman's `--root`, `--runroot`,
//! `--network-config-dir` and `CONTAINERS_CONF` pointing at the test's files. The vswitch
//! daemon runs in the same namespaces, as it would on a host. The image is a busybox rootfs
//! made with `podman import`.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vswitch_tests::{
    Netns, NsDaemon, Outside, TempDir, require_root, run, secs, text, unique, vswitch_bin,
    wait_until,
};

/// The sandbox: a namespace pair held open by a sleeping shell, the daemon inside it, and
/// every path podman writes to.
struct Sandbox {
    ns: Netns,
    dir: TempDir,
    holder: Child,
    daemon: Option<Child>,
}

impl Sandbox {
    fn new() -> Self {
        let ns = Netns::new("pm");
        let dir = TempDir(std::env::temp_dir().join(unique("-podman")));
        fs::create_dir_all(dir.0.join("net")).expect("dir");
        fs::create_dir_all(dir.0.join("plugins")).expect("dir");
        let ready = dir.0.join("ready");
        // No `ip netns exec`: it remounts /sys, and runc then finds no cgroup mounts.
        let script = format!(
            "set -e
             for d in /run/containers /run/libpod /var/lib; do mkdir -p $d; mount -t tmpfs tmpfs $d; done
             mount -t tmpfs tmpfs /run/netns
             ip link set lo up
             ip addr add 198.18.0.53/32 dev lo
             echo 'nameserver 198.18.0.53' > {dir}/resolv.conf
             mount --bind {dir}/resolv.conf /etc/resolv.conf
             touch {ready}
             exec sleep 3600",
            dir = dir.0.display(),
            ready = ready.display(),
        );
        let holder = Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .args(["unshare", "-m", "--propagation", "private", "sh", "-c"])
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the sandbox");
        let mut s = Self {
            ns,
            dir,
            holder,
            daemon: None,
        };
        assert!(
            wait_until(secs(10), || ready.exists()),
            "the sandbox did not come up"
        );
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
        s.start_daemon();
        s
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.0.join(rel)
    }

    fn holder_pid(&self) -> String {
        self.holder.id().to_string()
    }

    /// A command entering the sandbox's network and mount namespaces.
    fn inside(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.holder_pid(), "-n", "-m"])
            .arg(program);
        cmd
    }

    fn start_daemon(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("daemon.log"))
            .expect("log");
        let child = self
            .inside(vswitch_bin())
            .arg("--socket")
            .arg(self.path("vs.sock"))
            .arg("daemon")
            .arg("--state-dir")
            .arg(self.path("state"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        self.daemon = Some(child);
        let socket = self.path("vs.sock");
        assert!(
            wait_until(secs(15), || std::os::unix::net::UnixStream::connect(
                &socket
            )
            .is_ok()),
            "daemon did not start: {}",
            fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
        );
    }

    fn kill9_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        let _ = fs::remove_file(self.path("vs.sock"));
    }

    fn vs(&self, args: &[&str]) -> Output {
        run(
            self.inside(vswitch_bin())
                .arg("--socket")
                .arg(self.path("vs.sock"))
                .args(args),
            secs(30),
        )
    }

    fn vs_ok(&self, args: &[&str]) -> String {
        let out = self.vs(args);
        assert!(
            out.status.success(),
            "vswitch {args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Runs podman in the sandbox. Its output goes to files, not pipes: conmon inherits
    /// podman's stdout and outlives it.
    fn podman(&self, args: &[&str]) -> Output {
        let out_path = self.path("podman.out");
        let err_path = self.path("podman.err");
        let mut child = self
            .inside("podman")
            .env("CONTAINERS_CONF", self.path("containers.conf"))
            .env("TMPDIR", &self.dir.0)
            .arg("--root")
            .arg(self.path("storage"))
            .args(["--runroot", "/run/containers/storage"])
            .arg("--network-config-dir")
            .arg(self.path("net"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_path).expect("out"))
            .stderr(fs::File::create(&err_path).expect("err"))
            .spawn()
            .expect("podman");
        let deadline = Instant::now() + secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Output {
            status,
            stdout: fs::read(&out_path).unwrap_or_default(),
            stderr: fs::read(&err_path).unwrap_or_default(),
        }
    }

    fn podman_ok(&self, args: &[&str]) -> String {
        let out = self.podman(args);
        assert!(
            out.status.success(),
            "podman {args:?}: {}\ndaemon log:\n{}",
            text(&out.stderr),
            fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
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

    /// The names of the network's endpoints, from `vswitch network inspect`.
    fn endpoints(&self, network: &str) -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&self.vs_ok(&["network", "inspect", network])).expect("json");
        let v = if v.is_array() { v[0].clone() } else { v };
        v["Containers"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|c| c["Name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
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

    /// Every process in the sandbox's mount namespace (conmon, containers, the daemon), so
    /// that nothing outlives the test.
    fn kill_everything_inside(&mut self) {
        let mine = fs::read_link(format!("/proc/{}/ns/mnt", self.holder.id())).ok();
        if let (Some(mine), Ok(procs)) = (mine, fs::read_dir("/proc")) {
            for p in procs.flatten() {
                let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                if pid as u32 == std::process::id() {
                    continue;
                }
                if fs::read_link(p.path().join("ns/mnt")).ok().as_ref() == Some(&mine) {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
            }
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.podman(&["rm", "-a", "-f", "-t", "0"]);
        self.kill9_daemon();
        self.kill_everything_inside();
    }
}

/// A busybox rootfs as a tarball, with a page for httpd.
fn busybox_tar(dir: &Path) -> PathBuf {
    let tar = dir.join("busybox.tar");
    let script = format!(
        r#"set -e
R={root}; mkdir -p $R/bin $R/etc $R/tmp $R/proc $R/sys $R/dev $R/www $R/root
cp /bin/busybox $R/bin/busybox
for a in $(/bin/busybox --list-full); do
  [ "$a" = bin/busybox ] && continue
  mkdir -p "$R/$(dirname "$a")"; ln -sf /bin/busybox "$R/$a"
done
echo 'root:x:0:0:root:/root:/bin/sh' > $R/etc/passwd; echo 'root:x:0:' > $R/etc/group
echo hello-from-podman > $R/www/index.html
tar -C $R -cf {tar} ."#,
        root = dir.join("rootfs").display(),
        tar = tar.display()
    );
    let out = run(Command::new("sh").args(["-c", &script]), secs(60));
    assert!(out.status.success(), "rootfs: {}", text(&out.stderr));
    tar
}

/// The address of container `name` on `network`, as podman reports it.
fn podman_ip(s: &Sandbox, name: &str, network: &str) -> String {
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
    let mut s = Sandbox::new();
    s.vs_ok(&["network", "create", "pmnet"]);
    let conflist = s.vs_ok(&["cni", "config", "pmnet"]);
    fs::write(s.path("net/pmnet.conflist"), conflist).expect("conflist");
    let tar = busybox_tar(&s.dir.0);
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
    let outside = Outside::behind(&s.ns.name);
    let curl_outside = || {
        run_curl(
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
    s.kill9_daemon();
    s.start_daemon();
    assert!(s.ping("c3", "c1"), "c3 lost c1 after the daemon's restart");
    assert!(s.ping("c1", "c3"), "c1 lost c3 after the daemon's restart");
    assert_eq!(curl_outside(), "hello-from-podman\n");
    assert!(s.lookup("c3", "c1").contains(&format!("Address: {c1_ip}")));

    // 6. A run whose ADD fails (its host port is taken) leaves no endpoint and no name.
    let _taken = NsDaemon::spawn(
        &s.ns.name,
        &[
            "python3",
            "-c",
            "import socket,time; s=socket.socket(); s.bind(('0.0.0.0',18081)); s.listen(); time.sleep(600)",
        ],
    );
    assert!(wait_until(secs(10), || {
        s.ns.exec(&["ss", "-Htln", "sport = :18081"], secs(5))
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

/// curl from a namespace: the body, or a panic with curl's error.
fn run_curl(ns: &str, url: &str) -> String {
    let out = run(
        Command::new("ip").args(["netns", "exec", ns, "curl", "-sS", "--max-time", "10", url]),
        secs(20),
    );
    assert!(out.status.success(), "curl {url}: {}", text(&out.stderr));
    text(&out.stdout)
}
