//! The host side of NAT's TCP flows: a tokio socket spliced to a flow that the gateway
//! terminates in the datapath thread.
//!
//! Backpressure both ways, with no unbounded buffer:
//! - host -> container: the reader takes byte credits from [`FlowShared::credits`] before each
//!   read; the datapath returns them as bytes enter the smoltcp socket. Each queued chunk is
//!   also charged [`CHUNK_OVERHEAD`] (returned when the datapath has used it up), and a short
//!   chunk is shrunk to its length, so at most about [`FLOW_WINDOW`] bytes of memory per flow
//!   are ever queued between the two, however small the pieces a peer sends.
//! - container -> host: the datapath hands chunks through a bounded channel; when it is full it
//!   stops reading from the socket (the container's window closes) and sets `blocked`; the
//!   writer, after writing a chunk, wakes it up again.
//!
//! A FIN on either side becomes a half-close on the other; a reset or error becomes a reset.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vswitch_nat::FlowId;

#[cfg(test)]
use crate::datapath::{CHUNK, FLOW_WINDOW};
use crate::datapath::{CHUNK_OVERHEAD, FlowShared, Injector};

/// Copies bytes between a host TCP stream and a gateway flow until both directions are done.
pub async fn splice(
    mut stream: TcpStream,
    flow: FlowId,
    injector: Injector,
    mut to_host: tokio::sync::mpsc::Receiver<Vec<u8>>,
    shared: Arc<FlowShared>,
) {
    let _ = stream.set_nodelay(true);
    let reset = {
        let (mut rd, mut wr) = stream.split();
        let up = async {
            loop {
                // Credits first: never read more than the datapath can queue. Fewer, larger
                // chunks mean fewer hand-offs and wake-ups per byte (for a large flow, 64 KiB
                // chunks in a 512 KiB window carried a remote client's stream at 5.4-6.4
                // Gbit/s, 256 KiB in 1 MiB at 6.8-7.5).
                let chunk = shared.chunk.load(Ordering::Acquire);
                let Ok(permit) = shared
                    .credits
                    .acquire_many((chunk + CHUNK_OVERHEAD) as u32)
                    .await
                else {
                    return; // the flow is gone
                };
                permit.forget();
                // Read straight into the chunk that travels to the datapath: no zeroing, no copy.
                let mut buf = Vec::with_capacity(chunk);
                match rd.read_buf(&mut buf).await {
                    Ok(0) => {
                        shared.credits.add_permits(chunk + CHUNK_OVERHEAD);
                        injector.host_eof(flow);
                        return;
                    }
                    Ok(n) => {
                        // Kept: n bytes plus the overhead, returned by the datapath.
                        shared.credits.add_permits(chunk - n);
                        if n < chunk / 2 {
                            buf.shrink_to_fit();
                        }
                        if !injector.host_data(flow, buf) {
                            return;
                        }
                    }
                    Err(_) => {
                        injector.host_reset(flow);
                        return;
                    }
                }
            }
        };
        let down = async {
            while let Some(chunk) = to_host.recv().await {
                if wr.write_all(&chunk).await.is_err() {
                    injector.host_reset(flow);
                    shared.credits.close();
                    return false;
                }
                // Room made, then the flag: the datapath sets the flag, then looks at the room
                // again, so one of the two sees the other (no wake-up is lost).
                shared
                    .to_host_bytes
                    .fetch_sub(chunk.len(), Ordering::SeqCst);
                if shared.blocked.swap(false, Ordering::SeqCst) {
                    injector.resume(flow);
                }
            }
            if shared.reset.load(Ordering::Acquire) {
                shared.credits.close();
                return true;
            }
            let _ = wr.shutdown().await;
            false
        };
        tokio::pin!(up);
        tokio::pin!(down);
        // A reset from the container ends everything at once; a FIN from it leaves the host's
        // sending half running until the host closes too.
        tokio::select! {
            reset = &mut down => {
                if !reset {
                    (&mut up).await;
                }
                reset
            }
            () = &mut up => down.await,
        }
    };
    if reset {
        // The container reset the connection: reset the host side too.
        let _ = stream.set_zero_linger();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::datapath::FlowChannel;

    /// A peer that sends one byte at a time to a container that reads nothing: the chunks it
    /// makes are charged their overhead, so the reader stops after a bounded number of them
    /// instead of queueing a 256 KiB buffer (or even a small one) per byte without end.
    #[test]
    fn trickled_bytes_queue_a_bounded_number_of_small_chunks() {
        use std::io::Write;
        let (injector, captured) = Injector::capturing().expect("injector");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut peer =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        peer.set_nodelay(true).expect("nodelay");
        let (ours, _) = listener.accept().expect("accept");
        ours.set_nonblocking(true).expect("nonblocking");
        let (flow_channel, to_host, shared) = FlowChannel::new();
        shared.make_large();
        let credits = shared.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let splicer = std::thread::spawn(move || {
            rt.block_on(async move {
                let stream = TcpStream::from_std(ours).expect("tokio stream");
                tokio::time::timeout(
                    Duration::from_secs(20),
                    splice(stream, FlowId(1), injector, to_host, shared),
                )
                .await
            })
        });

        // One byte per chunk: each is written only once the one before has arrived. The reader
        // needs a whole chunk's credits before each read, so it stops after this many.
        let expected = (FLOW_WINDOW - (CHUNK + CHUNK_OVERHEAD)) / (1 + CHUNK_OVERHEAD) + 1;
        assert!(
            expected <= 4096,
            "thousands of small chunks at most, not a million"
        );
        let mut chunks = Vec::new();
        for i in 0..expected {
            peer.write_all(b"x").expect("write");
            let chunk = captured
                .next_data(Duration::from_secs(10))
                .unwrap_or_else(|| panic!("chunk {i} of {expected} never came"));
            assert_eq!(chunk.len(), 1);
            chunks.push(chunk);
        }
        peer.write_all(b"x").expect("write");
        assert!(
            captured.next_data(Duration::from_millis(500)).is_none(),
            "still reading after {expected} one-byte chunks"
        );
        let held: usize = chunks.iter().map(|c| c.capacity()).sum();
        assert!(
            held <= chunks.len() * 8,
            "short chunks shrunk: {held} bytes held"
        );

        // As the datapath uses chunks up, their credits come back and reading resumes.
        credits
            .credits
            .add_permits(CHUNK + CHUNK_OVERHEAD + chunks.len());
        assert_eq!(
            captured.next_data(Duration::from_secs(5)).map(|c| c.len()),
            Some(1),
            "the pending byte is read once credits return"
        );
        // Both sides closing ends the splice.
        drop(peer);
        drop(flow_channel);
        assert!(splicer.join().expect("splicer").is_ok(), "splice ended");
    }
}
