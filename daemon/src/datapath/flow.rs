//! The host side of a TCP flow the gateway terminates: the daemon's own connected socket (to a
//! published port's client, or to an outbound destination), handed to the datapath thread that
//! owns the flow. From then on that thread moves the bytes itself: `read(2)` straight into the
//! flow's smoltcp send buffer and `write(2)` straight out of its receive buffer, with no queue,
//! copy or thread hand-off in between (see `datapath::tcp`).

use std::io;

/// A connected host socket for a flow, and what must live exactly as long as the flow.
pub struct HostStream {
    pub(super) stream: std::net::TcpStream,
    /// Dropped with the flow: for instance the gateway port a masqueraded client was shown on.
    pub(super) keep: Option<Box<dyn Send>>,
}

impl HostStream {
    /// Takes `stream` out of tokio's hands (non-blocking, no delay: the datapath writes what
    /// the container sent as it comes, and batching is the container's business).
    pub fn new(stream: tokio::net::TcpStream) -> io::Result<Self> {
        let _ = stream.set_nodelay(true);
        let stream = stream.into_std()?;
        stream.set_nonblocking(true)?;
        Ok(Self { stream, keep: None })
    }

    /// Ties `keep` to the flow's lifetime.
    pub fn keeping(mut self, keep: impl Send + 'static) -> Self {
        self.keep = Some(Box::new(keep));
        self
    }
}

impl std::fmt::Debug for HostStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostStream")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}
