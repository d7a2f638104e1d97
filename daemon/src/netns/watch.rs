//! Watching the targets endpoints were attached through, to collect the endpoints whose target
//! is gone.
//!
//! A TAP's fd keeps the namespace it was created in alive (its socket holds a reference), and
//! every TAP is created inside its target's namespace, so the daemon cannot wait for the kernel
//! to destroy the namespace: it would wait for itself. An endpoint therefore lives as long as
//! what it was attached through:
//! - a process (a PID or `/proc/PID/ns/net`): until it exits. A pidfd becomes readable at that
//!   moment; nothing polls.
//! - a namespace file (an `ip netns` name, a bind mount elsewhere): until the path no longer
//!   names that namespace (`ip netns del` unmounts and unlinks it). inotify on the parent
//!   directory reports the unlink at once; a check every [`PATH_RECHECK`] catches an unmount
//!   that leaves the file in place.
//!
//! A device deleted from inside the namespace (`ip link del eth0`) is noticed by the datapath
//! instead (the fd reports an error).

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedSender;
use vswitch_netdev::AsyncOwnedFd;
use vswitch_netdev::ns::NsId;

use super::target::start_ticks;
use crate::datapath::Event;

/// How often namespace files are re-checked without an inotify event.
const PATH_RECHECK: Duration = Duration::from_secs(2);

/// What an endpoint's life is tied to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anchor {
    Process(u32),
    Path(PathBuf),
}

/// Reports [`Event::TargetGone`] for endpoints whose anchor is gone.
pub struct TargetWatch {
    events: UnboundedSender<Event>,
    /// Per-endpoint tasks waiting on a pidfd (or polling, without pidfd support).
    processes: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    paths: Arc<Mutex<HashMap<String, (PathBuf, NsId)>>>,
    /// Wakes the path checker, which sleeps while it has nothing to check.
    added: Arc<Notify>,
    /// inotify instance of the path checker; `None` if inotify is unavailable (then only the
    /// periodic check runs).
    inotify: Option<Arc<AsyncOwnedFd>>,
    path_task: tokio::task::AbortHandle,
}

impl Drop for TargetWatch {
    fn drop(&mut self) {
        self.path_task.abort();
        for h in self.processes.lock().values() {
            h.abort();
        }
    }
}

impl TargetWatch {
    /// Starts the path checker. Needs a tokio runtime.
    pub fn start(events: UnboundedSender<Event>) -> Self {
        use rustix::fs::inotify;
        let inotify = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC)
            .map_err(std::io::Error::from)
            .and_then(AsyncOwnedFd::new)
            .map(Arc::new)
            .inspect_err(|e| tracing::warn!(error = %e, "no inotify: namespace files are only checked every few seconds"))
            .ok();
        let paths = Arc::new(Mutex::new(HashMap::new()));
        let added = Arc::new(Notify::new());
        let path_task = tokio::spawn(check_paths(
            paths.clone(),
            added.clone(),
            inotify.clone(),
            events.clone(),
        ))
        .abort_handle();
        Self {
            events,
            processes: Mutex::new(HashMap::new()),
            paths,
            added,
            inotify,
            path_task,
        }
    }

    /// Watches `anchor` for the endpoint `endpoint_id`, whose namespace is `ns`. If the anchor
    /// is already gone (or no longer leads to `ns`), the event is sent at once.
    pub fn watch(&self, endpoint_id: &str, anchor: Anchor, ns: NsId) {
        self.forget(endpoint_id);
        match anchor {
            Anchor::Process(pid) => {
                let task = tokio::spawn(wait_for_exit(
                    pid,
                    ns,
                    endpoint_id.to_owned(),
                    self.events.clone(),
                ));
                self.processes
                    .lock()
                    .insert(endpoint_id.to_owned(), task.abort_handle());
            }
            Anchor::Path(path) => {
                if let (Some(fd), Some(dir)) = (&self.inotify, path.parent()) {
                    use rustix::fs::inotify::{WatchFlags, add_watch};
                    // Adding a watch twice returns the same one; the directory may not exist
                    // (then the periodic check is all there is).
                    let _ = add_watch(
                        fd.as_fd(),
                        dir,
                        WatchFlags::DELETE | WatchFlags::MOVED_FROM | WatchFlags::DELETE_SELF,
                    );
                }
                // Registered before the first check, so a removal in between is not missed.
                self.paths
                    .lock()
                    .insert(endpoint_id.to_owned(), (path.clone(), ns));
                self.added.notify_one();
                if !names(&path, ns) {
                    self.paths.lock().remove(endpoint_id);
                    self.gone(endpoint_id);
                }
            }
        }
    }

    /// Stops watching for `endpoint_id` (detached or collected otherwise).
    pub fn forget(&self, endpoint_id: &str) {
        if let Some(h) = self.processes.lock().remove(endpoint_id) {
            h.abort();
        }
        self.paths.lock().remove(endpoint_id);
    }

    fn gone(&self, endpoint_id: &str) {
        let _ = self.events.send(Event::TargetGone {
            endpoint_id: endpoint_id.to_owned(),
        });
    }
}

/// Whether `path` still names the namespace `ns`.
fn names(path: &Path, ns: NsId) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.dev() == ns.dev && m.ino() == ns.ino)
}

async fn wait_for_exit(pid: u32, ns: NsId, endpoint_id: String, events: UnboundedSender<Event>) {
    let pidfd = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        // No PIDFD_NONBLOCK (Linux 5.10+): the pidfd is only polled, never read.
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
    // Checked after opening the pidfd: if the process is still in the endpoint's namespace
    // now, the pidfd is that process and not a later one with a reused PID.
    if names(Path::new(&format!("/proc/{pid}/ns/net")), ns) {
        match pidfd.map(AsyncOwnedFd::new) {
            // Readable once the process has exited.
            Some(Ok(fd)) => {
                let _ = fd.readable().await;
            }
            // No pidfd (kernel before 5.3): poll the process's start time.
            _ => {
                let ticks = start_ticks(pid);
                while ticks.is_some() && start_ticks(pid) == ticks {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }
    let _ = events.send(Event::TargetGone { endpoint_id });
}

async fn check_paths(
    paths: Arc<Mutex<HashMap<String, (PathBuf, NsId)>>>,
    added: Arc<Notify>,
    inotify: Option<Arc<AsyncOwnedFd>>,
    events: UnboundedSender<Event>,
) {
    let mut tick = tokio::time::interval(PATH_RECHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Nothing to check: no timer either, until a path is registered (`notify_one` keeps a
        // permit, so a registration just before this wait is not lost).
        if paths.lock().is_empty() {
            added.notified().await;
            tick.reset();
        }
        match &inotify {
            Some(fd) => {
                tokio::select! {
                    r = fd.readable() => match r {
                        Ok(mut guard) => {
                            drain(guard.get_inner().as_fd());
                            guard.clear_ready();
                        }
                        Err(_) => {
                            tick.tick().await;
                        }
                    },
                    _ = tick.tick() => {}
                }
            }
            None => {
                tick.tick().await;
            }
        }
        let gone: Vec<String> = {
            let mut map = paths.lock();
            let gone: Vec<String> = map
                .iter()
                .filter(|(_, (path, ns))| !names(path, *ns))
                .map(|(id, _)| id.clone())
                .collect();
            for id in &gone {
                map.remove(id);
            }
            gone
        };
        for endpoint_id in gone {
            let _ = events.send(Event::TargetGone { endpoint_id });
        }
    }
}

/// Reads every pending inotify event; only the wake-up matters, not which file it names.
fn drain(fd: std::os::fd::BorrowedFd<'_>) {
    let mut buf = [0u8; 4096];
    while matches!(rustix::io::read(fd, &mut buf), Ok(n) if n > 0) {}
}
