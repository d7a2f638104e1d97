//! The host-side listener: `vswitch daemon --dns-listen ADDR:PORT` answers `<name>.<network>`
//! for every network on a host socket (UDP and TCP), so the host can resolve containers, for
//! example by routing the network domains to it with systemd-resolved. It never forwards.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;

use crate::responder::{Asker, Outcome, Responder, Transport};

/// A TCP client gets this long to send each complete query (a trickling client is cut).
pub const TCP_IDLE: Duration = Duration::from_secs(5);
const MAX_TCP_CLIENTS: usize = 64;

/// Bound host sockets, ready to serve.
pub struct HostListener {
    udp: UdpSocket,
    tcp: TcpListener,
}

impl HostListener {
    /// Binds UDP and TCP on `addr`. Errors (port in use, no permission) surface here, at start.
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let udp = UdpSocket::bind(addr).await?;
        let tcp = TcpListener::bind(udp.local_addr()?).await?;
        Ok(Self { udp, tcp })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// Serves until the runtime shuts down.
    pub async fn run(self, responder: Arc<Responder>) {
        let Self { udp, tcp } = self;
        let r = responder.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            loop {
                let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                    continue;
                };
                if let Outcome::Reply(reply) = r.answer(Asker::Host, Transport::Udp, &buf[..n]) {
                    let _ = udp.send_to(&reply, peer).await;
                }
            }
        });
        let slots = Arc::new(Semaphore::new(MAX_TCP_CLIENTS));
        loop {
            let Ok((stream, _)) = tcp.accept().await else {
                continue;
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let r = responder.clone();
            tokio::spawn(async move {
                let _ = serve_tcp(stream, &r).await;
                drop(permit);
            });
        }
    }
}

async fn serve_tcp(mut s: tokio::net::TcpStream, r: &Responder) -> std::io::Result<()> {
    loop {
        let read = async {
            let len = s.read_u16().await?;
            let mut q = vec![0u8; usize::from(len)];
            s.read_exact(&mut q).await?;
            std::io::Result::Ok(q)
        };
        let q = match tokio::time::timeout(TCP_IDLE, read).await {
            Ok(Ok(q)) => q,
            _ => return Ok(()),
        };
        if let Outcome::Reply(reply) = r.answer(Asker::Host, Transport::Tcp, &q) {
            let len = u16::try_from(reply.len()).unwrap_or(u16::MAX);
            s.write_all(&len.to_be_bytes()).await?;
            s.write_all(&reply[..usize::from(len)]).await?;
        }
    }
}
