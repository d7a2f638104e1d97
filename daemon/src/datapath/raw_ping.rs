//! Outbound ping through the daemon's one raw ICMP socket, for when ping sockets are not
//! allowed (`net.ipv4.ping_group_range` closed) and the daemon has CAP_NET_RAW.
//!
//! One socket serves every network: each flow gets an echo id unique in the daemon, and each
//! reply read is matched to its flow by id, source and sequence number in one lookup
//! ([`vswitch_nat::echo`]). A blocking thread reads the socket for the daemon's lifetime.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};

use nix::sys::socket::{MsgFlags, SockaddrIn, sendto};
use parking_lot::Mutex;
use vswitch_nat::echo::{EchoIds, raw_echo_reply, with_echo_id};
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

/// The raw ICMP socket and the flows that share it.
pub(super) struct RawPinger {
    socket: std::net::UdpSocket,
    flows: Mutex<EchoIds<Registration>>,
}

/// An outbound ping flow on the raw socket; its id is released when it is dropped.
pub(super) struct RawEcho {
    pinger: Arc<RawPinger>,
    id: u16,
    dst: Ipv4Addr,
}

impl RawPinger {
    /// The daemon's raw pinger, opened on first use; `None` without CAP_NET_RAW.
    pub(super) fn shared() -> Option<Arc<RawPinger>> {
        static PINGER: OnceLock<Option<Arc<RawPinger>>> = OnceLock::new();
        PINGER.get_or_init(Self::open).clone()
    }

    fn open() -> Option<Arc<RawPinger>> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
        let fd = match socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::Icmp,
        ) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open an ICMP socket: outbound ping needs net.ipv4.ping_group_range to include the daemon's group, or CAP_NET_RAW");
                return None;
            }
        };
        // A datagram socket of another protocol: std's UdpSocket is a wrapper over send/recv.
        let pinger = Arc::new(RawPinger {
            socket: std::net::UdpSocket::from(fd),
            flows: Mutex::new(EchoIds::default()),
        });
        let reader = pinger.clone();
        std::thread::Builder::new()
            .name("raw-ping".into())
            .spawn(move || reader.read_replies())
            .ok()?;
        tracing::info!("outbound ping uses a raw ICMP socket (ping sockets are not allowed)");
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
            let n = match self.socket.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "raw ICMP socket failed; outbound ping stops");
                    return;
                }
            };
            let Some((src, id, seq, message)) = raw_echo_reply(&buf[..n]) else {
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
        let to = SockaddrIn::from(SocketAddrV4::new(self.dst, 0));
        let _ = sendto(
            self.pinger.socket.as_raw_fd(),
            &message,
            &to,
            MsgFlags::MSG_DONTWAIT,
        );
    }
}

impl Drop for RawEcho {
    fn drop(&mut self) {
        self.pinger.flows.lock().release(self.id);
    }
}
