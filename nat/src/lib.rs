//! The gateway of a virtual network: a userspace IP stack (smoltcp) behind one switch port.
//!
//! Every network has one [`Gateway`]. The switch hands it the frames addressed to the gateway's
//! stable MAC (and the broadcasts and multicasts it must see), and forwards whatever it emits like
//! frames from any other port. Today it answers ARP and neighbour solicitations for its own
//! addresses and ICMP echo, so `ping <gateway>` works; the embedded DNS server, published ports
//! and outbound NAT are added as sockets and flows on this same stack.
//!
//! Like the switch core, the gateway is sans-IO: it is fed `(now, frame)` and drained with
//! [`Gateway::poll_transmit`]; it owns no file descriptor and reads no clock.

pub mod echo;
pub mod flows;
pub mod frame;
mod gateway;
pub mod mapping;
pub mod policy;
mod stream;
pub mod tcp;

pub use gateway::{Gateway, GatewayConfig, GatewayError, GatewayStats};
pub use mapping::{PortMapping, Proto, parse_publish};
pub use policy::Policy;
pub use stream::StreamMessage;
pub use tcp::{FlowId, FlowState, TcpEvent};
