//! The control API between the client and the daemon: HTTP/1.1 with JSON bodies on a Unix
//! socket, with paths and field names modelled on Docker's Engine API so that
//! `curl --unix-socket /run/vswitch/vswitch.sock http://d/networks` works.
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `GET /_ping` | | `OK` |
//! | `GET /networks` | | `[NetworkInspect]` |
//! | `POST /networks/create` | [`NetworkCreate`] | [`Created`] |
//! | `GET /networks/{name-or-id}` | | [`NetworkInspect`] |
//! | `DELETE /networks/{name-or-id}` | | 204 |
//! | `POST /networks/{name-or-id}/connect` | [`AttachRequest`] | [`EndpointInfo`] |
//! | `POST /networks/{name-or-id}/disconnect` | [`DisconnectRequest`] | 204 |
//! | `GET /endpoints` | | `[EndpointInfo]` |
//! | `DELETE /endpoints/{name}` | | 204 (detached from every network) |
//! | `GET /networks/{name-or-id}/fdb` | | `[FdbRow]` |
//! | `GET /stats[?network=NAME]` | | `[NetworkStats]` |
//! | `POST /containers/run` | [`RunRequest`] | 201 [`ContainerInfo`] |
//! | `GET /containers` | | `[ContainerInfo]` |
//! | `GET /containers/{name-or-id}` | | [`ContainerInfo`] |
//! | `POST /containers/{name-or-id}/start` | | [`ContainerInfo`] |
//! | `POST /containers/{name-or-id}/stop[?t=SECONDS]` | | [`ContainerInfo`] (once exited) |
//! | `POST /containers/{name-or-id}/kill[?signal=SIG]` | | 204 |
//! | `DELETE /containers/{name-or-id}[?force=1]` | | 204 |
//! | `GET /containers/{name-or-id}/logs[?offset=N]` | | [`LogChunk`] |
//!
//! Paths may carry a Docker-style version prefix (`/v1.45/networks`). Errors carry a status
//! and an [`ErrorBody`] whose message is the one line the client prints: 400 bad request, 403
//! not allowed (removing `bridge`, a network with endpoints, a reserved name), 404 unknown, 408
//! a request body that did not arrive within 5 s, 409 conflict (a name, address or port in
//! use; a container not running), 413 a body over 1 MiB, 500 a failure of the daemon, 503 over
//! the connection limit.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ErrorBody {
    pub message: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct NetworkCreate {
    pub name: String,
    /// Up to one IPv4 and one IPv6 subnet, as CIDR text.
    #[serde(default)]
    pub subnets: Vec<String>,
    /// Gateways, matched to the subnets by address family.
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub ip_range: Option<String>,
    #[serde(default)]
    pub internal: bool,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default, rename = "EnableIPv6")]
    pub enable_ipv6: bool,
    /// The network's own upstream DNS servers, `IP` or `IP:PORT` (`network create --dns`).
    #[serde(default, rename = "DNSServers")]
    pub dns_servers: Vec<String>,
    /// Driver options (`network create -o KEY=VALUE`): `port-security=strict|off`.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// `vswitch` (the default) or `overlay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Created {
    pub id: String,
}

/// `docker network inspect` shaped.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkInspect {
    pub name: String,
    pub id: String,
    pub created: String,
    pub scope: String,
    pub driver: String,
    #[serde(rename = "EnableIPv6")]
    pub enable_ipv6: bool,
    #[serde(rename = "IPAM")]
    pub ipam: Ipam,
    pub internal: bool,
    pub attachable: bool,
    pub containers: BTreeMap<String, ContainerEntry>,
    pub options: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Ipam {
    pub driver: String,
    pub config: Vec<IpamConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IpamConfig {
    pub subnet: String,
    pub gateway: String,
    #[serde(rename = "IPRange", default, skip_serializing_if = "Option::is_none")]
    pub ip_range: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerEntry {
    pub name: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    pub mac_address: String,
    #[serde(rename = "IPv4Address")]
    pub ipv4_address: String,
    #[serde(rename = "IPv6Address")]
    pub ipv6_address: String,
    /// Published ports, `CTR_PORT/PROTO -> HOST_IP:HOST_PORT` (a vswitch extension).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
}

/// How the target namespace of an attach was named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// A process whose network namespace is meant (`/proc/PID/ns/net`).
    Pid(u32),
    /// A namespace file (`/proc/PID/ns/net`, `/run/netns/X`, a bind mount elsewhere).
    Path(String),
    /// An `ip netns` name (`/run/netns/NAME`).
    Name(String),
}

impl Target {
    /// Reads a TARGET argument the way the CLI documents it: digits are a PID, text with a `/`
    /// is a path, anything else an `ip netns` name.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("empty target: give a PID, a netns path or an `ip netns` name".into());
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse()
                .map(Target::Pid)
                .map_err(|_| format!("invalid PID {s}"));
        }
        if s.contains('/') {
            return Ok(Target::Path(s.to_owned()));
        }
        Ok(Target::Name(s.to_owned()))
    }

    /// `/run/netns/X` is the `ip netns` name X (which then names the endpoint and gets its
    /// `/etc/netns/X/resolv.conf`); everything else stays as it is.
    pub fn normalized(self) -> Self {
        match &self {
            Target::Path(p) => match p.strip_prefix("/run/netns/") {
                Some(n) if !n.is_empty() && n != "." && n != ".." && !n.contains('/') => {
                    Target::Name(n.to_owned())
                }
                _ => self,
            },
            _ => self,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Pid(p) => write!(f, "pid {p}"),
            Target::Path(p) => write!(f, "{p}"),
            Target::Name(n) => write!(f, "netns {n}"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct AttachRequest {
    pub target: Target,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "IPv4Address")]
    pub ipv4_address: Option<String>,
    #[serde(default, rename = "IPv6Address")]
    pub ipv6_address: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub mac_address: Option<String>,
    #[serde(default)]
    pub ifname: Option<String>,
    /// `-p` specs, as typed.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Attach even when the target is the host's initial network namespace (PID 1's).
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct DisconnectRequest {
    pub container: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EndpointInfo {
    pub id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    pub name: String,
    pub network: String,
    pub network_id: String,
    pub target: Target,
    pub ifname: String,
    pub mac_address: String,
    #[serde(rename = "IPv4Address")]
    pub ipv4_address: String,
    #[serde(rename = "IPv6Address")]
    pub ipv6_address: String,
    pub gateway: String,
    /// The IPv6 gateway, on IPv6 networks.
    #[serde(default, rename = "IPv6Gateway")]
    pub ipv6_gateway: String,
    pub aliases: Vec<String>,
    /// Published ports, with the host ports actually bound.
    #[serde(default)]
    pub ports: Vec<vswitch_nat::PortMapping>,
}

/// A CNI attachment's key: the engine's container id and the interface inside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct CniKey {
    #[serde(rename = "ContainerID")]
    pub container_id: String,
    pub ifname: String,
}

/// CNI ADD, as the plugin passes it on: the attachment, its namespace, and what the engine
/// asked for (`runtimeConfig` and `CNI_ARGS`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct CniAddRequest {
    pub network: String,
    pub key: CniKey,
    /// `CNI_NETNS`: a path to the namespace.
    pub netns: String,
    /// The endpoint's DNS name (the engine's container name).
    pub name: String,
    /// Static addresses, with or without a prefix length.
    #[serde(default)]
    pub ips: Vec<String>,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Published ports as `-p` specs.
    #[serde(default)]
    pub ports: Vec<String>,
}

/// CNI DEL and CHECK: which attachment, on which network.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct CniRequest {
    pub network: String,
    pub key: CniKey,
}

/// CNI GC: the attachments of `network` the engine still has; the others go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct CniGcRequest {
    pub network: String,
    pub valid: Vec<CniKey>,
}

/// A CNI attachment, as ADD and CHECK answer: the endpoint and whether its network has a way
/// out (a default route).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CniAttachment {
    pub endpoint: EndpointInfo,
    pub internal: bool,
}

/// What CNI GC removed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CniGcReply {
    pub removed: Vec<CniKey>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct FdbRow {
    pub mac_address: String,
    pub port: u32,
    /// Endpoint name, or `(gateway)`.
    pub endpoint: String,
    pub age_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkStats {
    pub network: String,
    pub ports: Vec<PortStatsRow>,
    pub malformed: u64,
    pub invalid_source: u64,
    pub learn_refused: u64,
    pub flooded: u64,
    pub fdb_entries: usize,
    /// Frames a port sent from a MAC or address it was not given (port security).
    #[serde(default)]
    pub spoofed: u64,
    /// Frames longer than the network's MTU.
    #[serde(default)]
    pub too_big: u64,
    /// NAT and published-port TCP flows (held SYNs included), and those of them with large
    /// buffers.
    #[serde(default)]
    pub tcp_flows: usize,
    #[serde(default)]
    pub tcp_large_flows: usize,
    /// Outbound and published-port UDP flows, and outbound ping flows.
    #[serde(default)]
    pub udp_flows: usize,
    #[serde(default)]
    pub icmp_flows: usize,
    /// An overlay network's tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelStatsRow>,
    /// Queries to the network's DNS.
    #[serde(default)]
    pub dns: DnsCounters,
    /// MAC table entries learned, moved to another port, and aged out.
    #[serde(default)]
    pub fdb_learned: u64,
    #[serde(default)]
    pub fdb_moved: u64,
    #[serde(default)]
    pub fdb_aged: u64,
    /// Frames and answers from host sockets dropped because the datapath's backlog was full
    /// (the gateway's and the tunnel's; also in the gateway port's receive drops).
    #[serde(default)]
    pub backlog_dropped: u64,
    /// UDP flows evicted to make room for new ones, and ping flows refused for want of room.
    #[serde(default)]
    pub udp_flows_evicted: u64,
    #[serde(default)]
    pub icmp_flows_refused: u64,
    /// TCP flows (outbound and published) refused for want of room.
    #[serde(default)]
    pub tcp_flows_refused: u64,
}

/// Queries to a network's DNS, by who answered.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DnsCounters {
    /// Answered here, by response code (the index; codes from 15 up count as 15).
    #[serde(default)]
    pub local: Vec<u64>,
    /// Answered by an upstream server, by response code.
    #[serde(default)]
    pub upstream: Vec<u64>,
    /// Refused because the asker or its network was over its share of forwards in flight.
    #[serde(default)]
    pub refused: u64,
}

/// The response code of a DNS message (its 4 low bits; an extended code is not read).
pub fn dns_rcode(message: &[u8]) -> usize {
    message.get(3).map_or(15, |b| usize::from(b & 0x0f))
}

/// `POST /networks/{id}/peers/add` and `/peers/rm`: an external VTEP of an overlay network.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PeerRequest {
    pub address: std::net::IpAddr,
}

/// Counters of an overlay network's VXLAN tunnel.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TunnelStatsRow {
    #[serde(rename = "VNI")]
    pub vni: u32,
    /// Packets believed and switched into the network.
    pub rx_packets: u64,
    pub rx_malformed: u64,
    /// For another network's VNI (checked again by the tunnel).
    pub rx_foreign_vni: u64,
    /// From a host that is neither a member nor a registered peer.
    pub rx_not_member: u64,
    /// From a member, with a source MAC that is not that member's (or a peer claiming one).
    pub rx_spoofed: u64,
    /// New source MACs of peers that did not fit the table (delivered, not learned).
    pub learn_refused: u64,
    pub tx_unicast: u64,
    pub tx_flooded: u64,
    pub tx_dropped: u64,
    /// Floods refused because their port had spent its replication budget.
    #[serde(default)]
    pub tx_flood_limited: u64,
    /// MACs learned from peers.
    pub learned_macs: usize,
    /// Daemon-wide: packets for a VNI no network here has, and packets that were not VXLAN.
    pub daemon_unknown_vni: u64,
    pub daemon_not_vxlan: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PortStatsRow {
    pub port: u32,
    pub endpoint: String,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_forms() {
        assert_eq!(Target::parse("1234"), Ok(Target::Pid(1234)));
        assert_eq!(
            Target::parse("/run/netns/a"),
            Ok(Target::Path("/run/netns/a".into()))
        );
        assert_eq!(
            Target::Path("/run/netns/a".into()).normalized(),
            Target::Name("a".into()),
            "an ip netns file is that name"
        );
        for path in [
            "/proc/7/ns/net",
            "/run/netns/a/b",
            "/run/netns/..",
            "/var/run/netns/a",
        ] {
            let t = Target::Path(path.into());
            assert_eq!(t.clone().normalized(), t);
        }
        assert_eq!(Target::parse("blue"), Ok(Target::Name("blue".into())));
        assert!(Target::parse("").is_err());
        assert!(Target::parse("99999999999999999999").is_err());
    }
}

/// `vswitch run`: POST /containers/run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct RunRequest {
    #[serde(default)]
    pub name: Option<String>,
    /// `bridge` (default), a network name, `host`, `none` or `container:NAME`.
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default, rename = "IPv4Address")]
    pub ipv4_address: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    pub cmd: Vec<String>,
}

/// A container as `ps` and `inspect` show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub network: String,
    pub ips: Vec<String>,
    pub ports: Vec<String>,
    /// `running`, `exited` or `created`.
    pub status: String,
    pub pid: Option<u32>,
    pub exit_code: Option<i32>,
    pub cmd: Vec<String>,
    pub created: String,
}

/// `GET /info`: what the daemon is and holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DaemonInfo {
    pub version: String,
    pub state_dir: String,
    pub rootless: bool,
    /// The upstream DNS servers queries go to now.
    pub upstreams: Vec<String>,
    pub networks: usize,
    pub endpoints: usize,
    pub containers: usize,
    pub running_containers: usize,
    /// What this daemon does: always `dns`, `nat`, `published-ports`, `cni`, `metrics`; and
    /// `overlay` with an advertise address or a cluster store, `cluster` with a store.
    pub features: Vec<String>,
    /// This host's node name, in a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// A slice of a container's log, from byte `offset` on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct LogChunk {
    pub data: String,
    pub next_offset: u64,
}
