//! Published ports: the `-p` syntax and its expansion into single-port mappings.

use std::fmt;
use std::net::IpAddr;

/// Transport of a published port.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// One host port carried to one container port. `host_port` 0 means "any free port" until the
/// daemon binds it; with `host_port_end`, any free port from `host_port` to that one (Docker's
/// `-p 8080-8090:80`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct PortMapping {
    /// Host address to bind (`None`: all addresses).
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port_end: Option<u16>,
    pub container_port: u16,
    pub proto: Proto,
}

impl fmt::Display for PortMapping {
    /// `8080/tcp -> 0.0.0.0:8081`, like `docker port`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ip = match self.host_ip {
            Some(IpAddr::V6(v6)) => format!("[{v6}]"),
            Some(v4) => v4.to_string(),
            None => "0.0.0.0".to_owned(),
        };
        write!(
            f,
            "{}/{} -> {ip}:{}",
            self.container_port, self.proto, self.host_port
        )
    }
}

fn port_range(s: &str, what: &str, spec: &str) -> Result<(u16, u16), String> {
    let bad = || format!("invalid {what} {s:?} in -p {spec:?}");
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (a, b),
        None => (s, s),
    };
    let a: u16 = a.parse().map_err(|_| bad())?;
    let b: u16 = b.parse().map_err(|_| bad())?;
    if a == 0 || b < a {
        return Err(bad());
    }
    Ok((a, b))
}

/// Parses one `-p` value: `[HOST_IP:]HOST_PORT[-END]:CTR_PORT[-END][/tcp|/udp]` or
/// `CTR_PORT[-END][/proto]` (random host ports), into single-port mappings.
pub fn parse_publish(spec: &str) -> Result<Vec<PortMapping>, String> {
    let (body, proto) = match spec.rsplit_once('/') {
        Some((b, "tcp")) => (b, Proto::Tcp),
        Some((b, "udp")) => (b, Proto::Udp),
        Some((_, other)) => {
            return Err(format!(
                "invalid protocol {other:?} in -p {spec:?} (tcp or udp)"
            ));
        }
        None => (spec, Proto::Tcp),
    };
    // The container part is after the last ':'; an IPv6 host address is written in brackets.
    let (front, ctr) = match body.rsplit_once(':') {
        Some((f, c)) => (Some(f), c),
        None => (None, body),
    };
    let (c0, c1) = port_range(ctr, "container port", spec)?;
    let (host_ip, host) = match front {
        None => (None, None),
        Some(f) => match f.rsplit_once(':') {
            Some((ip, port)) => {
                let ip = ip.trim_start_matches('[').trim_end_matches(']');
                let ip: IpAddr = ip
                    .parse()
                    .map_err(|_| format!("invalid host address {ip:?} in -p {spec:?}"))?;
                let host = if port.is_empty() { None } else { Some(port) };
                (Some(ip), host)
            }
            None => (None, Some(f)),
        },
    };
    let count = usize::from(c1 - c0) + 1;
    let host_ports: Vec<u16> = match host {
        None => vec![0; count],
        Some(h) => {
            let (h0, h1) = port_range(h, "host port", spec)?;
            if count == 1 && h1 > h0 {
                // One container port, a range of host ports: any one free port of the range.
                return Ok(vec![PortMapping {
                    host_ip,
                    host_port: h0,
                    host_port_end: Some(h1),
                    container_port: c0,
                    proto,
                }]);
            }
            if usize::from(h1 - h0) + 1 != count {
                return Err(format!(
                    "host and container port ranges differ in size in -p {spec:?}"
                ));
            }
            (h0..=h1).collect()
        }
    };
    Ok(host_ports
        .into_iter()
        .zip(c0..=c1)
        .map(|(host_port, container_port)| PortMapping {
            host_ip,
            host_port,
            host_port_end: None,
            container_port,
            proto,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(spec: &str) -> PortMapping {
        let v = parse_publish(spec).expect(spec);
        assert_eq!(v.len(), 1, "{spec}");
        v[0]
    }

    #[test]
    fn forms() {
        let m = one("8081:8080");
        assert_eq!(
            (m.host_ip, m.host_port, m.container_port, m.proto),
            (None, 8081, 8080, Proto::Tcp)
        );
        let m = one("127.0.0.1:8081:8080/udp");
        assert_eq!(m.host_ip, Some("127.0.0.1".parse().expect("ip")));
        assert_eq!(m.proto, Proto::Udp);
        let m = one("8080");
        assert_eq!(
            (m.host_port, m.container_port),
            (0, 8080),
            "random host port"
        );
        let m = one("127.0.0.1::8080");
        assert_eq!((m.host_port, m.container_port), (0, 8080));
        let m = one("[::1]:9000:80");
        assert_eq!(m.host_ip, Some("::1".parse().expect("ip")));
        let r = parse_publish("8000-8002:9000-9002/tcp").expect("range");
        assert_eq!(
            r.iter()
                .map(|m| (m.host_port, m.container_port))
                .collect::<Vec<_>>(),
            vec![(8000, 9000), (8001, 9001), (8002, 9002)]
        );
        assert_eq!(one("8080/udp").to_string(), "8080/udp -> 0.0.0.0:0");
        // A host range for one container port: any free port of it.
        let m = one("8000-8002:9000");
        assert_eq!(
            (m.host_port, m.host_port_end, m.container_port),
            (8000, Some(8002), 9000)
        );
    }

    #[test]
    fn errors() {
        for bad in [
            "",
            "x",
            "0:80",
            "80:0",
            "8081:8080/sctp",
            "8000-8002:9000-9001",
            "1.2.3:80:80",
            "70000:80",
            "9-8:9-8",
            "a:b:c:d",
        ] {
            assert!(parse_publish(bad).is_err(), "{bad:?} should fail");
        }
    }
}
