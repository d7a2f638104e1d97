//! Planning and validation: pure functions from a request and the current state to what should
//! be made (a [`Network`](crate::state::Network), an [`Endpoint`](crate::state::Endpoint)), or
//! the one-line error the client gets. Nothing here touches the system: ids, clocks and the
//! host's routes come in as arguments, so every rule is unit-tested without root.

mod container;
mod endpoint;
mod network;

pub use container::{Mode, check_run, find_container};
pub use endpoint::{plan_endpoint, plan_ports, route_metric_for};
pub use network::{HostFacts, check_network_name, default_bridge, plan_network};

use crate::error::{Error, Result};
use crate::state::Network;

/// Name of the network that exists from the first start, like docker0.
pub const DEFAULT_NETWORK: &str = "bridge";

/// Docker's rule for names: a letter or digit, then letters, digits, `_`, `.` or `-`.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && name.len() <= 128
}

/// Refuses a `kind` name (network, endpoint, alias, container, hostname) that breaks the rule.
pub fn check_name(kind: &str, name: &str) -> Result<()> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(Error::bad_request(format!(
            "invalid {kind} name {name:?}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
        )))
    }
}

/// Aliases are names, and a network without names (the default `bridge`) could not resolve
/// them: refused, as Docker does, rather than stored and ignored.
pub fn check_aliases_allowed(net: &Network, aliases: &[String]) -> Result<()> {
    if !net.dns_names && !aliases.is_empty() {
        return Err(Error::bad_request(format!(
            "network-scoped aliases need a user-defined network: {} does not resolve names",
            net.name
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dockers_rule() {
        for (name, ok) in [
            ("web", true),
            ("tomcat82", true),
            ("a.b_c-d", true),
            ("9lives", true),
            ("", false),
            ("-web", false),
            ("_web", false),
            ("web server", false),
            ("web/1", false),
            ("wéb", false),
            (&"x".repeat(128), true),
            (&"x".repeat(129), false),
        ] {
            assert_eq!(valid_name(name), ok, "{name:?}");
            assert_eq!(check_name("endpoint", name).is_ok(), ok, "{name:?}");
        }
        let e = check_name("alias", "a b").expect_err("refused");
        assert_eq!(e.status(), 400);
        assert!(e.message().contains("invalid alias name"), "{e}");
    }
}
