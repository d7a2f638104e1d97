//! What the daemon asks of a container's first process (`vswitch __init`, in the binary): the
//! JSON file it is started with.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What the daemon asks of the init process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitConfig {
    pub cmd: Vec<String>,
    /// `None`: keep the host's hostname (host network mode).
    pub hostname: Option<String>,
    pub net: InitNet,
    /// Files bound over /etc/resolv.conf and /etc/hosts.
    pub resolv_conf: Option<PathBuf>,
    pub hosts: Option<PathBuf>,
    /// Rootless: the daemon writes the user namespace's ID maps (with newuidmap/newgidmap and
    /// the user's /etc/subuid ranges) instead of the single-ID map the process can write itself.
    #[serde(default)]
    pub maps_by_parent: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum InitNet {
    /// A fresh network namespace (attached by the daemon, or only `lo` for `none`).
    New { lo_only: bool },
    /// The daemon's namespace.
    Host,
    /// Another container's namespace (`container:X`).
    Join(PathBuf),
}
