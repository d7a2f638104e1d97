//! The messages of Docker's plugin protocol for `NetworkDriver` (libnetwork's remote driver)
//! and `IpamDriver`, as dockerd 20.10 sends them, and the conversion of its port maps. Pure.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// libnetwork's option keys.
pub const PORTMAP: &str = "com.docker.network.portmap";
pub const EXPOSED: &str = "com.docker.network.endpoint.exposedports";
pub const GENERIC: &str = "com.docker.network.generic";
pub const INTERNAL: &str = "com.docker.network.internal";
pub const ENABLE_IPV6: &str = "com.docker.network.enable_ipv6";
pub const MTU: &str = "com.docker.network.driver.mtu";
pub const MAC: &str = "com.docker.network.endpoint.macaddress";
pub const REQUEST_ADDRESS_TYPE: &str = "RequestAddressType";
pub const GATEWAY_TYPE: &str = "com.docker.network.gateway";

pub type Options = Option<BTreeMap<String, serde_json::Value>>;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestPool {
    #[serde(default)]
    pub address_space: String,
    #[serde(default)]
    pub pool: String,
    #[serde(default)]
    pub sub_pool: String,
    #[serde(default)]
    pub options: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "V6")]
    pub v6: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct PoolReply {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    pub pool: String,
    pub data: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PoolRef {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestAddress {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub options: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AddressReply {
    pub address: String,
    pub data: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ReleaseAddress {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    pub address: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IpamData {
    /// The IPAM driver's address space: vswitch's are `vswitch-local` and `vswitch-global`.
    #[serde(default)]
    pub address_space: String,
    #[serde(default)]
    pub pool: String,
    #[serde(default)]
    pub gateway: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateNetwork {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(default)]
    pub options: Options,
    #[serde(default, rename = "IPv4Data")]
    pub ipv4_data: Option<Vec<IpamData>>,
    #[serde(default, rename = "IPv6Data")]
    pub ipv6_data: Option<Vec<IpamData>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkRef {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Interface {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    #[serde(
        default,
        rename = "AddressIPv6",
        skip_serializing_if = "String::is_empty"
    )]
    pub address_ipv6: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac_address: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateEndpoint {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(default)]
    pub interface: Option<Interface>,
    #[serde(default)]
    pub options: Options,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EndpointRef {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(default)]
    pub options: Options,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Join {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    pub sandbox_key: String,
    #[serde(default)]
    pub options: Options,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct InterfaceName {
    pub src_name: String,
    pub dst_prefix: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct JoinReply {
    pub interface_name: InterfaceName,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub gateway: String,
    #[serde(rename = "GatewayIPv6", skip_serializing_if = "String::is_empty")]
    pub gateway_ipv6: String,
}

/// One entry of `com.docker.network.portmap` (libnetwork's `types.PortBinding`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct PortBinding {
    pub proto: u8,
    #[serde(rename = "IP", default)]
    pub ip: String,
    pub port: u16,
    #[serde(rename = "HostIP", default)]
    pub host_ip: String,
    #[serde(default)]
    pub host_port: u16,
    #[serde(default)]
    pub host_port_end: u16,
}

/// Docker's ids are hex (64 digits; at least 12 here): anything else is refused before it
/// becomes part of a device name, a key or a URL.
pub fn check_id(kind: &str, id: &str) -> Result<(), String> {
    if id.len() < 12 || id.len() > 128 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("invalid {kind} id {id:?}"));
    }
    Ok(())
}

/// The port bindings in a request's options.
pub fn port_bindings(options: &Options) -> Result<Vec<PortBinding>, String> {
    let Some(v) = options.as_ref().and_then(|o| o.get(PORTMAP)) else {
        return Ok(Vec::new());
    };
    if v.is_null() {
        return Ok(Vec::new());
    }
    serde_json::from_value(v.clone()).map_err(|e| format!("invalid {PORTMAP}: {e}"))
}

/// A binding as vswitch's `-p` syntax (`[HOST_IP:]HOST_PORT[-END]:PORT/PROTO`; a host port of
/// 0 lets vswitch pick one).
pub fn publish_spec(b: &PortBinding) -> Result<String, String> {
    let proto = match b.proto {
        6 => "tcp",
        17 => "udp",
        132 => return Err("SCTP ports cannot be published by vswitch".into()),
        p => return Err(format!("unknown protocol {p} in a port binding")),
    };
    if b.port == 0 {
        return Err("a port binding without a container port".into());
    }
    let host = match (b.host_port, b.host_port_end) {
        (0, _) => String::new(),
        (p, e) if e > p => format!("{p}-{e}"),
        (p, _) => p.to_string(),
    };
    let ip = match b.host_ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:"),
        Ok(ip) => format!("{ip}:"),
        Err(_) if b.host_ip.is_empty() => String::new(),
        Err(_) => return Err(format!("invalid host IP {:?}", b.host_ip)),
    };
    Ok(if host.is_empty() && ip.is_empty() {
        format!("{}/{proto}", b.port)
    } else {
        format!("{ip}{host}:{}/{proto}", b.port)
    })
}

/// A boolean option, which dockerd sends as a JSON boolean (or, from older clients, text).
pub fn flag(options: &Options, key: &str) -> bool {
    match options.as_ref().and_then(|o| o.get(key)) {
        Some(serde_json::Value::Bool(b)) => *b,
        Some(serde_json::Value::String(s)) => s == "true",
        _ => false,
    }
}

/// The driver options (`docker network create -o K=V`).
pub fn generic(options: &Options) -> BTreeMap<String, String> {
    options
        .as_ref()
        .and_then(|o| o.get(GENERIC))
        .and_then(|g| g.as_object())
        .map(|g| {
            g.iter()
                .map(|(k, v)| {
                    let v = v
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string());
                    (k.clone(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn opts(v: serde_json::Value) -> Options {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn port_maps_become_publish_specs() {
        let o = opts(json!({PORTMAP: [
            {"Proto":6,"IP":"","Port":8080,"HostIP":"","HostPort":18081,"HostPortEnd":18081},
            {"Proto":17,"IP":"","Port":53,"HostIP":"127.0.0.1","HostPort":5353,"HostPortEnd":5353},
            {"Proto":6,"IP":"","Port":9000,"HostIP":"","HostPort":0,"HostPortEnd":0},
            {"Proto":6,"IP":"","Port":7000,"HostIP":"::1","HostPort":7000,"HostPortEnd":7002}
        ]}));
        let specs: Vec<String> = port_bindings(&o)
            .unwrap()
            .iter()
            .map(|b| publish_spec(b).unwrap())
            .collect();
        assert_eq!(
            specs,
            [
                "18081:8080/tcp",
                "127.0.0.1:5353:53/udp",
                "9000/tcp",
                "[::1]:7000-7002:7000/tcp"
            ]
        );
    }

    #[test]
    fn bad_port_maps_are_errors() {
        assert!(port_bindings(&opts(json!({PORTMAP: "x"}))).is_err());
        assert!(
            port_bindings(&opts(json!({PORTMAP: null})))
                .unwrap()
                .is_empty()
        );
        assert!(port_bindings(&None).unwrap().is_empty());
        let b = |proto, port, host_ip: &str| PortBinding {
            proto,
            ip: String::new(),
            port,
            host_ip: host_ip.into(),
            host_port: 1,
            host_port_end: 1,
        };
        assert!(publish_spec(&b(132, 80, "")).is_err());
        assert!(publish_spec(&b(1, 80, "")).is_err());
        assert!(publish_spec(&b(6, 0, "")).is_err());
        assert!(publish_spec(&b(6, 80, "nonsense")).is_err());
    }

    #[test]
    fn options_as_dockerd_sends_them() {
        let o = opts(json!({
            ENABLE_IPV6: false, INTERNAL: true,
            GENERIC: {"port-security": "off", MTU: "1400"}
        }));
        assert!(flag(&o, INTERNAL));
        assert!(!flag(&o, ENABLE_IPV6));
        let g = generic(&o);
        assert_eq!(g["port-security"], "off");
        assert_eq!(g[MTU], "1400");
        assert!(generic(&None).is_empty());
        let req: RequestAddress =
            serde_json::from_str(r#"{"PoolID":"p","Address":"","Options":null}"#).unwrap();
        assert!(req.options.is_none());
    }
}
