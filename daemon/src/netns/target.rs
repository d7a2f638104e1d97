//! Targets: what an endpoint is attached through, and the namespace behind it.

use std::path::PathBuf;

use vswitch_netdev::ns::{NetNs, NsId};

use crate::api::Target;
use crate::error::{Error, Result};

/// Where `ip netns` keeps its namespace files.
pub const NETNS_DIR: &str = "/run/netns";

/// The PID behind a target, for PID targets and `/proc/PID/ns/net` paths.
pub fn target_pid(target: &Target) -> Option<u32> {
    match target {
        Target::Pid(p) => Some(*p),
        Target::Path(p) => p
            .strip_prefix("/proc/")?
            .strip_suffix("/ns/net")?
            .parse()
            .ok(),
        Target::Name(_) => None,
    }
}

/// The namespace file a target names.
pub fn netns_path(target: &Target) -> Result<PathBuf> {
    Ok(match target {
        Target::Pid(pid) => proc_netns(*pid),
        Target::Path(p) => PathBuf::from(p),
        Target::Name(n) => {
            if n.is_empty() || n == "." || n == ".." || n.contains('/') {
                return Err(Error::bad_request(format!("invalid netns name {n:?}")));
            }
            PathBuf::from(NETNS_DIR).join(n)
        }
    })
}

/// `/proc/PID/ns/net`.
pub fn proc_netns(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

/// Opens the namespace a target names.
pub fn open_target(target: &Target) -> Result<NetNs> {
    let path = netns_path(target)?;
    NetNs::open(&path).map_err(|e| {
        Error::not_found(format!(
            "cannot open the network namespace of {target} ({}): {e}",
            path.display()
        ))
    })
}

/// When process `pid` started, in clock ticks since boot (field 22 of `/proc/PID/stat`): with
/// the PID, it tells a process from a later one that reuses its PID.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_ticks(&stat)
}

/// Field 22 of a `/proc/PID/stat` line. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from its last `)`.
fn parse_start_ticks(stat: &str) -> Option<u64> {
    let after = stat.rsplit_once(") ")?.1;
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The host's initial network namespace, as far as the daemon can tell: that of PID 1, and
/// that of `kthreadd` (PID 2 when visible), which the kernel keeps in the initial namespace
/// even where PID 1 may not be inspected.
pub fn host_netns() -> Vec<NsId> {
    let kthreadd = std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd");
    let mut found: Vec<NsId> = [Some(1), kthreadd.then_some(2)]
        .into_iter()
        .flatten()
        .filter_map(|pid| NetNs::open(&proc_netns(pid)).ok())
        .map(|ns| ns.id())
        .collect();
    found.dedup();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_name_their_namespace_files() {
        let p = |t: Target| netns_path(&t).map(|p| p.display().to_string());
        assert_eq!(p(Target::Pid(7)).as_deref(), Ok("/proc/7/ns/net"));
        assert_eq!(p(Target::Name("a".into())).as_deref(), Ok("/run/netns/a"));
        assert_eq!(p(Target::Path("/x/y".into())).as_deref(), Ok("/x/y"));
        for bad in ["", ".", "..", "a/b"] {
            assert_eq!(
                p(Target::Name(bad.into())).map_err(|e| e.kind()),
                Err(crate::error::ErrorKind::BadRequest),
                "{bad:?}"
            );
        }
        assert_eq!(target_pid(&Target::Pid(9)), Some(9));
        assert_eq!(
            target_pid(&Target::Path("/proc/12/ns/net".into())),
            Some(12)
        );
        assert_eq!(target_pid(&Target::Path("/proc/12/ns/mnt".into())), None);
        assert_eq!(target_pid(&Target::Name("12".into())), None);
    }

    #[test]
    fn start_ticks_skip_odd_command_names() {
        let stat = "42 (a) b) c) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 777 1 2";
        assert_eq!(parse_start_ticks(stat), Some(777));
        assert_eq!(parse_start_ticks("42 (x) S 1"), None);
        assert_eq!(parse_start_ticks(""), None);
    }
}
