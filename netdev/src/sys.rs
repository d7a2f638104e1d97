//! Raw ioctls on TAP file descriptors. Every `unsafe` block of the workspace lives here.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Opens `/dev/net/tun` read-write, non-blocking and close-on-exec.
pub(crate) fn open_tun() -> io::Result<OwnedFd> {
    const PATH: &CStr = c"/dev/net/tun";
    // SAFETY: PATH is a valid NUL-terminated string; open has no other preconditions.
    let fd = unsafe {
        libc::open(
            PATH.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by open, is valid and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `TUNSETIFF`: attaches the fd to the TAP device `name` (created if absent) with `flags`.
/// Returns the name the kernel settled on.
pub(crate) fn tun_set_iff(
    fd: BorrowedFd<'_>,
    name: &str,
    flags: libc::c_short,
) -> io::Result<String> {
    // SAFETY: ifreq is plain old data; all-zero bytes are a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long or contains NUL",
        ));
    }
    for (dst, src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = flags;
    // SAFETY: fd is a valid /dev/net/tun fd; TUNSETIFF reads and writes one struct ifreq, and
    // ifr lives for the whole call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let name: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&name).into_owned())
}

/// `TUNSETVNETHDRSZ`: the size of the virtio-net header in front of every frame.
pub(crate) fn tun_set_vnet_hdr_size(fd: BorrowedFd<'_>, size: libc::c_int) -> io::Result<()> {
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `TUNSETOFFLOAD`: which offloads (TUN_F_*) this side can take from the kernel.
pub(crate) fn tun_set_offload(fd: BorrowedFd<'_>, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is shared.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `TUNSETPERSIST`: whether the device outlives its last fd.
pub(crate) fn tun_set_persist(fd: BorrowedFd<'_>, persist: bool) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST takes its argument by value; no memory is shared.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETPERSIST,
            libc::c_ulong::from(persist),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `NS_GET_NSTYPE`: the `CLONE_NEW*` type of a namespace fd, or an error if it is none.
pub(crate) fn ns_get_nstype(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: NS_GET_NSTYPE takes no argument and only returns an int; on a file that is not a
    // namespace the kernel answers ENOTTY.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::NS_GET_NSTYPE) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// Takes ownership of a descriptor the kernel just installed in this process through
/// `SCM_RIGHTS`.
pub(crate) fn own_received_fd(raw: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: `raw` comes from an SCM_RIGHTS control message of a recvmsg call made by this
    // process: the kernel created the descriptor for us and nothing else refers to it, so we
    // are its only owner.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// `setpriority(PRIO_PROCESS, gettid(), nice)`: on Linux this sets the nice value of the
/// calling thread only.
pub(crate) fn set_thread_nice(nice: libc::c_int) -> io::Result<()> {
    let tid = nix::unistd::gettid().as_raw();
    let who = libc::id_t::try_from(tid).map_err(|_| io::Error::other("negative thread id"))?;
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, who, nice) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Registers `fd` with the current tokio reactor (the calling task's runtime).
pub(crate) fn register_async(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd takes `fd` by value. An OwnedFd is open, owned by nobody else, returns
    // the same descriptor from every as_raw_fd call and is closed only when dropped, which
    // happens after the AsyncFd has deregistered it: exactly what `register` asks for.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(io::Error::from)
}

/// `mallopt(M_MMAP_THRESHOLD, bytes)` (glibc): allocations of at least `bytes` are served by
/// their own anonymous mappings, zero pages until touched and unmapped when freed. Setting it
/// also stops glibc from raising the threshold as large blocks are freed.
#[cfg(target_env = "gnu")]
pub(crate) fn set_mmap_threshold(bytes: libc::c_int) -> io::Result<()> {
    // SAFETY: mallopt takes two integers and only adjusts the allocator's tunables; it is
    // thread-safe (it takes the arena locks) and touches no memory of ours.
    let rc = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) };
    if rc != 1 {
        return Err(io::Error::other("mallopt(M_MMAP_THRESHOLD) refused"));
    }
    // Fixing the mmap threshold also fixes the trim threshold at its 128 KiB default: the
    // heap would be shrunk and grown again around every large free. Trimming is left to
    // `trim_heap`, called at leisure.
    // SAFETY: as above.
    let rc = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20) };
    if rc != 1 {
        return Err(io::Error::other("mallopt(M_TRIM_THRESHOLD) refused"));
    }
    Ok(())
}

#[cfg(not(target_env = "gnu"))]
pub(crate) fn set_mmap_threshold(_bytes: libc::c_int) -> io::Result<()> {
    Err(io::Error::other(
        "not glibc: the allocator's thresholds are its own",
    ))
}

/// `malloc_trim(0)` (glibc): gives the free memory of every arena back to the kernel, when
/// there is more than `min_free` bytes of it (a trim takes the arenas' locks, which the
/// datapath threads' allocations wait on). Returns whether it trimmed.
#[cfg(target_env = "gnu")]
pub(crate) fn trim_heap(min_free: usize) -> bool {
    // SAFETY: mallinfo2 takes no arguments and returns a plain struct of counters, read under
    // the arenas' locks.
    let info = unsafe { libc::mallinfo2() };
    if info.fordblks < min_free {
        return false;
    }
    // SAFETY: malloc_trim takes an integer and works on the allocator's own free lists under
    // its arena locks; it touches no memory of ours.
    unsafe { libc::malloc_trim(0) };
    true
}

#[cfg(not(target_env = "gnu"))]
pub(crate) fn trim_heap(_min_free: usize) -> bool {
    false
}
