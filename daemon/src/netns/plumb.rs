//! Creating a TAP device inside a target network namespace and configuring it there.
//!
//! The TAP is created inside the target, never moved there: moving a device between
//! namespaces costs the kernel an RCU barrier and grace periods (18-20 ms on the 6.18 kernel we
//! measured, most of an attach), while creating one costs under a millisecond. The price is that
//! the TAP's fd now keeps the target namespace alive (its socket holds a reference to the
//! namespace it was opened in), so the namespace cannot die while the daemon holds the fd and
//! endpoints are collected by watching their target instead (see `watch`).
//!
//! Everything is configured with rtnetlink. Netlink sockets belong to the namespace of the
//! thread that creates them, so the work runs on a fresh thread that enters the target first.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;

use anyhow::{Context, anyhow, bail};
use futures_util::TryStreamExt;
use netlink_packet_route::address::AddressHeaderFlags;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use vswitch_netdev::Tap;
use vswitch_netdev::ns::NetNs;

use crate::error::ErrorKind;

/// What the device inside the namespace should look like.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Plumbing {
    pub ifname: String,
    /// The name was picked by vswitch, not given with `--ifname`: if a device that is not ours
    /// holds it, take the next `ethN` instead of failing (as Docker does).
    #[serde(default)]
    pub ifname_auto: bool,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Checksum and TSO offloads on the TAP (on for every network today: an overlay's tunnel
    /// cuts and checksums what leaves the host; off hands over only complete, MTU-sized frames).
    #[serde(default = "yes")]
    pub offloads: bool,
    pub ipv4: (Ipv4Addr, u8),
    pub gateway4: Ipv4Addr,
    pub ipv6: Option<(Ipv6Addr, u8)>,
    pub gateway6: Option<Ipv6Addr>,
    /// Metric for the default routes via the gateways; `None`: no default route (internal
    /// networks). If a route we did not make already holds it, the next free one is taken.
    pub route_metric: Option<u32>,
}

fn yes() -> bool {
    true
}

/// A TAP made and configured inside its namespace.
#[derive(Debug)]
pub struct Plumbed {
    /// The TAP's fd; closing it removes the device.
    pub fd: OwnedFd,
    pub made: Made,
}

/// What plumbing settled on where the plan left it a choice.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Made {
    /// The device's name (the planned one, or the next free `ethN` if that was taken).
    pub ifname: String,
    /// The metric the default routes got (the planned one, or higher if that was taken).
    pub route_metric: Option<u32>,
}

/// Failures of plumbing that the request, not the daemon, is to blame for.
#[derive(Debug, thiserror::Error)]
pub enum PlumbError {
    #[error("interface {0} already exists in the target namespace (choose another with --ifname)")]
    NameTaken(String),
    #[error(
        "as an unprivileged user, attach needs a PID (or /proc/PID/ns/net) whose user namespace is yours"
    )]
    NeedsPid,
    #[error("cannot enter the target's user namespace (is it yours?): {0}")]
    NotYours(String),
    /// One of the above, as the rootless helper process reported it (its exit status).
    #[error("{message}")]
    Helper { kind: ErrorKind, message: String },
}

impl PlumbError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NameTaken(_) => ErrorKind::Conflict,
            Self::NeedsPid => ErrorKind::BadRequest,
            Self::NotYours(_) => ErrorKind::Forbidden,
            Self::Helper { kind, .. } => *kind,
        }
    }
}

/// The exit status of a helper process that failed with `e`: a [`PlumbError`]'s kind travels
/// back to the daemon in it (1 for anything else).
pub fn helper_exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<PlumbError>().map(PlumbError::kind) {
        Some(ErrorKind::Conflict) => 3,
        Some(ErrorKind::BadRequest) => 4,
        Some(ErrorKind::Forbidden) => 5,
        _ => 1,
    }
}

fn kind_of_exit_code(code: Option<i32>) -> Option<ErrorKind> {
    match code? {
        3 => Some(ErrorKind::Conflict),
        4 => Some(ErrorKind::BadRequest),
        5 => Some(ErrorKind::Forbidden),
        _ => None,
    }
}

/// Runs `work` with an rtnetlink handle on a current-thread runtime of its own, in the calling
/// thread's network namespace (netlink sockets belong to the namespace they are made in).
pub fn with_rtnetlink<T, F, Fut>(work: F) -> anyhow::Result<T>
where
    F: FnOnce(Handle) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(conn);
        let r = work(handle).await;
        task.abort();
        r
    })
}

/// Creates the TAP inside `target` and configures it. Closing the returned fd removes the
/// device again. On error nothing is left behind.
pub fn plumb(target: &NetNs, p: &Plumbing) -> anyhow::Result<Plumbed> {
    std::thread::scope(|s| {
        s.spawn(|| plumb_on_this_thread(target, p))
            .join()
            .unwrap_or_else(|_| Err(anyhow!("plumbing thread panicked")))
    })
}

fn plumb_on_this_thread(target: &NetNs, p: &Plumbing) -> anyhow::Result<Plumbed> {
    target
        .enter()
        .context("cannot enter the target network namespace")?;
    let (tap, made) = with_rtnetlink(|handle| async move { create_inside(&handle, p).await })?;
    Ok(Plumbed {
        fd: tap.into_fd(),
        made,
    })
}

/// In the target namespace (the calling thread's): replaces a device of ours left over from
/// before a daemon restart, creates the TAP under its final name, and configures it. On error
/// the TAP is closed again, which removes it. Returns the TAP and what was settled.
async fn create_inside(handle: &Handle, p: &Plumbing) -> anyhow::Result<(Tap, Made)> {
    let mut ifname = p.ifname.clone();
    for _ in 0..MAX_AUTO_TRIES {
        let Some(existing) = link_by_name(handle, &ifname).await? else {
            break;
        };
        // A leftover of ours is a TAP with our MAC; anything else with that name belongs to
        // somebody else (a Docker container's veth can carry the same 02:42 MAC).
        if is_tun(&existing) && link_mac(&existing).as_deref() == Some(&p.mac[..]) {
            handle.link().del(existing.header.index).execute().await?;
            break;
        }
        match next_eth(&ifname) {
            Some(next) if p.ifname_auto => ifname = next,
            _ => return Err(PlumbError::NameTaken(ifname).into()),
        }
    }
    let tap = Tap::create_with(&ifname, p.offloads)?;
    let index = link_index(handle, &ifname)
        .await?
        .ok_or_else(|| anyhow!("the TAP {ifname} vanished"))?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .address(p.mac.to_vec())
                .mtu(p.mtu)
                .build(),
        )
        .execute()
        .await
        .context("cannot set the TAP's address and MTU")?;
    let route_metric = configure_addresses(handle, index, p).await?;
    Ok((
        tap,
        Made {
            ifname,
            route_metric,
        },
    ))
}

/// How many taken `ethN` names an automatic name skips before giving up.
const MAX_AUTO_TRIES: usize = 64;

/// `eth3` -> `eth4`; `None` for names not of that form.
fn next_eth(name: &str) -> Option<String> {
    let n: u32 = name.strip_prefix("eth")?.parse().ok()?;
    Some(format!("eth{}", n.checked_add(1)?))
}

/// Addresses, up, lo up and default routes of the TAP with `index`; returns the metric the
/// IPv4 default route got.
async fn configure_addresses(
    handle: &Handle,
    index: u32,
    p: &Plumbing,
) -> anyhow::Result<Option<u32>> {
    let (ip4, len4) = p.ipv4;
    handle
        .address()
        .add(index, ip4.into(), len4)
        .execute()
        .await
        .with_context(|| format!("cannot add {ip4}/{len4}"))?;
    if let Some((ip6, len6)) = p.ipv6 {
        let mut req = handle.address().add(index, ip6.into(), len6);
        // Nobody else can hold the address: skip duplicate address detection so it is usable
        // at once.
        req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
        req.execute()
            .await
            .with_context(|| format!("cannot add {ip6}/{len6}"))?;
    }
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .context("cannot bring the interface up")?;
    if let Some(lo) = link_index(handle, "lo").await? {
        handle
            .link()
            .set(LinkUnspec::new_with_index(lo).up().build())
            .execute()
            .await
            .context("cannot bring lo up")?;
    }
    let Some(metric) = p.route_metric else {
        return Ok(None);
    };
    // Added, never replaced: a default route of another network (or of whoever set the
    // namespace up) stays, and the lowest metric wins. When an interface goes, its routes go
    // with it and the next one takes over.
    let got = add_default_route(handle, metric, |m| {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(p.gateway4)
            .output_interface(index)
            .priority(m)
            .build()
    })
    .await
    .context("cannot add the default route")?;
    if let Some(gw6) = p.gateway6 {
        add_default_route(handle, metric, |m| {
            RouteMessageBuilder::<Ipv6Addr>::new()
                .gateway(gw6)
                .output_interface(index)
                .priority(m)
                .build()
        })
        .await
        .context("cannot add the IPv6 default route")?;
    }
    Ok(Some(got))
}

/// Adds the route `build(metric)`, or with the next metric up while a route with the same
/// destination and metric already exists (the kernel refuses a second one as `EEXIST`, for
/// IPv6 too: it checks `NLM_F_EXCL` before it would make a multipath route). Returns the
/// metric used.
async fn add_default_route(
    handle: &Handle,
    metric: u32,
    build: impl Fn(u32) -> netlink_packet_route::route::RouteMessage,
) -> anyhow::Result<u32> {
    const TRIES: u32 = 64;
    for m in metric..metric.saturating_add(TRIES) {
        match handle.route().add(build(m)).execute().await {
            Ok(()) => return Ok(m),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!(
        "metrics {metric} to {} are all taken",
        metric.saturating_add(TRIES - 1)
    )
}

async fn link_by_name(handle: &Handle, name: &str) -> anyhow::Result<Option<LinkMessage>> {
    match handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn link_index(handle: &Handle, name: &str) -> anyhow::Result<Option<u32>> {
    Ok(link_by_name(handle, name).await?.map(|l| l.header.index))
}

fn is_tun(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Tun))),
        _ => false,
    })
}

fn link_mac(link: &LinkMessage) -> Option<Vec<u8>> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(mac) => Some(mac.clone()),
        _ => None,
    })
}

/// A TAP in the daemon's own namespace, down, with `mac` and `mtu`: for an engine that moves
/// the interface into the container itself (Docker hands a remote driver's interface over by
/// name). The fd keeps working after the move. A TAP of ours left with that name is replaced.
pub fn make_tap_here(name: &str, mac: [u8; 6], mtu: u32) -> anyhow::Result<OwnedFd> {
    std::thread::scope(|s| {
        s.spawn(|| {
            with_rtnetlink(|handle| async move {
                if let Some(old) = link_by_name(&handle, name).await? {
                    // Only a leftover of this endpoint's (a TAP with its MAC) is replaced.
                    if !is_tun(&old) || link_mac(&old).as_deref() != Some(&mac[..]) {
                        return Err(PlumbError::NameTaken(name.to_owned()).into());
                    }
                    handle.link().del(old.header.index).execute().await?;
                }
                let tap = Tap::create(name)?;
                let index = link_index(&handle, name)
                    .await?
                    .ok_or_else(|| anyhow!("the TAP {name} vanished"))?;
                handle
                    .link()
                    .set(
                        LinkUnspec::new_with_index(index)
                            .address(mac.to_vec())
                            .mtu(mtu)
                            .build(),
                    )
                    .execute()
                    .await
                    .context("cannot set the TAP's address and MTU")?;
                Ok(tap.into_fd())
            })
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow!("plumbing thread panicked")))
    })
}

/// The name of the interface with `mac` inside `ns`, if there is one.
pub fn link_name_by_mac(ns: &NetNs, mac: [u8; 6]) -> anyhow::Result<Option<String>> {
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter().context("cannot enter the namespace")?;
            with_rtnetlink(|handle| async move {
                let mut links = handle.link().get().execute();
                while let Some(link) = links.try_next().await? {
                    if link_mac(&link).as_deref() == Some(&mac[..]) {
                        return Ok(link.attributes.iter().find_map(|a| match a {
                            LinkAttribute::IfName(n) => Some(n.clone()),
                            _ => None,
                        }));
                    }
                }
                Ok(None)
            })
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow!("netlink thread panicked")))
    })
}

/// Brings the link `name` up, if it exists.
pub async fn set_up(handle: &Handle, name: &str) -> anyhow::Result<()> {
    if let Some(index) = link_index(handle, name).await? {
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await?;
    }
    Ok(())
}

/// Rootless plumbing: a helper process (`vswitch __tap-helper`, single-threaded) joins the
/// target process's user and network namespaces, creates and configures the TAP there and
/// passes its fd back over a Unix socket. An unprivileged daemon cannot create devices in its
/// own namespace or move them, and a multithreaded process cannot enter a user namespace.
///
/// The TAP's socket then belongs to the target namespace and keeps it alive, so endpoints
/// attached this way are collected by watching the target process instead (see the daemon).
pub fn plumb_via_helper(pid: u32, p: &Plumbing) -> anyhow::Result<Plumbed> {
    use std::io::Read;
    use std::os::fd::AsFd;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ours.set_read_timeout(Some(std::time::Duration::from_secs(15)))?;
    let spec = serde_json::to_string(p)?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("__tap-helper")
        .arg("--pid")
        .arg(pid.to_string())
        .arg("--spec")
        .arg(spec)
        .stdin(std::process::Stdio::from(OwnedFd::from(theirs)))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot start the TAP helper")?;
    let got = vswitch_netdev::fdpass::recv_fd(ours.as_fd());
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait()?;
    match got {
        Ok(fd) if status.success() => Ok(Plumbed {
            fd,
            // The helper prints what it settled on as one JSON line.
            made: serde_json::from_str(out.trim()).context("bad answer from the TAP helper")?,
        }),
        _ => {
            let message = err.trim().trim_start_matches("Error: ").to_owned();
            match kind_of_exit_code(status.code()) {
                Some(kind) => Err(PlumbError::Helper { kind, message }.into()),
                None => bail!("{message}"),
            }
        }
    }
}

/// Moves the calling (single-threaded) helper process into the user and network namespaces
/// of process `pid`, as the rootless helpers do. With `netns_inode`, refuses if that process
/// is no longer in that network namespace (its PID was reused).
pub fn enter_namespaces_of(pid: u32, netns_inode: Option<u64>) -> anyhow::Result<()> {
    use nix::sched::{CloneFlags, setns};
    use std::os::unix::fs::MetadataExt;
    let user = std::fs::File::open(format!("/proc/{pid}/ns/user"))
        .with_context(|| format!("cannot open the user namespace of pid {pid}"))?;
    let net = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .with_context(|| format!("cannot open the network namespace of pid {pid}"))?;
    let net_ino = net.metadata()?.ino();
    if netns_inode.is_some_and(|ino| ino != net_ino) {
        bail!("pid {pid} is no longer in the endpoint's network namespace");
    }
    let own_user = std::fs::metadata("/proc/self/ns/user")?.ino();
    if user.metadata()?.ino() != own_user {
        setns(&user, CloneFlags::CLONE_NEWUSER).map_err(|e| PlumbError::NotYours(e.to_string()))?;
    }
    setns(&net, CloneFlags::CLONE_NEWNET).context("cannot enter the target's network namespace")?;
    Ok(())
}

/// The helper's side (`vswitch __tap-helper`): runs in a fresh single-threaded process.
pub fn tap_helper(pid: u32, spec: &str) -> anyhow::Result<()> {
    use std::os::fd::AsFd;
    let p: Plumbing = serde_json::from_str(spec).context("bad helper spec")?;
    enter_namespaces_of(pid, None)?;
    let (tap, made) = with_rtnetlink(|handle| async move { create_inside(&handle, &p).await })?;
    println!("{}", serde_json::to_string(&made)?);
    let sock = std::io::stdin();
    vswitch_netdev::fdpass::send_fd(sock.as_fd(), tap.as_fd())
        .context("cannot pass the TAP back")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the rootless helper's failure was keeps its kind through the exit status.
    #[test]
    fn helper_failures_keep_their_kind() {
        for e in [
            PlumbError::NameTaken("eth0".into()),
            PlumbError::NeedsPid,
            PlumbError::NotYours("EPERM".into()),
        ] {
            let kind = e.kind();
            let code = helper_exit_code(&anyhow::Error::from(e).context("while plumbing"));
            assert_eq!(kind_of_exit_code(Some(i32::from(code))), Some(kind));
        }
        assert_eq!(helper_exit_code(&anyhow!("netlink said no")), 1);
        assert_eq!(kind_of_exit_code(Some(1)), None);
        assert_eq!(kind_of_exit_code(None), None, "killed by a signal");
    }
}
