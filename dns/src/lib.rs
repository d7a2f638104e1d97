//! The embedded DNS server: which names resolve to which addresses for whom, answering queries
//! given as raw bytes, and forwarding the rest upstream.
//!
//! - [`catalog`]: per-network zones (names, aliases, `name.network`, reverse records) and the
//!   scope of each client (the networks its namespace is attached to).
//! - [`responder`]: a synchronous, I/O-free answer to one query, called inline by the datapath
//!   for queries that arrive as frames, and by the host-side listener.
//! - [`cache`]: the answers a caller gave lately, byte for byte, for the same query again.
//! - [`upstream`]: the upstream servers (`--dns-upstream` or the host's resolv.conf, re-read when
//!   it changes) and the bounded, failing-over relay of queries to them.
//! - [`fair`]: fair shares of the forwarding slots, per network and per client.
//! - [`server`]: the host-side listener (`vswitch daemon --dns-listen ADDR:PORT`).

pub mod cache;
pub mod catalog;
pub mod fair;
pub mod responder;
pub mod server;
pub mod upstream;

pub use cache::AnswerCache;
pub use catalog::{Catalog, EndpointRecords, SharedCatalog, Upstreams, Zone};
pub use responder::{Asker, Outcome, Responder, Transport};
