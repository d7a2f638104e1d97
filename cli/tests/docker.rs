//! vswitch as the network and IPAM driver of real dockerd (Debian's docker.io 20.10), started
//! `--bridge=none --iptables=false --ip6tables=false` in a sandbox that touches nothing of the
//! machine's Docker: a network namespace and a private mount namespace with tmpfs over `/run`
//! (plugin sockets, containerd's), `/var/lib` and `/etc/docker` (dockerd's key), and dockerd's
//! own `--data-root`, `--exec-root`, `-H` and containerd namespaces. The image is a busybox
//! rootfs made with `docker import`. This is the seed's scenario: you_network, tomcat81 and
//! tomcat82 with published ports, ping by name, `container:tomcat81`, then removal.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

use vswitch_tests::{
    NsDaemon, Outside, Sandbox, busybox_tar, curl_ok, require_root, secs, text, unique, wait_until,
};

struct Docker {
    s: Sandbox,
    dockerd: Option<Child>,
    namespace: String,
}

impl Docker {
    fn new() -> Self {
        let mut s = Sandbox::new(&["/run", "/var/lib", "/etc/docker"]);
        let host = format!("unix://{}", s.path("docker.sock").display());
        s.start_daemon(&["--docker-plugin", "--docker-host", &host]);
        let mut d = Self {
            s,
            dockerd: None,
            namespace: unique("ctr"),
        };
        d.start_dockerd();
        d
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.s.path(rel)
    }

    fn start_dockerd(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("dockerd.log"))
            .expect("log");
        let child = self
            .s
            .inside("dockerd")
            .arg("--data-root")
            .arg(self.path("data"))
            .arg("--exec-root")
            .arg(self.path("exec"))
            .arg("--pidfile")
            .arg(self.path("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", self.path("docker.sock").display()))
            .args(["--bridge=none", "--iptables=false", "--ip6tables=false"])
            // Containers outlive a dockerd restart, as in production set-ups.
            .arg("--live-restore")
            .args(["--containerd-namespace", &self.namespace])
            .args([
                "--containerd-plugins-namespace",
                &format!("{}p", self.namespace),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("dockerd");
        self.dockerd = Some(child);
        let up = wait_until(secs(60), || self.docker(&["info"]).status.success());
        assert!(up, "dockerd did not start: {}", self.dockerd_log());
    }

    fn stop_dockerd(&mut self) {
        if let Some(mut c) = self.dockerd.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let gone = wait_until(secs(30), || c.try_wait().ok().flatten().is_some());
            if !gone {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }

    fn dockerd_log(&self) -> String {
        fs::read_to_string(self.path("dockerd.log")).unwrap_or_default()
    }

    fn docker(&self, args: &[&str]) -> Output {
        let mut cmd = self.s.inside("docker");
        cmd.env("DOCKER_CONFIG", self.path("cli"))
            .arg("-H")
            .arg(format!("unix://{}", self.path("docker.sock").display()))
            .args(args);
        self.s.run_to_files(&mut cmd, secs(60))
    }

    fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?}: {}\ndaemon log:\n{}",
            text(&out.stderr),
            self.s.daemon_log()
        );
        text(&out.stdout)
    }

    fn ping(&self, from: &str, to: &str) -> bool {
        wait_until(secs(10), || {
            self.docker(&["exec", from, "ping", "-c1", "-W1", to])
                .status
                .success()
        })
    }

    /// The ends of both daemons' logs, for failure messages.
    fn diag(&self) -> String {
        let tail = |s: String| {
            s.lines()
                .rev()
                .take(25)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        };
        format!(
            "vswitch:\n{}\ndockerd:\n{}",
            tail(self.s.daemon_log()),
            tail(self.dockerd_log())
        )
    }

    /// The TAPs vswitch made for Docker that are still in the host side's namespace.
    fn stray_taps(&self) -> Vec<String> {
        self.s
            .links()
            .into_iter()
            .filter(|l| l.starts_with("vsd"))
            .collect()
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        let ids = text(&self.docker(&["ps", "-aq"]).stdout);
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids);
            let _ = self.docker(&args);
        }
        self.stop_dockerd();
    }
}

#[test]
#[ignore = "needs root, dockerd (docker.io) and runc; run by scripts/test.sh as root"]
fn dockerd_runs_the_seed_scenario_on_vswitch() {
    require_root();
    let mut d = Docker::new();
    let tar = busybox_tar(&d.s.dir.0, "hello-from-docker\n");
    d.docker_ok(&[
        "import",
        "-c",
        "CMD [\"/bin/sh\"]",
        tar.to_str().expect("utf-8"),
        "bb:latest",
    ]);

    // 1. The network, named in vswitch as in Docker.
    d.docker_ok(&[
        "network",
        "create",
        "-d",
        "vswitch",
        "--ipam-driver",
        "vswitch",
        "you_network",
    ]);
    let named = wait_until(secs(10), || {
        d.s.vs_ok(&["network", "ls"]).contains("you_network")
    });
    assert!(named, "{}", d.s.vs_ok(&["network", "ls"]));

    // 2. Two web servers with published ports.
    for (name, port) in [("tomcat81", "18081"), ("tomcat82", "18082")] {
        d.docker_ok(&[
            "run",
            "-d",
            "-p",
            &format!("{port}:8080"),
            "--network",
            "you_network",
            "--name",
            name,
            "bb",
            "httpd",
            "-f",
            "-vv",
            "-p",
            "8080",
            "-h",
            "/www",
        ]);
    }
    let settled = wait_until(secs(10), || {
        d.s.endpoints("you_network") == ["tomcat81", "tomcat82"]
    });
    assert!(settled, "{:?}", d.s.endpoints("you_network"));

    // 3. Ping by name, both ways.
    assert!(d.ping("tomcat81", "tomcat82"), "tomcat81 -> tomcat82");
    assert!(d.ping("tomcat82", "tomcat81"), "tomcat82 -> tomcat81");
    // vswitch's own DNS on the gateway knows them too.
    let gw = d.docker_ok(&[
        "network",
        "inspect",
        "you_network",
        "-f",
        "{{(index .IPAM.Config 0).Gateway}}",
    ]);
    let asked = d.docker(&["exec", "tomcat81", "nslookup", "tomcat82", gw.trim()]);
    assert!(
        text(&asked.stdout).contains("Name:"),
        "{}{}",
        text(&asked.stdout),
        text(&asked.stderr)
    );

    // 4. Both published ports from the host side; an outside client keeps its address.
    let outside = Outside::behind(&d.s.ns.name);
    for port in ["18081", "18082"] {
        let url = format!("http://{}:{port}/", Outside::DAEMON_IP);
        assert_eq!(curl_ok(&outside.ns.name, &url), "hello-from-docker\n");
    }
    let logs = d.docker(&["logs", "tomcat81"]);
    let logs = format!("{}{}", text(&logs.stdout), text(&logs.stderr));
    assert!(logs.contains(Outside::IP), "{logs}");

    // 5. A container in tomcat81's namespace.
    let out = d.docker_ok(&[
        "run",
        "--rm",
        "--network",
        "container:tomcat81",
        "bb",
        "sh",
        "-c",
        "wget -qO- http://127.0.0.1:8080/ && ping -c1 -W2 tomcat82 >/dev/null && echo pinged",
    ]);
    assert_eq!(out, "hello-from-docker\npinged\n");

    // vswitch restarts (SIGKILL): the endpoints are plumbed again, Docker notices nothing.
    d.s.kill9_and_restart_daemon();
    assert!(
        d.ping("tomcat81", "tomcat82"),
        "after vswitch's restart: {}",
        d.diag()
    );
    let url = format!("http://{}:18082/", Outside::DAEMON_IP);
    assert_eq!(curl_ok(&outside.ns.name, &url), "hello-from-docker\n");
    // Under the name Docker gave it, which Docker's own records expect.
    for c in ["tomcat81", "tomcat82"] {
        let links = d.docker_ok(&["exec", c, "ip", "-o", "link"]);
        assert!(
            links.contains(": eth0:") && !links.contains("vsd"),
            "{c}: {links}"
        );
    }

    // dockerd restarts: the containers keep their network.
    d.stop_dockerd();
    assert!(
        d.s.endpoints("you_network") == ["tomcat81", "tomcat82"],
        "dockerd's exit took endpoints"
    );
    d.start_dockerd();
    assert!(
        d.ping("tomcat82", "tomcat81"),
        "after dockerd's restart: {}",
        d.diag()
    );

    // Docker's address options.
    d.docker_ok(&[
        "network",
        "create",
        "-d",
        "vswitch",
        "--ipam-driver",
        "vswitch",
        "--subnet",
        "10.77.0.0/24",
        "--gateway",
        "10.77.0.254",
        "--ip-range",
        "10.77.0.128/25",
        "net2",
    ]);
    d.docker_ok(&[
        "run",
        "-d",
        "--network",
        "net2",
        "--name",
        "fixed",
        "--ip",
        "10.77.0.10",
        "bb",
        "sleep",
        "600",
    ]);
    d.docker_ok(&[
        "run",
        "-d",
        "--network",
        "net2",
        "--name",
        "ranged",
        "bb",
        "sleep",
        "600",
    ]);
    let addr = d.docker_ok(&["exec", "fixed", "ip", "-4", "-o", "addr", "show", "eth0"]);
    assert!(addr.contains("10.77.0.10/24"), "{addr}");
    let addr = d.docker_ok(&["exec", "ranged", "ip", "-4", "-o", "addr", "show", "eth0"]);
    assert!(addr.contains("10.77.0.129/24"), "{addr}");
    // -P publishes the exposed ports on ports vswitch picks.
    d.docker_ok(&[
        "run",
        "-d",
        "--network",
        "net2",
        "--name",
        "exposed",
        "-P",
        "--expose",
        "9000",
        "bb",
        "sleep",
        "600",
    ]);
    // (vswitch learns the container's name from dockerd just after the start.)
    let named = wait_until(secs(10), || d.s.vs(&["port", "exposed"]).status.success());
    assert!(named, "{}", d.diag());
    let ports = d.s.vs_ok(&["port", "exposed"]);
    assert!(ports.contains("9000/tcp -> 0.0.0.0:"), "{ports}");
    let route = d.docker_ok(&["exec", "ranged", "ip", "route"]);
    assert!(route.contains("default via 10.77.0.254"), "{route}");
    assert!(d.ping("ranged", "fixed"));
    // --internal: no way out, no published ports.
    d.docker_ok(&[
        "network",
        "create",
        "-d",
        "vswitch",
        "--ipam-driver",
        "vswitch",
        "--internal",
        "inner",
    ]);
    d.docker_ok(&[
        "run",
        "-d",
        "--network",
        "inner",
        "--name",
        "shut",
        "bb",
        "sleep",
        "600",
    ]);
    let route = d.docker_ok(&["exec", "shut", "ip", "route"]);
    assert!(!route.contains("default"), "{route}");

    // A run whose port is taken fails and leaves nothing behind.
    let _taken = NsDaemon::spawn(
        &d.s.ns.name,
        &[
            "python3",
            "-c",
            "import socket,time; s=socket.socket(); s.bind(('0.0.0.0',18083)); s.listen(); time.sleep(600)",
        ],
    );
    assert!(wait_until(secs(10), || {
        d.s.ns
            .exec(&["ss", "-Htln", "sport = :18083"], secs(5))
            .stdout
            .len()
            > 1
    }));
    let out = d.docker(&[
        "run",
        "-d",
        "-p",
        "18083:8080",
        "--network",
        "you_network",
        "--name",
        "tomcat83",
        "bb",
        "sleep",
        "600",
    ]);
    assert!(!out.status.success(), "tomcat83 ran on a taken port");
    assert!(
        text(&out.stderr).contains("in use"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(d.s.endpoints("you_network"), ["tomcat81", "tomcat82"]);
    assert!(d.stray_taps().is_empty(), "{:?}", d.stray_taps());

    // 6. docker rm -f, then docker network rm: nothing is left in vswitch.
    d.docker_ok(&[
        "rm", "-f", "tomcat81", "tomcat82", "tomcat83", "fixed", "ranged", "shut", "exposed",
    ]);
    for net in ["you_network", "net2", "inner"] {
        d.docker_ok(&["network", "rm", net]);
    }
    let ls = d.s.vs_ok(&["network", "ls"]);
    for net in ["you_network", "net2", "inner", "docker-"] {
        assert!(!ls.contains(net), "{net} left: {ls}");
    }
    assert!(d.stray_taps().is_empty(), "{:?}", d.stray_taps());
    let listening = d.s.ns.exec(&["ss", "-Htln"], secs(5));
    let listening = text(&listening.stdout);
    assert!(
        !listening.contains(":18081") && !listening.contains(":18082"),
        "{listening}"
    );
}
