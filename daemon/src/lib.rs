//! The vswitch daemon as a library: everything `vswitch daemon` runs, so that tests and
//! benchmarks can hold a daemon, or one network's datapath, in-process.
//!
//! Rooms, top down:
//! - [`server`](serve): the control socket (HTTP/1.1 + JSON on a Unix socket) and the daemon's
//!   lifetime;
//! - `control`: the [`Daemon`], which carries out requests and events, by concern (networks,
//!   endpoints, published ports, containers);
//! - `plan` (pure): validating requests and planning networks, endpoints and containers;
//!   [`ipam`] (pure): subnets and addresses; [`state`]: the state file;
//! - [`datapath`]: one thread per network switching frames between its ports and its gateway;
//! - [`host`]: the daemon's own sockets that carry containers' traffic to and from the outside
//!   (published ports, outbound NAT, DNS forwarding);
//! - [`netns`]: namespace plumbing (TAPs made inside targets, targets watched);
//! - `nsfiles`: the resolv.conf and hosts files vswitch writes for namespaces;
//! - [`metrics`]: `GET /metrics` (OpenMetrics text from the datapaths' counters);
//! - [`api`]: the control API's types, shared with the client; [`container_init`]: what a
//!   container's first process is told.
//!
//! The forwarding core, the gateway's stack and NAT tables, the DNS responder and the devices
//! are crates of their own (`vswitch-switch`, `vswitch-nat`, `vswitch-dns`,
//! `vswitch-netdev`), all but the last without I/O.

pub mod api;
pub mod cluster;
pub mod container_init;
mod control;
pub mod datapath;
pub mod docker;
mod error;
pub mod host;
pub mod ipam;
pub mod metrics;
pub mod netns;
mod nsfiles;
mod plan;
mod server;
pub mod state;

pub use control::{Daemon, RuntimeOptions, STOP_TIMEOUT};
pub use error::{Error, ErrorKind, Result};
pub use plan::DEFAULT_NETWORK;
pub use server::{Options, serve};

/// Whether `name` can name a Docker plugin (its socket file): letters, digits, `-`, `_`, `.`.
pub fn valid_plugin_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}
