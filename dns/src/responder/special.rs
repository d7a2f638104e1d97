//! Names the server answers itself, whatever the zones hold: `localhost` (RFC 6761), and the
//! names containers use for their host, `host.containers.internal` (podman's) and
//! `host.docker.internal` (Docker's).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::RData;
use hickory_proto::rr::RecordType;
use hickory_proto::rr::rdata::{A, AAAA};

use super::Asker;
use crate::catalog::Zone;

/// Names that mean the container's host: its gateway, where published ports (and, with
/// `--allow-host-loopback`, the host's loopback services) answer.
pub const HOST_NAMES: [&str; 2] = ["host.containers.internal", "host.docker.internal"];

pub(super) enum Special {
    /// These records (none: NODATA).
    Addresses(Vec<RData>),
    /// The name does not exist for this asker.
    Nothing,
}

/// The answer for `name` (lower case, no trailing dot) if it is a special name.
pub(super) fn resolve(
    name: &str,
    qtype: RecordType,
    asker: Asker<'_>,
    zones: &[&Zone],
) -> Option<Special> {
    if name == "localhost" || name.ends_with(".localhost") {
        let loopback = [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
        return Some(Special::Addresses(of_type(&loopback, qtype)));
    }
    if HOST_NAMES.contains(&name) && matches!(asker, Asker::Network { .. }) {
        // The gateway of the asked network, or of the first of the namespace's networks with a
        // way out; without one there is no host to reach.
        return Some(match zones.iter().find(|z| !z.internal) {
            Some(z) => Special::Addresses(of_type(&z.gateways, qtype)),
            None => Special::Nothing,
        });
    }
    None
}

fn of_type(addrs: &[IpAddr], qtype: RecordType) -> Vec<RData> {
    addrs
        .iter()
        .filter_map(|a| match (a, qtype) {
            (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => Some(RData::A(A(*v4))),
            (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => Some(RData::AAAA(AAAA(*v6))),
            _ => None,
        })
        .collect()
}
