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
use std::sync::Arc;
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
    // An id of 0:0 is a Docker sandbox vswitch has not seen yet (its path is dockerd's).
    let unknown = target.id.dev == 0 && target.id.ino == 0;
    if !unknown && ns.id() != target.id {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the endpoint's namespace is gone",
        ));
    }
    ns.enter()?;
    tcp_socket(family)
}

/// A non-blocking, close-on-exec TCP socket in the calling thread's network namespace.
fn tcp_socket(family: AddressFamily) -> io::Result<OwnedFd> {
    socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)
}

/// How sockets inside one endpoint's namespace are made.
#[derive(Clone)]
pub enum Inside {
    /// Root daemon: the shared factory thread enters the namespace.
    Enter {
        factory: SocketFactory,
        target: NsTarget,
    },
    /// Rootless daemon: a helper process living in the container's namespaces makes them.
    Helper(Arc<HelperSockets>),
}

impl Inside {
    async fn socket(&self, family: AddressFamily) -> io::Result<OwnedFd> {
        match self {
            Inside::Enter { factory, target } => factory.socket(target, family).await,
            Inside::Helper(h) => h.socket(family).await,
        }
    }
}

/// A connection inside the container's namespace, with the two pipes that will carry it.
pub struct Inner {
    stream: TcpStream,
    pipes: [(OwnedFd, OwnedFd); 2],
}

/// Connects to `container` from inside its namespace. `Err` means the in-kernel path is not
/// available (no socket or no pipes: the caller falls back to the gateway); `Ok(None)` means
/// the container refused or did not answer, which the client should see.
pub async fn connect(inside: &Inside, container: SocketAddr) -> io::Result<Option<Inner>> {
    // Pipes first: if the pipe budget is exhausted (an unprivileged user's is bounded by
    // fs.pipe-user-pages-*), the client still gets through, by the gateway.
    let roomy = matches!(inside, Inside::Enter { .. });
    let pipes = [pipe(roomy)?, pipe(roomy)?];
    let family = if container.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = inside.socket(family).await?;
    let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(container)).await {
        Ok(Ok(stream)) => Ok(Some(Inner { stream, pipes })),
        Ok(Err(e)) => {
            tracing::debug!(%container, error = %e, "published port refused in the container");
            Ok(None)
        }
        Err(_) => Ok(None),
    }
}

/// A non-blocking pipe, enlarged to [`PIPE_SIZE`] if `roomy` (root: an unprivileged user's
/// pipe pages are a budget shared by all its pipes, so the rootless daemon keeps the default).
fn pipe(roomy: bool) -> io::Result<(OwnedFd, OwnedFd)> {
    let (out, inp) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    if roomy {
        // Best effort: the default 64 KiB pipe works too, with more calls.
        let _ = fcntl(&inp, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
    }
    Ok((out, inp))
}

type HelperRequest = (
    AddressFamily,
    tokio::sync::oneshot::Sender<io::Result<OwnedFd>>,
);

/// The rootless way to make sockets inside a container's namespaces: a multithreaded daemon
/// cannot enter a user namespace, so a single-threaded helper (`vswitch __socket-helper`)
/// joins the container's user and network namespaces and hands out sockets over a Unix
/// socket. It is started at the first loopback connection, restarted if it dies, and exits
/// when the endpoint's published ports go (its socket closes). While it runs it keeps the
/// namespace alive, which is harmless here: rootless endpoints are collected by watching the
/// container's process, not the namespace.
pub struct HelperSockets {
    requests: std::sync::mpsc::Sender<HelperRequest>,
}

impl HelperSockets {
    pub fn start(pid: u32, id: NsId) -> io::Result<Arc<Self>> {
        let (tx, rx) = std::sync::mpsc::channel::<HelperRequest>();
        std::thread::Builder::new()
            .name("vswitch-nshelper".into())
            .spawn(move || {
                let mut helper: Option<(std::process::Child, std::os::unix::net::UnixStream)> =
                    None;
                while let Ok((family, reply)) = rx.recv() {
                    // A helper that died is reaped here and replaced.
                    if let Some((child, _)) = helper.as_mut()
                        && !matches!(child.try_wait(), Ok(None))
                    {
                        helper = None;
                    }
                    if helper.is_none() {
                        helper = match spawn_helper(pid, id) {
                            Ok(h) => Some(h),
                            Err(e) => {
                                let _ = reply.send(Err(e));
                                continue;
                            }
                        };
                    }
                    let made = match &helper {
                        Some((_, sock)) => ask_helper(sock, family),
                        None => Err(io::Error::other("no helper")),
                    };
                    if made.is_err()
                        && let Some((mut child, sock)) = helper.take()
                    {
                        drop(sock);
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                    let _ = reply.send(made);
                }
                if let Some((mut child, sock)) = helper.take() {
                    drop(sock); // the helper sees EOF and exits
                    let _ = child.wait();
                }
            })?;
        Ok(Arc::new(Self { requests: tx }))
    }

    async fn socket(&self, family: AddressFamily) -> io::Result<OwnedFd> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.requests
            .send((family, reply))
            .map_err(|_| io::Error::other("socket helper thread is gone"))?;
        answer
            .await
            .map_err(|_| io::Error::other("socket helper thread is gone"))?
    }
}

fn spawn_helper(
    pid: u32,
    id: NsId,
) -> io::Result<(std::process::Child, std::os::unix::net::UnixStream)> {
    // The process must still be in the endpoint's namespace (not a reused PID).
    if NetNs::open(std::path::Path::new(&format!("/proc/{pid}/ns/net")))?.id() != id {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the endpoint's namespace is gone",
        ));
    }
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ours.set_read_timeout(Some(Duration::from_secs(5)))?;
    let child = std::process::Command::new(std::env::current_exe()?)
        .arg("__socket-helper")
        .arg("--pid")
        .arg(pid.to_string())
        .arg("--netns-inode")
        .arg(id.ino.to_string())
        .stdin(std::process::Stdio::from(OwnedFd::from(theirs)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    Ok((child, ours))
}

fn ask_helper(sock: &std::os::unix::net::UnixStream, family: AddressFamily) -> io::Result<OwnedFd> {
    use std::io::Write;
    let byte = if family == AddressFamily::Inet6 {
        b"6"
    } else {
        b"4"
    };
    (&*sock).write_all(byte)?;
    vswitch_netdev::fdpass::recv_fd(sock.as_fd())
}

/// The helper's side (`vswitch __socket-helper --pid PID --netns-inode INO`), in a fresh
/// single-threaded process: joins the process's user and network namespaces (refusing if the
/// network namespace is no longer the endpoint's: the PID was reused), then answers each
/// request byte on stdin (`4` or `6`) with a new non-blocking TCP socket, until stdin closes.
pub fn socket_helper(pid: u32, netns_inode: u64) -> anyhow::Result<()> {
    use std::io::Read;
    crate::netns::plumb::enter_namespaces_of(pid, Some(netns_inode))?;
    let stdin = std::io::stdin();
    let mut conn = stdin.lock();
    let mut byte = [0u8; 1];
    loop {
        match conn.read(&mut byte) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        let family = if byte[0] == b'6' {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let made = tcp_socket(family);
        let fd = std::io::stdin();
        match made {
            Ok(s) => vswitch_netdev::fdpass::send_fd(fd.as_fd(), s.as_fd())?,
            // A reply without a descriptor: the daemon falls back to the gateway path.
            Err(_) => {
                nix::unistd::write(fd.as_fd(), b"E")?;
            }
        }
    }
}

/// Moves bytes both ways between `client` and the connection inside the container until both
/// directions have ended. A FIN becomes a half-close on the other side; a reset or error
/// resets both.
pub async fn splice_streams(client: TcpStream, inner: Inner) {
    let Inner {
        stream: server,
        pipes: [up_pipe, down_pipe],
    } = inner;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let up = pump(&client, &server, up_pipe);
    let down = pump(&server, &client, down_pipe);
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
async fn pump(from: &TcpStream, to: &TcpStream, pipe: (OwnedFd, OwnedFd)) -> io::Result<()> {
    let (pipe_out, pipe_in) = pipe;
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
