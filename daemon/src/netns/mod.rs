//! Namespace plumbing: what the daemon does inside containers' network namespaces and how it
//! follows them.
//!
//! - [`target`]: what an endpoint is attached through (a PID, a namespace file, an `ip netns`
//!   name), and opening its namespace;
//! - [`plumb`]: creating and configuring the TAP inside the namespace (directly as root,
//!   through a helper process when rootless);
//! - [`watch`]: noticing when the target is gone, so the endpoint goes with it.

pub mod plumb;
pub mod target;
pub mod watch;
