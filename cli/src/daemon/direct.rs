//! The in-kernel path of published TCP ports, for clients the container could not answer
//! directly anyway (the host's loopback, the other address family).
//!
//! Such a client cannot be shown to the container as itself, so nothing is gained by carrying
//! its bytes through the gateway's userspace TCP stack. Instead the daemon opens a socket
//! *inside the container's network namespace*, connects it to the container's own address,
//! and moves bytes between the two sockets with `splice(2)` through a pipe: pages change hands
//! inside the kernel, nothing is copied through userspace and nothing crosses the switch.
//! pasta's loopback path works the same way. The container sees the connection coming from
//! its own address (never from 127.0.0.1, so services it binds to its loopback stay private).
//!
//! Creating a socket in another namespace needs a thread that has entered it: one factory
//! thread does that for the whole daemon, entering the container's namespace for the
//! `socket()` call only and returning to the daemon's namespace before anything else. The
//! connected socket keeps the namespace alive only as long as the connection lasts.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::sys::socket::{AddressFamily, Shutdown, SockFlag, SockType, shutdown, socket};
use tokio::io::Interest;
use tokio::net::TcpStream;
use vswitch_netdev::ns::{NetNs, NsId};

/// How long the container may take to accept before the client is reset.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pipe capacity per direction: more bytes per splice call, fewer wake-ups. The pipe holds page
/// references, not copies, so this bounds how much one connection can have in flight.
const PIPE_SIZE: usize = 256 * 1024;

/// Where a container's namespace is, and which namespace it must be (a PID or name can be
/// reused by another namespace; the identity check catches that).
#[derive(Debug, Clone)]
pub struct NsTarget {
    pub path: PathBuf,
    pub id: NsId,
}

struct Request {
    target: NsTarget,
    family: AddressFamily,
    reply: tokio::sync::oneshot::Sender<io::Result<OwnedFd>>,
}

/// Makes TCP sockets inside other network namespaces (see the module docs).
#[derive(Clone)]
pub struct SocketFactory {
    requests: std::sync::mpsc::Sender<Request>,
}

impl SocketFactory {
    /// Starts the factory thread in the calling thread's namespace, which it returns to after
    /// every socket.
    pub fn start() -> io::Result<Self> {
        let home = NetNs::current()?;
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("vswitch-nssock".into())
            .spawn(move || {
                while let Ok(req) = rx.recv() {
                    let made = socket_in(&req.target, req.family);
                    // A thread stuck in a container's namespace would make the next sockets
                    // there too: if the way home fails, stop; callers then use the gateway path.
                    let home_ok = home.enter();
                    let _ = req.reply.send(match &home_ok {
                        Ok(()) => made,
                        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                    });
                    if let Err(e) = home_ok {
                        tracing::error!(error = %e, "cannot return to the daemon's namespace; in-kernel published ports disabled");
                        return;
                    }
                }
            })?;
        Ok(Self { requests: tx })
    }

    /// A non-blocking TCP socket of `family` living in the namespace `target`.
    async fn socket(&self, target: &NsTarget, family: AddressFamily) -> io::Result<OwnedFd> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.requests
            .send(Request {
                target: target.clone(),
                family,
                reply,
            })
            .map_err(|_| io::Error::other("namespace socket thread is gone"))?;
        answer
            .await
            .map_err(|_| io::Error::other("namespace socket thread is gone"))?
    }
}

/// Runs on the factory thread: enters the target namespace (after checking it is still the
/// right one) and makes the socket there. The caller returns the thread home.
fn socket_in(target: &NsTarget, family: AddressFamily) -> io::Result<OwnedFd> {
    let ns = NetNs::open(&target.path)?;
    if ns.id() != target.id {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the endpoint's namespace is gone",
        ));
    }
    ns.enter()?;
    socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)
}

/// Connects to `container` from inside its namespace. `Err` means the in-kernel path is not
/// available (the caller falls back to the gateway); `Ok(None)` means the container refused or
/// did not answer, which the client should see.
pub async fn connect(
    factory: &SocketFactory,
    target: &NsTarget,
    container: SocketAddr,
) -> io::Result<Option<TcpStream>> {
    let family = if container.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = factory.socket(target, family).await?;
    let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(container)).await {
        Ok(Ok(stream)) => Ok(Some(stream)),
        Ok(Err(e)) => {
            tracing::debug!(%container, error = %e, "published port refused in the container");
            Ok(None)
        }
        Err(_) => Ok(None),
    }
}

/// Moves bytes both ways between `client` and `server` until both directions have ended. A FIN
/// becomes a half-close on the other side; a reset or error resets both.
pub async fn splice_streams(client: TcpStream, server: TcpStream) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let up = pump(&client, &server);
    let down = pump(&server, &client);
    tokio::pin!(up);
    tokio::pin!(down);
    let clean = tokio::select! {
        r = &mut up => r.is_ok() && down.await.is_ok(),
        r = &mut down => r.is_ok() && up.await.is_ok(),
    };
    if !clean {
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
}

/// One direction: socket -> pipe -> socket, until EOF (then half-close `to`) or an error.
async fn pump(from: &TcpStream, to: &TcpStream) -> io::Result<()> {
    let (pipe_out, pipe_in) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    // Best effort: the default 64 KiB pipe works too, with more calls.
    let _ = fcntl(&pipe_in, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        // The pipe is empty here, so filling it never blocks on the pipe side.
        let filled = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from, None, &pipe_in, None, PIPE_SIZE, flags).map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if filled == 0 {
            let _ = shutdown(to.as_fd().as_raw_fd(), Shutdown::Write);
            return Ok(());
        }
        let mut left = filled;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(&pipe_out, None, to, None, left, flags).map_err(io::Error::from)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
