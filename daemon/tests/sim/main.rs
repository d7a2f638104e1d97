//! The simulation tier: one or more networks' real datapaths in plain `cargo test`, without
//! root. Ports are `socketpair(SOCK_SEQPACKET)` ends instead of TAPs (see `harness`); the
//! switch, the gateway, the DNS responder and forwarder, and UDP NAT through host sockets on
//! loopback are the daemon's own.

mod bounds;
mod dns;
mod gateway;
mod guard;
mod harness;
mod l2;
mod nat;
