//! `inspect`, `ps --format json` and `network ls --filter`: the daemon's lists shaped as
//! Docker shapes the same things, worked out here from `/containers`, `/endpoints` and
//! `/networks` (pure, so tested without a daemon).

use serde_json::{Map, Value, json};
use vswitch_daemon::api::{ContainerInfo, EndpointInfo, NetworkInspect};

/// `docker inspect`'s `NetworkSettings` of these endpoints (one per network).
fn network_settings(eps: &[&EndpointInfo]) -> Value {
    let mut networks = Map::new();
    let mut ports = Map::new();
    for e in eps {
        let (ip, prefix) = split_cidr(&e.ipv4_address);
        let (ip6, prefix6) = split_cidr(&e.ipv6_address);
        networks.insert(
            e.network.clone(),
            json!({
                "Aliases": e.aliases,
                "NetworkID": e.network_id,
                "EndpointID": e.endpoint_id,
                "Gateway": e.gateway,
                "IPAddress": ip,
                "IPPrefixLen": prefix,
                "IPv6Gateway": e.ipv6_gateway,
                "GlobalIPv6Address": ip6,
                "GlobalIPv6PrefixLen": prefix6,
                "MacAddress": e.mac_address,
            }),
        );
        for p in &e.ports {
            let key = format!("{}/{}", p.container_port, p.proto);
            let host = json!({
                "HostIp": p.host_ip.map_or("0.0.0.0".to_owned(), |ip| ip.to_string()),
                "HostPort": p.host_port.to_string(),
            });
            match ports.get_mut(&key) {
                Some(Value::Array(a)) => a.push(host),
                _ => {
                    ports.insert(key, json!([host]));
                }
            }
        }
    }
    json!({ "Networks": networks, "Ports": ports })
}

/// `10.0.0.2/24` as (`10.0.0.2`, 24); an empty address as ("", 0).
fn split_cidr(a: &str) -> (String, u8) {
    match a.split_once('/') {
        Some((ip, len)) => (ip.to_owned(), len.parse().unwrap_or(0)),
        None => (a.to_owned(), 0),
    }
}

/// A container as `docker inspect` shows one.
pub fn container(c: &ContainerInfo, endpoints: &[EndpointInfo]) -> Value {
    let mine: Vec<&EndpointInfo> = endpoints.iter().filter(|e| e.name == c.name).collect();
    json!({
        "Id": c.id,
        "Created": c.created,
        "Name": format!("/{}", c.name),
        "Path": c.cmd.first().cloned().unwrap_or_default(),
        "Args": c.cmd.iter().skip(1).collect::<Vec<_>>(),
        "State": {
            "Status": c.status,
            "Running": c.pid.is_some(),
            "Pid": c.pid.unwrap_or(0),
            "ExitCode": c.exit_code.unwrap_or(0),
        },
        "Config": { "Cmd": c.cmd },
        "HostConfig": { "NetworkMode": c.network },
        "NetworkSettings": network_settings(&mine),
    })
}

/// An endpoint attached without a container (`vswitch attach`), shaped like a container
/// whose only state is its network settings.
fn endpoint(name: &str, eps: &[&EndpointInfo]) -> Value {
    json!({
        "Id": eps.first().map(|e| e.id.clone()).unwrap_or_default(),
        "Name": format!("/{name}"),
        "NetworkSettings": network_settings(eps),
    })
}

/// What `vswitch inspect NAME` shows: the container named (or with the id prefix) `key`, or
/// else the endpoints of that name; `None` if there is neither.
pub fn find(key: &str, containers: &[ContainerInfo], endpoints: &[EndpointInfo]) -> Option<Value> {
    let by_name = containers.iter().find(|c| c.name == key);
    let by_id = || {
        let mut hits = containers.iter().filter(|c| c.id.starts_with(key));
        match (hits.next(), hits.next()) {
            (Some(c), None) if key.len() >= 4 => Some(c),
            _ => None,
        }
    };
    if let Some(c) = by_name.or_else(by_id) {
        return Some(container(c, endpoints));
    }
    let eps: Vec<&EndpointInfo> = endpoints.iter().filter(|e| e.name == key).collect();
    (!eps.is_empty()).then(|| endpoint(key, &eps))
}

/// One line of `ps --format json`, with `docker ps --format json`'s keys.
pub fn ps_line(c: &ContainerInfo) -> Value {
    let status = match (c.pid, c.exit_code) {
        (Some(_), _) => "running".to_owned(),
        (None, Some(code)) => format!("exited ({code})"),
        (None, None) => "exited".to_owned(),
    };
    json!({
        "ID": crate::table::short_id(&c.id),
        "Names": c.name,
        "Command": c.cmd.join(" "),
        "CreatedAt": c.created,
        "State": c.status,
        "Status": status,
        "Networks": c.network,
        "IPs": c.ips.join(","),
        "Ports": c.ports.join(", "),
    })
}

/// `--filter KEY=VALUE` arguments, checked.
pub fn parse_filters(args: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    args.iter()
        .map(|a| match a.split_once('=') {
            Some((k @ ("name" | "id" | "driver" | "scope"), v)) => Ok((k.to_owned(), v.to_owned())),
            Some((k, _)) => anyhow::bail!("unknown filter {k:?}: use name, id, driver or scope"),
            None => anyhow::bail!("invalid filter {a:?}: expected KEY=VALUE"),
        })
        .collect()
}

/// Whether a network passes every filter (Docker's: a part of the name, a prefix of the id).
pub fn matches(n: &NetworkInspect, filters: &[(String, String)]) -> bool {
    filters.iter().all(|(k, v)| match k.as_str() {
        "name" => n.name.contains(v.as_str()),
        "id" => n.id.starts_with(v.as_str()),
        "driver" => n.driver == *v,
        "scope" => n.scope == *v,
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctr(name: &str, id: &str) -> ContainerInfo {
        ContainerInfo {
            id: id.into(),
            name: name.into(),
            network: "web".into(),
            ips: vec!["10.1.0.2".into()],
            ports: vec![],
            status: "running".into(),
            pid: Some(42),
            exit_code: None,
            cmd: vec!["sleep".into(), "60".into()],
            created: "2026-12-02T00:00:00Z".into(),
        }
    }

    fn ep(name: &str) -> EndpointInfo {
        serde_json::from_value(json!({
            "Id": "ep1", "EndpointID": "ep1", "Name": name, "Network": "web",
            "NetworkId": "n1", "Target": {"Name": "x"}, "Ifname": "eth0",
            "MacAddress": "02:42:0a:01:00:02", "IPv4Address": "10.1.0.2/24",
            "IPv6Address": "", "Gateway": "10.1.0.1", "Aliases": ["t"],
            "Ports": [{"host_ip": null, "host_port": 8081, "container_port": 8080, "proto": "tcp"}],
        }))
        .expect("an endpoint")
    }

    #[test]
    fn containers_and_endpoints_look_as_docker_shows_them() {
        let cs = [ctr("tomcat82", "abcdef0123456789")];
        let eps = [ep("tomcat82"), ep("bare")];
        let c = find("tomcat82", &cs, &eps).expect("by name");
        assert_eq!(c["Name"], "/tomcat82");
        assert_eq!(c["State"]["Pid"], 42);
        assert_eq!(c["Path"], "sleep");
        let net = &c["NetworkSettings"]["Networks"]["web"];
        assert_eq!(
            (net["IPAddress"].as_str(), net["IPPrefixLen"].as_u64()),
            (Some("10.1.0.2"), Some(24))
        );
        assert_eq!(
            c["NetworkSettings"]["Ports"]["8080/tcp"][0]["HostPort"],
            "8081"
        );
        assert_eq!(
            find("abcd", &cs, &eps).expect("by id prefix")["Id"],
            "abcdef0123456789"
        );
        assert!(find("abc", &cs, &eps).is_none(), "too short a prefix");
        let b = find("bare", &cs, &eps).expect("an endpoint without a container");
        assert_eq!(
            b["NetworkSettings"]["Networks"]["web"]["MacAddress"],
            "02:42:0a:01:00:02"
        );
        assert!(find("nobody", &cs, &eps).is_none());
        assert_eq!(ps_line(&cs[0])["ID"], "abcdef012345");
    }

    #[test]
    fn filters_are_checked_and_all_must_match() {
        assert!(parse_filters(&["label=x".into()]).is_err());
        assert!(parse_filters(&["name".into()]).is_err());
        let f = parse_filters(&["name=we".into(), "driver=vswitch".into()]).expect("filters");
        let n: NetworkInspect = serde_json::from_value(json!({
            "Name": "web", "Id": "0123abcd", "Created": "", "Scope": "local", "Driver": "vswitch",
            "EnableIPv6": false, "IPAM": {"Driver": "default", "Config": []}, "Internal": false,
            "Attachable": true,
            "Containers": {}, "Options": {}, "Labels": {},
        }))
        .expect("a network");
        assert!(matches(&n, &f));
        assert!(!matches(
            &n,
            &parse_filters(&["name=db".into()]).expect("filter")
        ));
        assert!(matches(
            &n,
            &parse_filters(&["id=0123".into()]).expect("filter")
        ));
        assert!(!matches(
            &n,
            &parse_filters(&["scope=global".into()]).expect("filter")
        ));
    }
}
