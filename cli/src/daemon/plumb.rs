//! Putting a TAP device into a target network namespace and configuring it there.
//!
//! The TAP is opened in the daemon's own namespace and only then moved into the target. The
//! order matters: the kernel ties a TAP fd's socket to the namespace it was *opened* in and keeps
//! that namespace alive while the fd is open. Opening it in the daemon's namespace means the
//! daemon never pins a container's namespace, so when the container goes away the namespace is
//! destroyed, the device with it, and the fd reports an error: that is how endpoints are
//! garbage-collected (see the datapath).
//!
//! Everything is configured with rtnetlink. Netlink sockets belong to the namespace of the
//! thread that creates them, so the work runs on a fresh thread that creates one socket in the
//! daemon's namespace, moves the device, enters the target and creates a second one.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, anyhow, bail};
use futures_util::TryStreamExt;
use netlink_packet_route::address::AddressHeaderFlags;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use vswitch_netdev::Tap;
use vswitch_netdev::ns::NetNs;

/// What the device inside the namespace should look like.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Plumbing {
    pub ifname: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub ipv4: (Ipv4Addr, u8),
    pub gateway4: Ipv4Addr,
    pub ipv6: Option<(Ipv6Addr, u8)>,
    pub gateway6: Option<Ipv6Addr>,
}

/// Creates the TAP, moves it into `target` and configures it. Returns the TAP's fd; closing it
/// removes the device again. On error nothing is left behind in either namespace.
pub fn plumb(target: &NetNs, p: &Plumbing) -> anyhow::Result<OwnedFd> {
    std::thread::scope(|s| {
        s.spawn(|| plumb_on_this_thread(target, p))
            .join()
            .unwrap_or_else(|_| Err(anyhow!("plumbing thread panicked")))
    })
}

fn plumb_on_this_thread(target: &NetNs, p: &Plumbing) -> anyhow::Result<OwnedFd> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let temp_name = temp_ifname();
    let tap = Tap::create(&temp_name)?;

    // In the daemon's namespace: address, MTU, and the move.
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(conn);
        let r = async {
            let index = link_index(&handle, &temp_name)
                .await?
                .ok_or_else(|| anyhow!("TAP {temp_name} vanished"))?;
            handle
                .link()
                .set(
                    LinkUnspec::new_with_index(index)
                        .address(p.mac.to_vec())
                        .mtu(p.mtu)
                        .setns_by_fd(target.as_fd().as_raw_fd())
                        .build(),
                )
                .execute()
                .await
                .context("cannot move the TAP into the target namespace")?;
            anyhow::Ok(())
        }
        .await;
        task.abort();
        r
    })?;

    // Inside the target namespace: name, addresses, routes, up.
    target
        .enter()
        .context("cannot enter the target network namespace")?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(conn);
        let r = configure_inside(&handle, &temp_name, p).await;
        task.abort();
        r
    })?;
    Ok(tap.into_fd())
}

async fn configure_inside(handle: &Handle, temp_name: &str, p: &Plumbing) -> anyhow::Result<()> {
    let index = link_index(handle, temp_name)
        .await?
        .ok_or_else(|| anyhow!("TAP {temp_name} did not arrive in the target namespace"))?;
    if let Some(existing) = link_by_name(handle, &p.ifname).await? {
        // A device of ours left over from before a daemon restart has our MAC: replace it.
        // Anything else with that name belongs to somebody else.
        if link_mac(&existing).as_deref() == Some(&p.mac[..]) {
            handle.link().del(existing.header.index).execute().await?;
        } else {
            bail!(
                "interface {} already exists in the target namespace (choose another with --ifname)",
                p.ifname
            );
        }
    }
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .name(p.ifname.clone())
                .build(),
        )
        .execute()
        .await
        .with_context(|| format!("cannot rename the TAP to {}", p.ifname))?;
    configure_addresses(handle, index, p).await
}

/// Addresses, up, lo up and default routes of the TAP with `index`.
async fn configure_addresses(handle: &Handle, index: u32, p: &Plumbing) -> anyhow::Result<()> {
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
    let route4 = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(p.gateway4)
        .output_interface(index)
        .build();
    handle
        .route()
        .add(route4)
        .replace()
        .execute()
        .await
        .context("cannot add the default route")?;
    if let Some(gw6) = p.gateway6 {
        let route6 = RouteMessageBuilder::<Ipv6Addr>::new()
            .gateway(gw6)
            .output_interface(index)
            .build();
        handle
            .route()
            .add(route6)
            .replace()
            .execute()
            .await
            .context("cannot add the IPv6 default route")?;
    }
    Ok(())
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

fn link_mac(link: &LinkMessage) -> Option<Vec<u8>> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(mac) => Some(mac.clone()),
        _ => None,
    })
}

/// A name for the TAP while it sits in the daemon's namespace, unique per daemon and attach.
fn temp_ifname() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) & 0xff_ffff;
    format!("vs{:x}t{:x}", std::process::id() & 0xff_ffff, n)
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
pub fn plumb_via_helper(pid: u32, p: &Plumbing) -> anyhow::Result<OwnedFd> {
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
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot start the TAP helper")?;
    let got = vswitch_netdev::fdpass::recv_fd(ours.as_fd());
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait()?;
    match got {
        Ok(fd) if status.success() => Ok(fd),
        _ => bail!("{}", err.trim().trim_start_matches("Error: ")),
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
        setns(&user, CloneFlags::CLONE_NEWUSER)
            .context("cannot enter the target's user namespace (is it yours?)")?;
    }
    setns(&net, CloneFlags::CLONE_NEWNET).context("cannot enter the target's network namespace")?;
    Ok(())
}

/// The helper's side (`vswitch __tap-helper`): runs in a fresh single-threaded process.
pub fn tap_helper(pid: u32, spec: &str) -> anyhow::Result<()> {
    use std::os::fd::AsFd;
    let p: Plumbing = serde_json::from_str(spec).context("bad helper spec")?;
    enter_namespaces_of(pid, None)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let tap = rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(conn);
        let r = async {
            if let Some(existing) = link_by_name(&handle, &p.ifname).await? {
                if link_mac(&existing).as_deref() == Some(&p.mac[..]) {
                    handle.link().del(existing.header.index).execute().await?;
                } else {
                    bail!(
                        "interface {} already exists in the target namespace (choose another with --ifname)",
                        p.ifname
                    );
                }
            }
            let tap = Tap::create(&p.ifname)?;
            let index = link_index(&handle, &p.ifname)
                .await?
                .ok_or_else(|| anyhow!("the TAP {} vanished", p.ifname))?;
            handle
                .link()
                .set(LinkUnspec::new_with_index(index).address(p.mac.to_vec()).mtu(p.mtu).build())
                .execute()
                .await
                .context("cannot set the TAP's address and MTU")?;
            configure_addresses(&handle, index, &p).await?;
            anyhow::Ok(tap)
        }
        .await;
        task.abort();
        r
    })?;
    let sock = std::io::stdin();
    vswitch_netdev::fdpass::send_fd(sock.as_fd(), tap.as_fd())
        .context("cannot pass the TAP back")?;
    Ok(())
}
