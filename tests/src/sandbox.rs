//! A host of the test's own for container engines (podman, dockerd): a network namespace and
//! a private mount namespace, held open by a sleeping process, with tmpfs over the engine's
//! fixed paths so that nothing of the machine's own engine is read or written. The vswitch
//! daemon runs in the same namespaces, as it would on a host.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::{Netns, TempDir, run, secs, text, unique, vswitch_bin, wait_until};

pub struct Sandbox {
    pub ns: Netns,
    pub dir: TempDir,
    holder: Child,
    daemon: Option<Child>,
    daemon_args: Vec<String>,
}

impl Sandbox {
    /// A sandbox with tmpfs over each of `tmpfs` (made first if missing), loopback up with
    /// 198.18.0.53 on it, and a resolv.conf naming that address (engines drop loopback
    /// nameservers and put public ones in their place).
    pub fn new(tmpfs: &[&str]) -> Self {
        let ns = Netns::new("sbx");
        let dir = TempDir(std::env::temp_dir().join(unique("-sbx")));
        fs::create_dir_all(&dir.0).expect("dir");
        let ready = dir.0.join("ready");
        let mounts: String = tmpfs
            .iter()
            .map(|d| format!("mkdir -p {d}; mount -t tmpfs tmpfs {d}\n"))
            .collect();
        // No `ip netns exec`: it remounts /sys, and runc then finds no cgroup mounts.
        let script = format!(
            "set -e
             {mounts}
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
        let s = Self {
            ns,
            dir,
            holder,
            daemon: None,
            daemon_args: Vec::new(),
        };
        assert!(
            wait_until(secs(10), || ready.exists()),
            "the sandbox did not come up"
        );
        s
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.0.join(rel)
    }

    /// A command entering the sandbox's network and mount namespaces.
    pub fn inside(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.holder.id().to_string(), "-n", "-m"])
            .arg(program);
        cmd
    }

    /// Runs `cmd` with its output in files, not pipes (engines leave processes behind that
    /// inherit them), within `timeout`.
    pub fn run_to_files(&self, cmd: &mut Command, timeout: Duration) -> Output {
        let out_path = self.path("cmd.out");
        let err_path = self.path("cmd.err");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_path).expect("out"))
            .stderr(fs::File::create(&err_path).expect("err"))
            .spawn()
            .expect("spawn");
        let status = crate::wait_child(&mut child, timeout, cmd);
        Output {
            status,
            stdout: fs::read(&out_path).unwrap_or_default(),
            stderr: fs::read(&err_path).unwrap_or_default(),
        }
    }

    pub fn daemon_log(&self) -> String {
        fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    /// Starts `vswitch daemon` inside, on `vs.sock` and `state`, with `extra` flags (kept for
    /// restarts).
    pub fn start_daemon(&mut self, extra: &[&str]) {
        self.daemon_args = extra.iter().map(|s| s.to_string()).collect();
        self.spawn_daemon();
    }

    fn spawn_daemon(&mut self) {
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
            .args(&self.daemon_args)
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
            self.daemon_log()
        );
    }

    pub fn kill9_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        let _ = fs::remove_file(self.path("vs.sock"));
    }

    /// SIGKILLs the daemon and starts it again with the same flags.
    pub fn kill9_and_restart_daemon(&mut self) {
        self.kill9_daemon();
        self.spawn_daemon();
    }

    pub fn vs(&self, args: &[&str]) -> Output {
        run(
            self.inside(vswitch_bin())
                .arg("--socket")
                .arg(self.path("vs.sock"))
                .args(args),
            secs(30),
        )
    }

    pub fn vs_ok(&self, args: &[&str]) -> String {
        let out = self.vs(args);
        assert!(
            out.status.success(),
            "vswitch {args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// The names of a network's endpoints, from `vswitch network inspect`.
    pub fn endpoints(&self, network: &str) -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&self.vs_ok(&["network", "inspect", network])).expect("json");
        let v = if v.is_array() { v[0].clone() } else { v };
        let mut names: Vec<String> = v["Containers"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|c| c["Name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The links of the sandbox's own namespace (the host side).
    pub fn links(&self) -> Vec<String> {
        self.ns.links()
    }

    /// Kills every process in the sandbox's mount namespace (engines, conmon, containerd
    /// shims, the daemon) and their descendants (the containers, which have mount namespaces
    /// of their own), so that nothing outlives the test.
    pub fn kill_everything_inside(&mut self) {
        self.kill9_daemon();
        let mine = fs::read_link(format!("/proc/{}/ns/mnt", self.holder.id())).ok();
        let mut parent = std::collections::HashMap::new();
        let mut doomed = std::collections::HashSet::new();
        for p in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            // The parent is the 4th field of /proc/PID/stat, after the ")" that ends comm.
            let stat = fs::read_to_string(p.path().join("stat")).unwrap_or_default();
            if let Some(ppid) = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok())
            {
                parent.insert(pid, ppid);
            }
            if mine.is_some() && fs::read_link(p.path().join("ns/mnt")).ok() == mine {
                doomed.insert(pid);
            }
        }
        doomed.remove(&std::process::id());
        loop {
            let more: Vec<u32> = parent
                .iter()
                .filter(|(pid, ppid)| doomed.contains(ppid) && !doomed.contains(pid))
                .map(|(pid, _)| *pid)
                .collect();
            if more.is_empty() {
                break;
            }
            doomed.extend(more);
        }
        doomed.remove(&self.holder.id());
        for pid in doomed {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.kill_everything_inside();
    }
}

/// A busybox rootfs (busybox-static and its applets, a root user, `/www/index.html` holding
/// `page`) as a tarball in `dir`, for `podman import` or `docker import`.
pub fn busybox_tar(dir: &std::path::Path, page: &str) -> PathBuf {
    let tar = dir.join("busybox.tar");
    let root = dir.join("rootfs");
    let script = format!(
        r#"set -e
R={root}; mkdir -p $R/bin $R/etc $R/tmp $R/proc $R/sys $R/dev $R/www $R/root
cp /bin/busybox $R/bin/busybox
for a in $(/bin/busybox --list-full); do
  [ "$a" = bin/busybox ] && continue
  mkdir -p "$R/$(dirname "$a")"; ln -sf /bin/busybox "$R/$a"
done
echo 'root:x:0:0:root:/root:/bin/sh' > $R/etc/passwd; echo 'root:x:0:' > $R/etc/group
tar -C $R -cf {tar} ."#,
        root = root.display(),
        tar = tar.display()
    );
    let _ = fs::create_dir_all(root.join("www"));
    fs::write(root.join("www/index.html"), page).expect("page");
    let out = run(Command::new("sh").args(["-c", &script]), secs(60));
    assert!(out.status.success(), "rootfs: {}", text(&out.stderr));
    tar
}

/// curl from inside `ns`: the body, or a panic with curl's error.
pub fn curl_ok(ns: &str, url: &str) -> String {
    let out = run(
        Command::new("ip").args(["netns", "exec", ns, "curl", "-sS", "--max-time", "10", url]),
        secs(20),
    );
    assert!(out.status.success(), "curl {url}: {}", text(&out.stderr));
    text(&out.stdout)
}
