//! Containers without an engine: `vswitch run` and friends.
//!
//! A container is a process (`vswitch __init`, which execs CMD) in fresh network, mount and UTS
//! namespaces, running the host's filesystem. The daemon starts it, waits until it has made its
//! namespaces, attaches its network namespace like any other, writes the container's
//! resolv.conf and hosts files, and only then lets it exec CMD, so CMD's first packet already
//! has `eth0`. Output goes to a log file in the state directory. When the process exits, the
//! daemon detaches its endpoints at once (which is what leaves `container:` dependants with only
//! `lo`, as in Docker) and records the exit code.
//!
//! A start takes the control lock twice: once to check the request and start the process, once
//! to attach it. In between, while the process makes its namespaces, the lock is free and the
//! container's name and id are held in `Inner::starting`.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::process::{Init, SubIds, container_dir, subordinate_ranges};
use super::{Daemon, Inner, find_network, ids, render};
use crate::api::{AttachRequest, ContainerInfo, LogChunk, RunRequest, Target};
use crate::container_init::{InitConfig, InitNet};
use crate::error::{Error, Result};
use crate::netns::target::{proc_netns, start_ticks};
use crate::nsfiles;
use crate::plan::{self, Mode};
use crate::state::{Container, Network, Store};

/// How long a stopped container gets between SIGTERM and SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest log slice returned at once.
const LOG_CHUNK: u64 = 256 * 1024;
/// How often a container adopted after a restart (no longer our child) is checked for exit.
const ADOPTED_POLL: Duration = Duration::from_millis(250);

/// A container whose process runs but has not been let go yet.
struct Launch {
    c: Container,
    /// `c` was in the store before (`start`), not new (`run`).
    stored: bool,
    init: Init,
    mode: Mode,
    /// Rootless: the subordinate ID ranges the daemon maps into the container's user namespace.
    id_maps: Option<SubIds>,
    hostname: Option<String>,
    hosts: PathBuf,
}

impl Daemon {
    fn find_container<'a>(inner: &'a Inner, key: &str) -> Result<&'a Container> {
        plan::find_container(&inner.store, key)
            .ok_or_else(|| Error::not_found(format!("no such container: {key}")))
    }

    /// `vswitch run`: creates and starts a container.
    pub async fn run_container(self: &Arc<Self>, req: RunRequest) -> Result<ContainerInfo> {
        self.start_detached(move |daemon, inner| {
            let busy: Vec<String> = inner.starting.values().cloned().collect();
            let c = plan::check_run(&inner.store, &busy, req, ids::random_id(), ids::now())?;
            daemon.launch(inner, c, false)
        })
        .await
    }

    /// `vswitch start`.
    pub async fn start_container(self: &Arc<Self>, key: &str) -> Result<ContainerInfo> {
        let key = key.to_owned();
        self.start_detached(move |daemon, inner| {
            let c = Self::find_container(inner, &key)?.clone();
            if c.pid.is_some() || inner.starting.contains_key(&c.id) {
                return Err(Error::conflict(format!(
                    "container {} is already running",
                    c.name
                )));
            }
            daemon.launch(inner, c, true)
        })
        .await
    }

    /// Starts a container on a task of its own, so that a client that goes away half-way
    /// leaves neither a half-started container nor its name held: `launch` checks the request
    /// and starts the process (under the lock, like everything that follows).
    async fn start_detached(
        self: &Arc<Self>,
        launch: impl FnOnce(&Self, &mut Inner) -> Result<Launch> + Send + 'static,
    ) -> Result<ContainerInfo> {
        let daemon = self.clone();
        tokio::spawn(async move {
            let launched = {
                let mut inner = daemon.inner.lock().await;
                let l = launch(&daemon, &mut inner)?;
                inner.starting.insert(l.c.id.clone(), l.c.name.clone());
                l
            };
            daemon.finish_start(launched).await
        })
        .await
        .map_err(|e| Error::failed("the start failed", e))?
    }

    /// Waits (without the lock) until the launched process stands in its namespaces, then
    /// attaches it, lets it go and records it running.
    async fn finish_start(self: &Arc<Self>, mut launch: Launch) -> Result<ContainerInfo> {
        let id = launch.c.id.clone();
        let ready = launch
            .init
            .wait_ready(
                launch.id_maps.as_ref(),
                self.own_netns,
                !matches!(launch.mode, Mode::Host),
            )
            .await;
        let mut inner = self.inner.lock().await;
        inner.starting.remove(&id);
        let settled = match ready {
            Ok(()) => self.settle(&mut inner, &mut launch).await,
            Err(e) => Err(e),
        };
        if let Err(e) = settled {
            launch.init.kill();
            return Err(e);
        }
        let Launch { c, init, .. } = launch;
        self.watch_exit(&mut inner, &c.id, init);
        tracing::info!(container = %c.name, pid = ?c.pid, network = %c.network, "container started");
        inner.store.containers.insert(c.id.clone(), c.clone());
        self.persist(&inner.store)?;
        Ok(render::container_info(&inner.store, &c))
    }

    /// Writes the container's files and starts its init process (under the lock; quick).
    /// `stored`: `c` is a stopped container of the store, not a new one.
    fn launch(&self, inner: &Inner, c: Container, stored: bool) -> Result<Launch> {
        let dir = container_dir(self.state_dir.path(), &c.id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::failed(&format!("cannot create {}", dir.display()), e))?;
        let resolv = dir.join("resolv.conf");
        let hosts = dir.join("hosts");
        let mode = Mode::of(&c.network);
        let (net, init_net) = match &mode {
            Mode::Network(n) => (
                Some(find_network(&inner.store, n)?.clone()),
                InitNet::New { lo_only: false },
            ),
            Mode::None => (None, InitNet::New { lo_only: true }),
            Mode::Host => (None, InitNet::Host),
            Mode::Container(x) => match Self::find_container(inner, x)?.pid {
                Some(p) => (None, InitNet::Join(proc_netns(p))),
                None => {
                    return Err(Error::conflict(format!(
                        "cannot start {}: it shares the network of {x}, which is not running",
                        c.name
                    )));
                }
            },
        };
        std::fs::write(&resolv, self.resolv_conf_of(inner, &mode, net.as_ref())?)
            .map_err(|e| Error::failed("cannot write the container's resolv.conf", e))?;
        let hostname = match &mode {
            Mode::Host => None,
            _ => Some(c.hostname.clone().unwrap_or_else(|| c.name.clone())),
        };
        let host_gateways = host_gateways(&inner.store, &c);
        nsfiles::write_hosts(
            &hosts,
            &nsfiles::Hosts {
                hostname: hostname.as_deref().unwrap_or(&c.name),
                name: &c.name,
                ip: None,
                host_gateways: &host_gateways,
            },
        )?;
        let id_maps = (self.rootless && !matches!(mode, Mode::Container(_)))
            .then(subordinate_ranges)
            .flatten();
        let config = InitConfig {
            cmd: c.cmd.clone(),
            hostname: hostname.clone(),
            net: init_net,
            resolv_conf: Some(resolv),
            hosts: Some(hosts.clone()),
            maps_by_parent: id_maps.is_some(),
        };
        let init = Init::spawn(&dir, &config)?;
        Ok(Launch {
            c,
            stored,
            init,
            mode,
            id_maps,
            hostname,
            hosts,
        })
    }

    /// The container's resolv.conf: the gateway on networks; a copy of the host's otherwise (so
    /// the host's file is never touched); container:X shares X's.
    fn resolv_conf_of(&self, inner: &Inner, mode: &Mode, net: Option<&Network>) -> Result<String> {
        Ok(match (mode, net) {
            (Mode::Network(_), Some(n)) => nsfiles::resolv_conf_text(n),
            (Mode::Container(x), _) => {
                let parent = Self::find_container(inner, x)?;
                let dir = container_dir(self.state_dir.path(), &parent.id);
                std::fs::read_to_string(dir.join("resolv.conf")).unwrap_or_default()
            }
            _ => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        })
    }

    /// Attaches a launched container's networks, writes its hosts file and lets it go. A
    /// stopped container is taken as the store has it now: it may have left a network while
    /// the lock was free.
    async fn settle(&self, inner: &mut Inner, l: &mut Launch) -> Result<()> {
        if l.stored {
            match inner.store.containers.get(&l.c.id) {
                Some(now) => l.c = now.clone(),
                None => {
                    return Err(Error::not_found(format!(
                        "container {} was removed while it started",
                        l.c.name
                    )));
                }
            }
        }
        let pid = l.init.pid;
        let c = &mut l.c;
        if let Mode::Network(n) = &l.mode {
            let req = container_attach(pid, &c.name, c.ip, c.aliases.clone(), c.ports.clone());
            let ep = self.attach_locked(inner, n, req).await?;
            let ip = ep
                .ipv4_address
                .split('/')
                .next()
                .and_then(|ip| ip.parse().ok());
            // Networks joined later with `network connect`; one that is gone is left out.
            for conn in c.connected.clone() {
                let Some(net) = inner.store.networks.get(&conn.network_id).cloned() else {
                    tracing::warn!(container = %c.name, "a connected network is gone");
                    c.connected.retain(|x| x.network_id != conn.network_id);
                    continue;
                };
                let req = container_attach(pid, &c.name, conn.ip, conn.aliases, Vec::new());
                if let Err(e) = self.attach_locked(inner, &net.id, req).await {
                    tracing::warn!(container = %c.name, network = %net.name, error = %e, "cannot connect the container again");
                }
            }
            let hosts = nsfiles::Hosts {
                hostname: l.hostname.as_deref().unwrap_or(&c.name),
                name: &c.name,
                ip,
                host_gateways: &host_gateways(&inner.store, c),
            };
            nsfiles::write_hosts(&l.hosts, &hosts)?;
        }
        // Go: CMD may start now.
        l.init.go().await;
        c.pid = Some(pid);
        c.start_ticks = start_ticks(pid);
        c.exit_code = None;
        Ok(())
    }

    /// Records the container's exit when its init process exits.
    fn watch_exit(self: &Arc<Self>, inner: &mut Inner, id: &str, init: Init) {
        let daemon = self.clone();
        let id_owned = id.to_owned();
        let mut child = init.child;
        let watcher = tokio::spawn(async move {
            let code = match child.wait().await {
                Ok(status) => status.code().or_else(|| {
                    std::os::unix::process::ExitStatusExt::signal(&status).map(|s| 128 + s)
                }),
                Err(_) => None,
            };
            daemon.container_exited(&id_owned, code).await;
        });
        inner.watchers.insert(id.to_owned(), watcher.abort_handle());
    }

    /// After a restart: keep watching containers that are still running (they are no longer our
    /// children, so their exit is noticed by polling and its code is unknown).
    pub(super) fn adopt_containers(self: &Arc<Self>, inner: &mut Inner) {
        let running: Vec<(String, u32, Option<u64>)> = inner
            .store
            .containers
            .values()
            .filter_map(|c| Some((c.id.clone(), c.pid?, c.start_ticks)))
            .collect();
        for (id, pid, ticks) in running {
            let alive = move || start_ticks(pid).is_some() && start_ticks(pid) == ticks;
            if !alive() {
                if let Some(c) = inner.store.containers.get_mut(&id) {
                    c.pid = None;
                    c.start_ticks = None;
                }
                continue;
            }
            self.refresh_resolv_conf(inner, &id);
            let daemon = self.clone();
            let id_owned = id.clone();
            let watcher = tokio::spawn(async move {
                while alive() {
                    tokio::time::sleep(ADOPTED_POLL).await;
                }
                daemon.container_exited(&id_owned, None).await;
            });
            inner.watchers.insert(id, watcher.abort_handle());
        }
    }

    /// A running container's resolv.conf, written by an earlier version (with a `search`
    /// line), is rewritten in place: the container has it bound over /etc/resolv.conf.
    fn refresh_resolv_conf(&self, inner: &Inner, id: &str) {
        let Some(c) = inner.store.containers.get(id) else {
            return;
        };
        // A container in another's namespace has a copy of that one's file.
        let network = match Mode::of(&c.network) {
            Mode::Container(x) => plan::find_container(&inner.store, &x).map(|p| p.network.clone()),
            _ => Some(c.network.clone()),
        };
        let Some(Mode::Network(n)) = network.as_deref().map(Mode::of) else {
            return;
        };
        let Some(net) = inner.store.find_network(&n) else {
            return;
        };
        let path = container_dir(self.state_dir.path(), id).join("resolv.conf");
        nsfiles::refresh_container_resolv_conf(&path, net);
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
        self.persist_or_log(&inner.store);
    }

    pub async fn containers(&self) -> Vec<ContainerInfo> {
        let inner = self.inner.lock().await;
        inner
            .store
            .containers
            .values()
            .map(|c| render::container_info(&inner.store, c))
            .collect()
    }

    pub async fn container(&self, key: &str) -> Result<ContainerInfo> {
        let inner = self.inner.lock().await;
        Ok(render::container_info(
            &inner.store,
            Self::find_container(&inner, key)?,
        ))
    }

    /// Sends a signal to a running container's process.
    pub async fn kill_container(&self, key: &str, signal: &str) -> Result<()> {
        let inner = self.inner.lock().await;
        let c = Self::find_container(&inner, key)?;
        let Some(pid) = c.pid else {
            return Err(Error::conflict(format!(
                "container {} is not running",
                c.name
            )));
        };
        let sig: nix::sys::signal::Signal = signal
            .parse()
            .or_else(|_| format!("SIG{signal}").parse())
            .map_err(|_| Error::bad_request(format!("unknown signal {signal}")))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
            .map_err(|e| Error::failed(&format!("cannot signal {}", c.name), e))
    }

    /// `vswitch stop`: SIGTERM, then SIGKILL after `timeout`; returns once it has exited.
    pub async fn stop_container(&self, key: &str, timeout: Duration) -> Result<ContainerInfo> {
        let id = {
            let inner = self.inner.lock().await;
            let c = Self::find_container(&inner, key)?;
            if inner.starting.contains_key(&c.id) {
                return Err(Error::conflict(format!(
                    "container {} is starting: stop it once it runs",
                    c.name
                )));
            }
            c.id.clone()
        };
        if self.kill_container(&id, "SIGTERM").await.is_ok()
            && !self.wait_stopped(&id, timeout).await
        {
            let _ = self.kill_container(&id, "SIGKILL").await;
            self.wait_stopped(&id, Duration::from_secs(5)).await;
        }
        self.container(&id).await
    }

    /// Waits until container `id` has exited (or is gone), taking the lock only to look.
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
    pub async fn remove_container(&self, key: &str, force: bool) -> Result<()> {
        let c = {
            let inner = self.inner.lock().await;
            let c = Self::find_container(&inner, key)?.clone();
            Self::removable(&inner, &c, force)?;
            c
        };
        if c.pid.is_some() {
            let _ = self.kill_container(&c.id, "SIGKILL").await;
            self.wait_stopped(&c.id, Duration::from_secs(5)).await;
        }
        let mut inner = self.inner.lock().await;
        // Checked again: the lock was free while it stopped, and a start may have begun.
        let Some(now) = inner.store.containers.get(&c.id).cloned() else {
            return Ok(());
        };
        Self::removable(&inner, &now, force)?;
        inner.store.containers.remove(&c.id);
        self.persist(&inner.store)?;
        let _ = std::fs::remove_dir_all(container_dir(self.state_dir.path(), &c.id));
        Ok(())
    }

    /// Refuses to remove a container that is starting, or running without `force`.
    fn removable(inner: &Inner, c: &Container, force: bool) -> Result<()> {
        if inner.starting.contains_key(&c.id) {
            return Err(Error::conflict(format!(
                "container {} is starting: remove it once it runs",
                c.name
            )));
        }
        if c.pid.is_some() && !force {
            return Err(Error::conflict(format!(
                "container {} is running: stop it first or use rm -f",
                c.name
            )));
        }
        Ok(())
    }

    pub async fn container_logs(&self, key: &str, offset: u64) -> Result<LogChunk> {
        let id = {
            let inner = self.inner.lock().await;
            Self::find_container(&inner, key)?.id.clone()
        };
        let path = container_dir(self.state_dir.path(), &id).join("log");
        let Ok(mut f) = std::fs::File::open(&path) else {
            return Ok(LogChunk {
                data: String::new(),
                next_offset: offset,
            });
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

/// Where a container finds its host (`host.containers.internal`): the gateway of the first of
/// its networks with a way out (its own, then those it joined later; a container in another's
/// namespace has that one's networks); none if it has no way out.
fn host_gateways(store: &Store, c: &Container) -> Vec<std::net::IpAddr> {
    let owner = match Mode::of(&c.network) {
        Mode::Container(x) => match plan::find_container(store, &x) {
            Some(parent) => parent,
            None => return Vec::new(),
        },
        _ => c,
    };
    let main = match Mode::of(&owner.network) {
        Mode::Network(n) => store.find_network(&n),
        _ => None,
    };
    let joined = owner
        .connected
        .iter()
        .filter_map(|x| store.networks.get(&x.network_id));
    main.into_iter()
        .chain(joined)
        .find(|n| !n.internal)
        .map(|n| {
            std::iter::once(n.gateway.into())
                .chain(n.gateway6.map(Into::into))
                .collect()
        })
        .unwrap_or_default()
}

/// How a container's init process joins a network: under the container's name.
fn container_attach(
    pid: u32,
    name: &str,
    ip: Option<std::net::Ipv4Addr>,
    aliases: Vec<String>,
    ports: Vec<String>,
) -> AttachRequest {
    AttachRequest {
        target: Target::Pid(pid),
        name: Some(name.to_owned()),
        ipv4_address: ip.map(|ip| ip.to_string()),
        ipv6_address: None,
        aliases,
        mac_address: None,
        ifname: None,
        ports,
        force: false,
    }
}
