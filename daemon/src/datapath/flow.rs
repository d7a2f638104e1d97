//! A TCP flow's two halves: the datapath's (the gateway's socket for the flow) and the host
//! side's (the splice to the daemon's own socket), with the credits, chunk sizes and queue
//! bounds they share.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Semaphore;

/// Bytes of one TCP flow in flight from the host side to the datapath at most, for a flow
/// with large socket buffers (see `vswitch_nat::tcp::MAX_LARGE_FLOWS`), and what the host side
/// reads at once for it.
pub const FLOW_WINDOW: usize = 1024 * 1024;
pub const CHUNK: usize = 256 * 1024;
/// The same for the other flows: every flow starts small and is made large once the gateway
/// has given it large buffers.
pub const SMALL_CHUNK: usize = 16 * 1024;
pub const SMALL_FLOW_WINDOW: usize = 2 * (SMALL_CHUNK + CHUNK_OVERHEAD);
/// Bytes of one flow queued from the datapath for the host side at most (large, small).
pub const TO_HOST_MAX: usize = 512 * 1024;
pub const SMALL_TO_HOST_MAX: usize = 32 * 1024;
/// What a queued chunk costs beyond its bytes (allocation, queue slot, command), charged
/// against the window: a peer trickling 1-byte segments can queue 4096 chunks, not a million.
pub const CHUNK_OVERHEAD: usize = 256;
/// Chunks of one flow queued from the datapath to the host side.
const CHANNEL_CHUNKS: usize = 8;

/// State shared by the two halves of a TCP flow's splice.
#[derive(Debug)]
pub struct FlowShared {
    /// Bytes the host side may still hand over ([`SMALL_FLOW_WINDOW`] at first); the
    /// datapath returns them as they enter the container's socket.
    pub credits: Semaphore,
    /// What the host side reads at once ([`SMALL_CHUNK`] at first).
    pub chunk: AtomicUsize,
    /// Bytes queued for the host side and not yet written, and how many may be.
    pub to_host_bytes: AtomicUsize,
    pub to_host_max: AtomicUsize,
    /// The datapath stopped reading from the container because the host side's queue was full.
    pub blocked: AtomicBool,
    /// The container reset the connection.
    pub reset: AtomicBool,
}

impl FlowShared {
    /// The flow got large socket buffers: its splice may move bigger chunks and keep more in
    /// flight.
    pub fn make_large(&self) {
        if self.chunk.swap(CHUNK, Ordering::AcqRel) != CHUNK {
            self.to_host_max.store(TO_HOST_MAX, Ordering::SeqCst);
            self.credits.add_permits(FLOW_WINDOW - SMALL_FLOW_WINDOW);
        }
    }

    /// Whether the host side's queue has no room for `len` more bytes (it always has room
    /// for one chunk).
    pub fn to_host_full(&self, len: usize) -> bool {
        let queued = self.to_host_bytes.load(Ordering::SeqCst);
        queued > 0 && queued + len > self.to_host_max.load(Ordering::SeqCst)
    }
}

/// What the datapath keeps of a flow's host side.
#[derive(Debug)]
pub struct FlowChannel {
    pub to_host: tokio::sync::mpsc::Sender<Vec<u8>>,
    pub shared: Arc<FlowShared>,
}

impl FlowChannel {
    /// A new flow's channel, the host side's receiver of chunks, and the shared state.
    pub fn new() -> (Self, tokio::sync::mpsc::Receiver<Vec<u8>>, Arc<FlowShared>) {
        let (tx, rx) = tokio::sync::mpsc::channel(CHANNEL_CHUNKS);
        let shared = Arc::new(FlowShared {
            credits: Semaphore::new(SMALL_FLOW_WINDOW),
            chunk: AtomicUsize::new(SMALL_CHUNK),
            to_host_bytes: AtomicUsize::new(0),
            to_host_max: AtomicUsize::new(SMALL_TO_HOST_MAX),
            blocked: AtomicBool::new(false),
            reset: AtomicBool::new(false),
        });
        (
            Self {
                to_host: tx,
                shared: shared.clone(),
            },
            rx,
            shared,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flows' socket buffers are mapped on their own (their memory comes and goes with the
    /// flow); the splice's chunks, allocated by the thousand per second, are not.
    #[test]
    fn socket_buffers_are_mapped_and_chunks_are_not() {
        const {
            assert!(vswitch_nat::tcp::LARGE_BUF >= vswitch_netdev::MMAP_THRESHOLD);
            assert!(CHUNK < vswitch_netdev::MMAP_THRESHOLD);
        }
    }
}
