//! `vswitch run`: validating the request into a container record.

use std::net::Ipv4Addr;

use super::{DEFAULT_NETWORK, check_aliases_allowed, check_name};
use crate::api::RunRequest;
use crate::error::{Error, Result};
use crate::state::{Container, Store};

/// The network mode of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Network(String),
    Host,
    None,
    Container(String),
}

impl Mode {
    pub fn of(network: &str) -> Self {
        match network {
            "host" => Mode::Host,
            "none" => Mode::None,
            n => match n.strip_prefix("container:") {
                Some(x) => Mode::Container(x.to_owned()),
                None => Mode::Network(n.to_owned()),
            },
        }
    }
}

/// Finds a container by name, id or unique id prefix.
pub fn find_container<'a>(store: &'a Store, key: &str) -> Option<&'a Container> {
    store
        .containers
        .values()
        .find(|c| c.name == key || c.id == key)
        .or_else(|| {
            let mut m = store
                .containers
                .values()
                .filter(|c| !key.is_empty() && c.id.starts_with(key));
            match (m.next(), m.next()) {
                (Some(c), None) => Some(c),
                _ => None,
            }
        })
}

/// Validates a run request against the state (`busy`: names of containers being started) and
/// makes the container's record, with the given id and creation time, not yet started.
pub fn check_run(
    store: &Store,
    busy: &[String],
    req: RunRequest,
    id: String,
    created: String,
) -> Result<Container> {
    if req.cmd.is_empty() {
        return Err(Error::bad_request(
            "no command given (vswitch run ... -- CMD)",
        ));
    }
    let name = req
        .name
        .clone()
        .unwrap_or_else(|| format!("c-{}", id.chars().take(12).collect::<String>()));
    check_name("container", &name)?;
    if store.containers.values().any(|c| c.name == name) || busy.contains(&name) {
        return Err(Error::conflict(format!(
            "the container name {name} is already in use"
        )));
    }
    if store.endpoints.values().any(|e| e.name == name) {
        return Err(Error::conflict(format!(
            "the name {name} is already used by an attached endpoint"
        )));
    }
    let network = req
        .network
        .clone()
        .unwrap_or_else(|| DEFAULT_NETWORK.to_owned());
    let networked = !req.ports.is_empty() || req.ipv4_address.is_some() || !req.aliases.is_empty();
    match Mode::of(&network) {
        Mode::Network(n) => {
            let net = store
                .find_network(&n)
                .ok_or_else(|| Error::not_found(format!("network {n} not found")))?;
            check_aliases_allowed(net, &req.aliases)?;
        }
        Mode::Container(x) => {
            let parent = find_container(store, &x)
                .ok_or_else(|| Error::not_found(format!("no such container: {x}")))?;
            if parent.pid.is_none() {
                return Err(Error::conflict(format!("container {x} is not running")));
            }
            if networked {
                return Err(Error::bad_request(
                    "conflicting options: --network container: shares another container's network (no -p, --ip or --alias)",
                ));
            }
        }
        mode @ (Mode::Host | Mode::None) => {
            if networked {
                return Err(Error::bad_request(format!(
                    "conflicting options: -p, --ip and --alias need a network, not --network {network}"
                )));
            }
            if mode == Mode::Host && req.hostname.is_some() {
                return Err(Error::bad_request(
                    "conflicting options: --network host keeps the host's hostname (no --hostname)",
                ));
            }
        }
    }
    if let Some(h) = &req.hostname {
        check_name("hostname", h)?;
    }
    let ip = match &req.ipv4_address {
        Some(s) => Some(
            s.parse::<Ipv4Addr>()
                .map_err(|_| Error::bad_request(format!("invalid IPv4 address {s:?}")))?,
        ),
        None => None,
    };
    Ok(Container {
        id,
        name,
        cmd: req.cmd,
        network,
        ip,
        aliases: req.aliases,
        ports: req.ports,
        hostname: req.hostname,
        created,
        pid: None,
        start_ticks: None,
        exit_code: None,
        connected: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::NetworkCreate;
    use crate::error::ErrorKind::{self, BadRequest, Conflict, NotFound};
    use crate::plan::{HostFacts, default_bridge, plan_network};

    fn run(network: Option<&str>) -> RunRequest {
        RunRequest {
            name: Some("web".into()),
            network: network.map(str::to_owned),
            ipv4_address: None,
            aliases: vec![],
            ports: vec![],
            hostname: None,
            cmd: vec!["sleep".into(), "1".into()],
        }
    }

    fn store() -> Store {
        let mut store = Store::default();
        let bridge = default_bridge("b".repeat(64), String::new());
        store.networks.insert(bridge.id.clone(), bridge);
        let net = plan_network(
            &store,
            NetworkCreate {
                name: "app".into(),
                ..Default::default()
            },
            &HostFacts::default(),
            "a".repeat(64),
            String::new(),
        )
        .expect("app");
        store.networks.insert(net.id.clone(), net);
        for (name, pid) in [("up", Some(10)), ("down", None)] {
            let mut c = check_run(&store, &[], run(Some("app")), name.repeat(8), String::new())
                .expect("fixture");
            c.name = name.into();
            c.pid = pid;
            store.containers.insert(c.id.clone(), c);
        }
        store
    }

    #[test]
    fn run_requests_are_checked_before_anything_starts() {
        let store = store();
        let with = |net: Option<&str>, f: &dyn Fn(&mut RunRequest)| {
            let mut r = run(net);
            f(&mut r);
            r
        };
        let cases: Vec<(RunRequest, ErrorKind, &str)> = vec![
            (with(None, &|r| r.cmd.clear()), BadRequest, "no command"),
            (
                with(None, &|r| r.name = Some("up".into())),
                Conflict,
                "already in use",
            ),
            (
                with(None, &|r| r.name = Some("a b".into())),
                BadRequest,
                "invalid container",
            ),
            (run(Some("nope")), NotFound, "network nope not found"),
            (
                with(None, &|r| r.aliases = vec!["x".into()]),
                BadRequest,
                "user-defined",
            ),
            (run(Some("container:ghost")), NotFound, "no such container"),
            (run(Some("container:down")), Conflict, "not running"),
            (
                with(Some("container:up"), &|r| r.ports = vec!["80:80".into()]),
                BadRequest,
                "conflicting options",
            ),
            (
                with(Some("host"), &|r| r.ipv4_address = Some("10.0.0.2".into())),
                BadRequest,
                "need a network",
            ),
            (
                with(Some("host"), &|r| r.hostname = Some("h".into())),
                BadRequest,
                "hostname",
            ),
            (
                with(Some("none"), &|r| r.aliases = vec!["x".into()]),
                BadRequest,
                "need a network",
            ),
            (
                with(Some("app"), &|r| r.hostname = Some("-h".into())),
                BadRequest,
                "invalid hostname",
            ),
            (
                with(Some("app"), &|r| r.ipv4_address = Some("10.0.0".into())),
                BadRequest,
                "invalid IPv4",
            ),
        ];
        for (r, kind, text) in cases {
            let what = format!("{r:?}");
            let e = check_run(&store, &[], r, "f".repeat(64), String::new()).expect_err(&what);
            assert_eq!(e.kind(), kind, "{what}: {e}");
            assert!(e.message().contains(text), "{what}: {e}");
        }
        // A name another start is busy with is taken too.
        let e = check_run(
            &store,
            &["web".into()],
            run(None),
            "f".repeat(64),
            String::new(),
        )
        .expect_err("busy");
        assert_eq!(e.kind(), Conflict);
    }

    #[test]
    fn a_valid_request_becomes_a_stopped_container() {
        let store = store();
        let mut r = run(Some("container:up"));
        r.name = None;
        let c =
            check_run(&store, &[], r, "0123456789abcdef".repeat(4), "now".into()).expect("valid");
        assert_eq!(c.name, "c-0123456789ab");
        assert_eq!(Mode::of(&c.network), Mode::Container("up".into()));
        assert_eq!((c.pid, c.exit_code), (None, None));
        let mut r = run(None);
        r.ipv4_address = Some("172.17.0.9".into());
        let c = check_run(&store, &[], r, "f".repeat(64), String::new()).expect("valid");
        assert_eq!(
            (c.network.as_str(), c.ip),
            ("bridge", Some(Ipv4Addr::new(172, 17, 0, 9)))
        );
        assert_eq!(
            find_container(&store, "up").map(|c| c.name.as_str()),
            Some("up")
        );
        assert_eq!(
            find_container(&store, "upup").map(|c| c.name.as_str()),
            Some("up")
        );
        assert!(find_container(&store, "").is_none());
    }
}
