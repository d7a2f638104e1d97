//! Containers without an engine: `vswitch run` and friends.
//!
//! A container is a process (`vswitch __init`, which execs CMD) in fresh network, mount and UTS
//! namespaces, running the host's filesystem. The daemon starts it, waits until it has made its
//! network namespace, attaches that namespace like any other, writes the container's
//! resolv.conf and hosts files, and only then lets it exec CMD, so CMD's first packet already
//! has `eth0`. Output goes to a log file in the state directory. When the process exits, the
//! daemon detaches its endpoints at once (which is what leaves `container:` dependants with only
//! `lo`, as in Docker) and records the exit code.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use vswitch_netdev::ns::NetNs;

use super::state::Container;
use super::{ApiError, ApiResult, Daemon, Inner, check_name, find_network, now_rfc3339, random_id};
use crate::api::{AttachRequest, ContainerInfo, LogChunk, RunRequest, Target};
use crate::container_init::{InitConfig, InitNet};

/// How long a stopped container gets between SIGTERM and SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest log slice returned at once.
const LOG_CHUNK: u64 = 256 * 1024;

/// The network mode of a container.
pub(super) enum Mode {
    Network(String),
    Host,
    None,
    Container(String),
}

pub(super) fn mode_of(network: &str) -> Mode {
    match network {
        "host" => Mode::Host,
        "none" => Mode::None,
        n => match n.strip_prefix("container:") {
            Some(x) => Mode::Container(x.to_owned()),
            None => Mode::Network(n.to_owned()),
        },
    }
}

impl Daemon {
    fn container_dir(&self, id: &str) -> PathBuf {
        self.state_dir.path().join("containers").join(id)
    }

    fn find_container<'a>(inner: &'a Inner, key: &str) -> ApiResult<&'a Container> {
        inner
            .store
            .containers
            .values()
            .find(|c| c.name == key || c.id == key)
            .or_else(|| {
                let mut m = inner
                    .store
                    .containers
                    .values()
                    .filter(|c| !key.is_empty() && c.id.starts_with(key));
                match (m.next(), m.next()) {
                    (Some(c), None) => Some(c),
                    _ => None,
                }
            })
            .ok_or_else(|| ApiError::not_found(format!("no such container: {key}")))
    }

    /// `vswitch run`: creates and starts a container.
    pub async fn run_container(self: &Arc<Self>, req: RunRequest) -> ApiResult<ContainerInfo> {
        let mut inner = self.inner.lock().await;
        if req.cmd.is_empty() {
            return Err(ApiError::bad_request(
                "no command given (vswitch run ... -- CMD)",
            ));
        }
        let id = random_id();
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| format!("c-{}", &id[..12]));
        check_name("container", &name)?;
        if inner.store.containers.values().any(|c| c.name == name) {
            return Err(ApiError::conflict(format!(
                "the container name {name} is already in use"
            )));
        }
        if inner.store.endpoints.values().any(|e| e.name == name) {
            return Err(ApiError::conflict(format!(
                "the name {name} is already used by an attached endpoint"
            )));
        }
        let network = req
            .network
            .clone()
            .unwrap_or_else(|| super::DEFAULT_NETWORK.to_owned());
        match mode_of(&network) {
            Mode::Network(n) => {
                let net = find_network(&inner.store, &n)?;
                super::check_aliases_allowed(net, &req.aliases)?;
            }
            Mode::Container(x) => {
                let parent = Self::find_container(&inner, &x)?;
                if parent.pid.is_none() {
                    return Err(ApiError::conflict(format!("container {x} is not running")));
                }
                if !req.ports.is_empty() || req.ipv4_address.is_some() || !req.aliases.is_empty() {
                    return Err(ApiError::bad_request(
                        "conflicting options: --network container: shares another container's network (no -p, --ip or --alias)",
                    ));
                }
            }
            Mode::Host | Mode::None => {
                if !req.ports.is_empty() || req.ipv4_address.is_some() || !req.aliases.is_empty() {
                    return Err(ApiError::bad_request(format!(
                        "conflicting options: -p, --ip and --alias need a network, not --network {network}"
                    )));
                }
                if matches!(mode_of(&network), Mode::Host) && req.hostname.is_some() {
                    return Err(ApiError::bad_request(
                        "conflicting options: --network host keeps the host's hostname (no --hostname)",
                    ));
                }
            }
        }
        if let Some(h) = &req.hostname {
            check_name("hostname", h)?;
        }
        let c = Container {
            id: id.clone(),
            name,
            cmd: req.cmd,
            network,
            ip: req.ipv4_address,
            aliases: req.aliases,
            ports: req.ports,
            hostname: req.hostname,
            created: now_rfc3339(),
            pid: None,
            start_ticks: None,
            exit_code: None,
            connected: Vec::new(),
        };
        let started = self.start_locked(&mut inner, c).await?;
        inner.store.containers.insert(id, started.clone());
        self.state_dir.save(&inner.store)?;
        Ok(container_info(&inner, &started))
    }

    /// `vswitch start`.
    pub async fn start_container(self: &Arc<Self>, key: &str) -> ApiResult<ContainerInfo> {
        let mut inner = self.inner.lock().await;
        let c = Self::find_container(&inner, key)?.clone();
        if c.pid.is_some() {
            return Err(ApiError::conflict(format!(
                "container {} is already running",
                c.name
            )));
        }
        if let Mode::Container(x) = mode_of(&c.network) {
            let parent = Self::find_container(&inner, &x)?;
            if parent.pid.is_none() {
                return Err(ApiError::conflict(format!(
                    "cannot start {}: it shares the network of {x}, which is not running",
                    c.name
                )));
            }
        }
        let started = self.start_locked(&mut inner, c).await?;
        inner
            .store
            .containers
            .insert(started.id.clone(), started.clone());
        self.state_dir.save(&inner.store)?;
        Ok(container_info(&inner, &started))
    }

    async fn start_locked(
        self: &Arc<Self>,
        inner: &mut Inner,
        mut c: Container,
    ) -> ApiResult<Container> {
        let dir = self.container_dir(&c.id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ApiError::internal(format!("cannot create {}: {e}", dir.display())))?;
        let resolv = dir.join("resolv.conf");
        let hosts = dir.join("hosts");
        let mode = mode_of(&c.network);
        let (net, parent_pid) = match &mode {
            Mode::Network(n) => (Some(find_network(&inner.store, n)?.clone()), None),
            Mode::Container(x) => (None, Self::find_container(inner, x)?.pid),
            _ => (None, None),
        };
        let init_net = match &mode {
            Mode::Network(_) => InitNet::New { lo_only: false },
            Mode::None => InitNet::New { lo_only: true },
            Mode::Host => InitNet::Host,
            Mode::Container(x) => match parent_pid {
                Some(p) => InitNet::Join(PathBuf::from(format!("/proc/{p}/ns/net"))),
                None => return Err(ApiError::conflict(format!("container {x} is not running"))),
            },
        };
        // resolv.conf: the gateway on networks; the host's otherwise (a copy, so the host's
        // file is never touched); container:X shares X's.
        let resolv_text = match (&mode, &net) {
            (Mode::Network(_), Some(n)) => {
                let mut t = format!("nameserver {}\n", n.gateway);
                if n.dns_names {
                    t.push_str(&format!("search {}\n", n.name));
                }
                t.push_str("options ndots:0\n");
                t
            }
            (Mode::Container(x), _) => {
                let parent = Self::find_container(inner, x)?;
                std::fs::read_to_string(self.container_dir(&parent.id).join("resolv.conf"))
                    .unwrap_or_default()
            }
            _ => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        };
        std::fs::write(&resolv, resolv_text).map_err(|e| ApiError::internal(e.to_string()))?;
        let hostname = match &mode {
            Mode::Host => None,
            _ => Some(c.hostname.clone().unwrap_or_else(|| c.name.clone())),
        };
        write_hosts(
            &hosts,
            None,
            hostname.as_deref().unwrap_or(&c.name),
            &c.name,
        )?;
        // Rootless containers get the user's subordinate ID ranges when the system has them
        // (and newuidmap), so files of other owners and setuid tools work inside.
        let ranges = if self.rootless && !matches!(mode, Mode::Container(_)) {
            subordinate_ranges()
        } else {
            None
        };
        let config = InitConfig {
            cmd: c.cmd.clone(),
            hostname: hostname.clone(),
            net: init_net,
            resolv_conf: Some(resolv.clone()),
            hosts: Some(hosts.clone()),
            maps_by_parent: ranges.is_some(),
        };
        let config_path = dir.join("init.json");
        std::fs::write(
            &config_path,
            serde_json::to_vec(&config).map_err(|e| ApiError::internal(e.to_string()))?,
        )
        .map_err(|e| ApiError::internal(e.to_string()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("log"))
            .map_err(|e| ApiError::internal(format!("cannot open the log: {e}")))?;
        let exe = std::env::current_exe().map_err(|e| ApiError::internal(e.to_string()))?;
        let mut child = tokio::process::Command::new(exe)
            .arg("__init")
            .arg("--config")
            .arg(&config_path)
            .stdin(std::process::Stdio::piped())
            .stdout(
                log.try_clone()
                    .map_err(|e| ApiError::internal(e.to_string()))?,
            )
            .stderr(log)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| ApiError::internal(format!("cannot start the container: {e}")))?;
        let Some(pid) = child.id() else {
            return Err(ApiError::internal("the container exited at once"));
        };
        let abort = |child: &mut tokio::process::Child| {
            let _ = child.start_kill();
        };

        if let Some(ranges) = &ranges {
            let own_user = std::fs::read_link("/proc/self/ns/user").ok();
            let user_path = format!("/proc/{pid}/ns/user");
            let mut ready = false;
            for _ in 0..500 {
                let theirs = std::fs::read_link(&user_path).ok();
                if theirs.is_some() && theirs != own_user {
                    ready = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let mapped = match ready {
                true => write_id_maps(pid, ranges).await,
                false => Err("the container did not create its user namespace".to_owned()),
            };
            if let Err(e) = mapped {
                abort(&mut child);
                return Err(ApiError::internal(e));
            }
        }

        if !matches!(mode, Mode::Host) {
            // Wait for the init process to be in its network namespace (a new one, or the one
            // of container:X it joins): attach needs it, and so does an `exec` right after
            // `start` returns, which would otherwise land in the daemon's namespace.
            let own = self.own_netns;
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            let mut ready = false;
            for _ in 0..500 {
                if NetNs::open(&path).is_ok_and(|ns| ns.id() != own) {
                    ready = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if !ready {
                abort(&mut child);
                return Err(ApiError::internal(
                    "the container did not create its namespaces",
                ));
            }
        }
        if let Mode::Network(n) = &mode {
            let req = container_attach(
                pid,
                &c.name,
                c.ip.clone(),
                c.aliases.clone(),
                c.ports.clone(),
            );
            match self.attach_locked(inner, n, req).await {
                Ok(ep) => {
                    let ip = ep.ipv4_address.split('/').next().unwrap_or("").to_owned();
                    write_hosts(
                        &hosts,
                        Some(&ip),
                        hostname.as_deref().unwrap_or(&c.name),
                        &c.name,
                    )?;
                }
                Err(e) => {
                    abort(&mut child);
                    return Err(e);
                }
            }
            // Networks joined later with `network connect`; one that is gone is left out.
            for conn in c.connected.clone() {
                let Some(net) = inner.store.networks.get(&conn.network_id).cloned() else {
                    tracing::warn!(container = %c.name, "a connected network is gone");
                    c.connected.retain(|x| x.network_id != conn.network_id);
                    continue;
                };
                let req = container_attach(
                    pid,
                    &c.name,
                    conn.ip.clone(),
                    conn.aliases.clone(),
                    Vec::new(),
                );
                if let Err(e) = self.attach_locked(inner, &net.id, req).await {
                    tracing::warn!(container = %c.name, network = %net.name, error = %e.message, "cannot connect the container again");
                }
            }
        }

        // Go: CMD may start now.
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(b"g").await;
        }
        c.pid = Some(pid);
        c.start_ticks = start_ticks(pid);
        c.exit_code = None;
        let daemon = self.clone();
        let id = c.id.clone();
        let watcher = tokio::spawn(async move {
            let code = match child.wait().await {
                Ok(status) => status.code().or_else(|| {
                    std::os::unix::process::ExitStatusExt::signal(&status).map(|s| 128 + s)
                }),
                Err(_) => None,
            };
            daemon.container_exited(&id, code).await;
        });
        inner.watchers.insert(c.id.clone(), watcher.abort_handle());
        tracing::info!(container = %c.name, pid, network = %c.network, "container started");
        Ok(c)
    }

    /// After a restart: keep watching containers that are still running (they are no longer our
    /// children, so their exit is noticed by polling and its code is unknown).
    pub(super) fn adopt_containers(self: &Arc<Self>, inner: &mut Inner) {
        let running: Vec<Container> = inner
            .store
            .containers
            .values()
            .filter(|c| c.pid.is_some())
            .cloned()
            .collect();
        for c in running {
            let (Some(pid), ticks) = (c.pid, c.start_ticks) else {
                continue;
            };
            let daemon = self.clone();
            let id = c.id.clone();
            let alive = move || start_ticks(pid).is_some() && start_ticks(pid) == ticks;
            if !alive() {
                if let Some(c) = inner.store.containers.get_mut(&id) {
                    c.pid = None;
                    c.start_ticks = None;
                }
                continue;
            }
            let watcher = tokio::spawn(async move {
                while alive() {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                daemon.container_exited(&id, None).await;
            });
            inner.watchers.insert(c.id.clone(), watcher.abort_handle());
        }
    }

    async fn container_exited(self: &Arc<Self>, id: &str, code: Option<i32>) {
        let mut inner = self.inner.lock().await;
        inner.watchers.remove(id);
        let Some(c) = inner.store.containers.get_mut(id) else {
            return;
        };
        if let Some(pid) = c.pid.and_then(|p| i32::try_from(p).ok()) {
            // The main process is gone: so is the container, as when PID 1 of a PID namespace
            // exits. What it started lives on in its process group (the init made itself a
            // session and group leader), so that group gets SIGKILL. Containers in another
            // container's network namespace have their own groups and are left alone.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        c.pid = None;
        c.start_ticks = None;
        c.exit_code = code;
        let name = c.name.clone();
        tracing::info!(container = %name, code = ?code, "container exited");
        // Detach at once: the namespace may live on in `container:` dependants, which must be
        // left with only lo.
        let eps: Vec<_> = inner
            .store
            .endpoints
            .values()
            .filter(|e| e.name == name)
            .cloned()
            .collect();
        for ep in &eps {
            self.unplug(&mut inner, ep).await;
        }
        if let Err(e) = self.state_dir.save(&inner.store) {
            tracing::error!(error = %e, "cannot save state");
        }
    }

    pub async fn containers(&self) -> Vec<ContainerInfo> {
        let inner = self.inner.lock().await;
        inner
            .store
            .containers
            .values()
            .map(|c| container_info(&inner, c))
            .collect()
    }

    pub async fn container(&self, key: &str) -> ApiResult<ContainerInfo> {
        let inner = self.inner.lock().await;
        Ok(container_info(&inner, Self::find_container(&inner, key)?))
    }

    /// Sends a signal to a running container's process.
    pub async fn kill_container(&self, key: &str, signal: &str) -> ApiResult<()> {
        let inner = self.inner.lock().await;
        let c = Self::find_container(&inner, key)?;
        let Some(pid) = c.pid else {
            return Err(ApiError::conflict(format!(
                "container {} is not running",
                c.name
            )));
        };
        let sig: nix::sys::signal::Signal = signal
            .parse()
            .or_else(|_| format!("SIG{signal}").parse())
            .map_err(|_| ApiError::bad_request(format!("unknown signal {signal}")))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
            .map_err(|e| ApiError::internal(format!("cannot signal {}: {e}", c.name)))
    }

    /// `vswitch stop`: SIGTERM, then SIGKILL after `timeout`; returns once it has exited.
    pub async fn stop_container(&self, key: &str, timeout: Duration) -> ApiResult<ContainerInfo> {
        let id = {
            let inner = self.inner.lock().await;
            Self::find_container(&inner, key)?.id.clone()
        };
        if self.kill_container(&id, "SIGTERM").await.is_ok()
            && !self.wait_stopped(&id, timeout).await
        {
            let _ = self.kill_container(&id, "SIGKILL").await;
            self.wait_stopped(&id, Duration::from_secs(5)).await;
        }
        self.container(&id).await
    }

    async fn wait_stopped(&self, id: &str, timeout: Duration) -> bool {
        // A timeout too long to add (`stop -t` with a huge value) means no deadline.
        let deadline = tokio::time::Instant::now().checked_add(timeout);
        loop {
            {
                let inner = self.inner.lock().await;
                if inner
                    .store
                    .containers
                    .get(id)
                    .is_none_or(|c| c.pid.is_none())
                {
                    return true;
                }
            }
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `vswitch rm [-f]`.
    pub async fn remove_container(&self, key: &str, force: bool) -> ApiResult<()> {
        let c = {
            let inner = self.inner.lock().await;
            Self::find_container(&inner, key)?.clone()
        };
        if c.pid.is_some() {
            if !force {
                return Err(ApiError::conflict(format!(
                    "container {} is running: stop it first or use rm -f",
                    c.name
                )));
            }
            let _ = self.kill_container(&c.id, "SIGKILL").await;
            self.wait_stopped(&c.id, Duration::from_secs(5)).await;
        }
        let mut inner = self.inner.lock().await;
        inner.store.containers.remove(&c.id);
        self.state_dir.save(&inner.store)?;
        let _ = std::fs::remove_dir_all(self.container_dir(&c.id));
        Ok(())
    }

    pub async fn container_logs(&self, key: &str, offset: u64) -> ApiResult<LogChunk> {
        let id = {
            let inner = self.inner.lock().await;
            Self::find_container(&inner, key)?.id.clone()
        };
        let path = self.container_dir(&id).join("log");
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(_) => {
                return Ok(LogChunk {
                    data: String::new(),
                    next_offset: offset,
                });
            }
        };
        use std::io::Seek;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let start = offset.min(len);
        let _ = f.seek(std::io::SeekFrom::Start(start));
        let mut buf = Vec::new();
        let _ = f.take(LOG_CHUNK).read_to_end(&mut buf);
        Ok(LogChunk {
            next_offset: start + buf.len() as u64,
            data: String::from_utf8_lossy(&buf).into_owned(),
        })
    }
}

/// The user's subordinate ID ranges: ((uid start, count), (gid start, count)), if /etc/subuid
/// and /etc/subgid have them and newuidmap/newgidmap are installed.
fn subordinate_ranges() -> Option<((u64, u64), (u64, u64))> {
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
async fn write_id_maps(
    pid: u32,
    ((us, uc), (gs, gc)): &((u64, u64), (u64, u64)),
) -> Result<(), String> {
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

fn write_hosts(
    path: &std::path::Path,
    ip: Option<&str>,
    hostname: &str,
    name: &str,
) -> ApiResult<()> {
    let mut t = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    let names = if hostname == name {
        name.to_owned()
    } else {
        format!("{hostname} {name}")
    };
    match ip {
        Some(ip) => t.push_str(&format!("{ip}\t{names}\n")),
        None => t.push_str(&format!("127.0.1.1\t{names}\n")),
    }
    std::fs::write(path, t)
        .map_err(|e| ApiError::internal(format!("cannot write {}: {e}", path.display())))
}

/// Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot.
/// How a container's init process joins a network: under the container's name.
fn container_attach(
    pid: u32,
    name: &str,
    ipv4_address: Option<String>,
    aliases: Vec<String>,
    ports: Vec<String>,
) -> AttachRequest {
    AttachRequest {
        target: Target::Pid(pid),
        name: Some(name.to_owned()),
        ipv4_address,
        ipv6_address: None,
        aliases,
        mac_address: None,
        ifname: None,
        ports,
    }
}

pub(super) fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(") ")?.1;
    after.split_whitespace().nth(19)?.parse().ok()
}

fn container_info(inner: &Inner, c: &Container) -> ContainerInfo {
    let eps = inner.store.endpoints.values().filter(|e| e.name == c.name);
    let mut ips = Vec::new();
    let mut ports = Vec::new();
    for e in eps {
        ips.push(e.ipv4.to_string());
        ports.extend(e.ports.iter().map(ToString::to_string));
    }
    ContainerInfo {
        id: c.id.clone(),
        name: c.name.clone(),
        network: c.network.clone(),
        ips,
        ports,
        status: if c.pid.is_some() {
            "running".into()
        } else {
            "exited".into()
        },
        pid: c.pid,
        exit_code: c.exit_code,
        cmd: c.cmd.clone(),
        created: c.created.clone(),
    }
}
