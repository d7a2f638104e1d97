//! The daemon's host side: the sockets in its own network namespace that carry containers'
//! traffic to and from the outside, as tokio tasks.
//!
//! - [`published`]: published ports' accept loops;
//! - [`masq`]: the gateway ports of published-port clients shown as the gateway;
//! - [`outbound`]: dialling containers' TCP destinations (the connected socket goes to the
//!   datapath, which moves the flow's bytes itself), receiving their UDP and ping answers;
//! - [`direct`]: the in-kernel path of published ports for loopback clients;
//! - [`dns`]: relaying DNS queries upstream.
//!
//! Everything here feeds the datapaths through their [`Injector`](crate::datapath::Injector);
//! nothing here is reached from the datapath except through the jobs it hands out.

pub mod direct;
pub mod dns;
pub mod masq;
pub mod outbound;
pub mod published;
pub mod vxlan;
