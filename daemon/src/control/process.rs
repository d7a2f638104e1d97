//! A container's first process as the daemon handles it: starting `vswitch __init`, giving a
//! rootless container its ID maps, and waiting until it stands in its namespaces. No lock of the
//! control plane is held here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use vswitch_netdev::ns::{NetNs, NsId};

use crate::container_init::InitConfig;
use crate::error::{Error, Result};
use crate::netns::target::proc_netns;

/// How long a starting container may take to make its namespaces.
const NAMESPACE_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(10);

/// A started init process, waiting for the go-ahead to exec its command.
pub(super) struct Init {
    pub(super) child: tokio::process::Child,
    pub(super) pid: u32,
}

impl Init {
    /// Starts `vswitch __init` with `config` (written to `dir/init.json`), its output going to
    /// `dir/log`.
    pub(super) fn spawn(dir: &Path, config: &InitConfig) -> Result<Self> {
        let internal = |what: &str, e: &dyn std::fmt::Display| Error::failed(what, e);
        let config_path = dir.join("init.json");
        let json = serde_json::to_vec(config).map_err(|e| internal("cannot encode", &e))?;
        std::fs::write(&config_path, json)
            .map_err(|e| internal("cannot write the init config", &e))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("log"))
            .map_err(|e| internal("cannot open the log", &e))?;
        let exe = std::env::current_exe().map_err(|e| internal("cannot find vswitch", &e))?;
        let child = tokio::process::Command::new(exe)
            .arg("__init")
            .arg("--config")
            .arg(&config_path)
            .stdin(std::process::Stdio::piped())
            .stdout(
                log.try_clone()
                    .map_err(|e| internal("cannot open the log", &e))?,
            )
            .stderr(log)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| internal("cannot start the container", &e))?;
        let Some(pid) = child.id() else {
            return Err(Error::internal("the container exited at once"));
        };
        Ok(Self { child, pid })
    }

    /// Lets the init process exec its command.
    pub(super) async fn go(&mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"g").await;
        }
    }

    pub(super) fn kill(&mut self) {
        let _ = self.child.start_kill();
    }

    /// Waits (without any lock) until the init process stands where it should: with
    /// `id_maps`, in a user namespace of its own whose maps are then written; unless it keeps
    /// the host's network, in a network namespace that is not `own` (a new one, or the one of
    /// the container it joins), so that an attach, or an `exec` right after `start`, lands
    /// there and not in the daemon's.
    pub(super) async fn wait_ready(
        &self,
        id_maps: Option<&SubIds>,
        own: NsId,
        leaves_host_network: bool,
    ) -> Result<()> {
        if let Some(ranges) = id_maps {
            let own_user = std::fs::read_link("/proc/self/ns/user").ok();
            let user_path = format!("/proc/{}/ns/user", self.pid);
            let moved = wait_until(NAMESPACE_TIMEOUT, || {
                let theirs = std::fs::read_link(&user_path).ok();
                theirs.is_some() && theirs != own_user
            })
            .await;
            if !moved {
                return Err(Error::internal(
                    "the container did not create its user namespace",
                ));
            }
            write_id_maps(self.pid, ranges)
                .await
                .map_err(Error::internal)?;
        }
        if leaves_host_network {
            let path = proc_netns(self.pid);
            let moved = wait_until(NAMESPACE_TIMEOUT, || {
                NetNs::open(&path).is_ok_and(|ns| ns.id() != own)
            })
            .await;
            if !moved {
                return Err(Error::internal(
                    "the container did not create its namespaces",
                ));
            }
        }
        Ok(())
    }
}

/// Polls `done` every few milliseconds until it holds (true) or `timeout` passes (false).
pub(super) async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The user's subordinate ID ranges: (uid start, count) and (gid start, count).
pub(super) type SubIds = ((u64, u64), (u64, u64));

/// The user's subordinate ID ranges, if /etc/subuid and /etc/subgid have them and
/// newuidmap/newgidmap are installed: rootless containers get them, so files of other owners
/// and setuid tools work inside.
pub(super) fn subordinate_ranges() -> Option<SubIds> {
    let uid = nix::unistd::getuid();
    let name = nix::unistd::User::from_uid(uid).ok().flatten()?.name;
    let find = |path: &str, id: u32| -> Option<(u64, u64)> {
        let text = std::fs::read_to_string(path).ok()?;
        text.lines().find_map(|l| {
            let mut f = l.split(':');
            let who = f.next()?;
            if who != name && who != id.to_string() {
                return None;
            }
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
    };
    let have = |tool: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
    };
    if !have("newuidmap") || !have("newgidmap") {
        return None;
    }
    Some((
        find("/etc/subuid", uid.as_raw())?,
        find("/etc/subgid", nix::unistd::getgid().as_raw())?,
    ))
}

/// Maps the user to root inside the container's user namespace and its subordinate ranges
/// from 1 on, with the setuid helpers.
async fn write_id_maps(pid: u32, ((us, uc), (gs, gc)): &SubIds) -> std::result::Result<(), String> {
    let uid = nix::unistd::getuid().as_raw().to_string();
    let gid = nix::unistd::getgid().as_raw().to_string();
    for (tool, own, start, count) in [("newuidmap", &uid, us, uc), ("newgidmap", &gid, gs, gc)] {
        let out = tokio::process::Command::new(tool)
            .arg(pid.to_string())
            .args(["0", own, "1", "1", &start.to_string(), &count.to_string()])
            .output()
            .await
            .map_err(|e| format!("cannot run {tool}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{tool} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

/// The directory of a container's files (config, resolv.conf, hosts, log).
pub(super) fn container_dir(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("containers").join(id)
}
