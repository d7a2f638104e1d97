//! Devices and namespaces: everything in vswitch that talks to the kernel below the socket API.
//!
//! - [`tap`]: TAP devices opened with `IFF_VNET_HDR` and offloads, so the kernel hands over (and
//!   accepts) 64 KiB GSO frames with a virtio-net header in front.
//! - [`ns`]: entering network namespaces from a dedicated thread.
//! - [`set_thread_nice`]: the scheduling weight of the datapath threads.
//! - [`return_large_blocks_to_the_kernel`]: how the allocator serves large buffers.
//! - [`AsyncOwnedFd`]: an owned fd (a pidfd, an inotify instance) made awaitable on tokio.
//!
//! This is the only crate of the workspace allowed `unsafe` code, and only in `sys`, where every
//! block states why it is sound.

pub mod fdpass;
pub mod ns;
mod sys;
pub mod tap;

pub use tap::{Tap, TapError};

/// Gives the allocator's free memory back to the kernel, if there is more than 8 MiB of it:
/// what ended flows' chunks left on the heap (each thread's arena keeps what it freed,
/// interleaved with what it still holds). Takes milliseconds on a large heap; call it from a
/// thread that may wait. Returns whether it trimmed (never, but on glibc).
pub fn release_free_memory() -> bool {
    sys::trim_heap(8 << 20)
}

/// Allocations of this size and more get mappings of their own once
/// [`return_large_blocks_to_the_kernel`] is called.
pub const MMAP_THRESHOLD: usize = 260 * 1024;

/// Allocations of [`MMAP_THRESHOLD`] and more (a large TCP flow's socket buffers) get
/// mappings of their own: a zeroed buffer costs no memory until written, and freeing it gives
/// the memory back to the kernel. glibc's default raises its threshold each time such a block
/// is freed, after which large buffers come from the heap: zeroed by hand (all resident at
/// once) and kept by the process after they are freed. Blocks that come and go by the
/// thousand per second must stay below it, on the heap: a mapping each would cost a page
/// fault per 4 KiB moved. Call it once, early.
pub fn return_large_blocks_to_the_kernel() -> std::io::Result<()> {
    sys::set_mmap_threshold(MMAP_THRESHOLD as libc::c_int)
}

/// Sets the nice value of the calling thread (not the whole process). Lowering it below 0
/// needs `CAP_SYS_NICE` or a matching `RLIMIT_NICE`.
pub fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    sys::set_thread_nice(nice)
}

/// An owned fd registered with the tokio runtime, whose readiness can be awaited. Only shared
/// access is given out, so the descriptor cannot be swapped or closed under its registration.
#[derive(Debug)]
pub struct AsyncOwnedFd(tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>);

impl AsyncOwnedFd {
    /// Registers `fd` with the current runtime (panics outside one, like every tokio I/O
    /// constructor).
    pub fn new(fd: std::os::fd::OwnedFd) -> std::io::Result<Self> {
        sys::register_async(fd).map(Self)
    }

    /// Waits until the fd is readable; clear the guard's readiness after draining it.
    pub async fn readable(
        &self,
    ) -> std::io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, std::os::fd::OwnedFd>> {
        self.0.readable().await
    }
}

impl std::os::fd::AsFd for AsyncOwnedFd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.get_ref().as_fd()
    }
}
