//! Outbound ping through the daemon's raw ICMP and ICMPv6 sockets, for when ping sockets are
//! not allowed (`net.ipv4.ping_group_range` closed) and the daemon has CAP_NET_RAW.
//!
//! One socket per family serves every network: each flow gets an echo id unique in the
//! daemon (per family), and each reply read is matched to its flow by id, source and sequence
//! number in one lookup ([`vswitch_nat::echo`]). A blocking thread per family reads its socket
//! for the daemon's lifetime. An ICMPv6 socket sees every ICMPv6 message (neighbour
//! discovery too): all but echo replies are skipped.

use std::net::{IpAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};

use nix::sys::socket::{MsgFlags, SockaddrIn, SockaddrIn6, sendto};
use parking_lot::Mutex;
use vswitch_nat::echo::{EchoIds, raw_echo_reply, raw_echo_reply6, with_echo_id};
use vswitch_nat::flows::IcmpKey;
use vswitch_nat::frame::{EchoFlow, echo_reply_frame};

use super::protocol::Injector;

/// Big enough for an echo reply that reaches a container unfragmented, with its IP header.
const DATAGRAM_MAX: usize = 65_535;

/// Whose replies an echo id carries.
struct Registration {
    flow: EchoFlow,
    key: IcmpKey,
    injector: Injector,
}

/// A raw ICMP (or ICMPv6) socket and the flows that share it.
pub(super) struct RawPinger {
    socket: std::net::UdpSocket,
    v6: bool,
    flows: Mutex<EchoIds<Registration>>,
}

/// An outbound ping flow on the raw socket; its id is released when it is dropped.
pub(super) struct RawEcho {
    pinger: Arc<RawPinger>,
    id: u16,
    dst: IpAddr,
}

impl RawPinger {
    /// The daemon's raw pinger of IPv6 (or IPv4), opened on first use; `None` without
    /// CAP_NET_RAW.
    pub(super) fn shared(v6: bool) -> Option<Arc<RawPinger>> {
        static PINGER: OnceLock<Option<Arc<RawPinger>>> = OnceLock::new();
        static PINGER6: OnceLock<Option<Arc<RawPinger>>> = OnceLock::new();
        match v6 {
            false => PINGER.get_or_init(|| Self::open(false)).clone(),
            true => PINGER6.get_or_init(|| Self::open(true)).clone(),
        }
    }

    fn open(v6: bool) -> Option<Arc<RawPinger>> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
        let (family, protocol) = match v6 {
            false => (AddressFamily::Inet, SockProtocol::Icmp),
            true => (AddressFamily::Inet6, SockProtocol::IcmpV6),
        };
        let fd = match socket(family, SockType::Raw, SockFlag::SOCK_CLOEXEC, protocol) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open an ICMP socket: outbound ping needs net.ipv4.ping_group_range to include the daemon's group, or CAP_NET_RAW");
                return None;
            }
        };
        // A datagram socket of another protocol: std's UdpSocket is a wrapper over send/recv.
        let pinger = Arc::new(RawPinger {
            socket: std::net::UdpSocket::from(fd),
            v6,
            flows: Mutex::new(EchoIds::default()),
        });
        let reader = pinger.clone();
        std::thread::Builder::new()
            .name(if v6 { "raw-ping6" } else { "raw-ping" }.into())
            .spawn(move || reader.read_replies())
            .ok()?;
        tracing::info!(
            ipv6 = v6,
            "outbound ping uses a raw ICMP socket (ping sockets are not allowed)"
        );
        Some(pinger)
    }

    /// A new flow for a container's pings to `flow.dst`; `None` when every id is taken.
    pub(super) fn register(
        self: &Arc<Self>,
        flow: EchoFlow,
        key: IcmpKey,
        injector: Injector,
    ) -> Option<RawEcho> {
        let dst = flow.dst;
        let id = self.flows.lock().allocate(
            dst,
            Registration {
                flow,
                key,
                injector,
            },
        )?;
        Some(RawEcho {
            pinger: self.clone(),
            id,
            dst,
        })
    }

    fn read_replies(&self) {
        let mut buf = vec![0u8; DATAGRAM_MAX];
        loop {
            let (n, from) = match self.socket.recv_from(&mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "raw ICMP socket failed; outbound ping stops");
                    return;
                }
            };
            // IPv4 comes with its IP header; ICMPv6 without, its source with the read.
            let reply = if self.v6 {
                raw_echo_reply6(&buf[..n]).map(|(id, seq)| (from.ip(), id, seq, &buf[..n]))
            } else {
                raw_echo_reply(&buf[..n]).map(|(src, id, seq, m)| (IpAddr::V4(src), id, seq, m))
            };
            let Some((src, id, seq, message)) = reply else {
                continue;
            };
            let flows = self.flows.lock();
            let Some(r) = flows.reply(src, id, seq) else {
                continue;
            };
            if let Some(frame) = echo_reply_frame(&r.flow, message) {
                // Never blocks: a full queue drops the reply, as a busy link would.
                r.injector.icmp_in(r.key, frame);
            }
        }
    }
}

impl RawEcho {
    /// Sends a container's echo request (`message`, with the container's id) as this flow's.
    pub(super) fn send(&self, seq: u16, message: &[u8]) {
        let Some(message) = with_echo_id(message, self.id) else {
            return;
        };
        self.pinger.flows.lock().sent(self.id, seq);
        // Never blocks the datapath thread: with the socket's buffer full (a congested way
        // out), the request is dropped, as a full link would.
        let fd = self.pinger.socket.as_raw_fd();
        let flags = MsgFlags::MSG_DONTWAIT;
        let _ = match self.dst {
            IpAddr::V4(v4) => sendto(
                fd,
                &message,
                &SockaddrIn::from(SocketAddrV4::new(v4, 0)),
                flags,
            ),
            IpAddr::V6(v6) => sendto(
                fd,
                &message,
                &SockaddrIn6::from(SocketAddrV6::new(v6, 0, 0, 0)),
                flags,
            ),
        };
    }
}

impl Drop for RawEcho {
    fn drop(&mut self) {
        self.pinger.flows.lock().release(self.id);
    }
}
