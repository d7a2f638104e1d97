//! Network namespaces.
//!
//! `setns(CLONE_NEWNET)` changes the namespace of the calling *thread* only. Work that must
//! happen inside a container's namespace therefore runs on a fresh thread made for it
//! ([`run_in_netns`]), which enters the namespace, does the work and exits, so no thread of a
//! pool is ever left in a foreign namespace and nothing keeps the namespace alive afterwards.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sched::{CloneFlags, setns};

/// Identity of a namespace: device and inode of its nsfs file. Stable while the namespace lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
}

impl std::fmt::Display for NsId {
    /// `dev:ino`, as `lsns` and `/proc/PID/ns/net` links show the inode.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.dev, self.ino)
    }
}

/// An open handle to a network namespace. Holding it keeps the namespace alive, so hold it only
/// for the duration of an operation.
#[derive(Debug)]
pub struct NetNs {
    file: File,
    id: NsId,
}

impl NetNs {
    /// Opens the namespace file at `path` (`/proc/PID/ns/net`, `/run/netns/NAME`, ...).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        // Anything but a network namespace (a regular file, another namespace type) is refused
        // here rather than failing half-way through an operation.
        match crate::sys::ns_get_nstype(file.as_fd()) {
            Ok(t) if t == libc::CLONE_NEWNET => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a network namespace",
                ));
            }
        }
        let meta = file.metadata()?;
        let id = NsId {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        Ok(Self { file, id })
    }

    /// The network namespace of the calling thread.
    pub fn current() -> io::Result<Self> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    pub fn id(&self) -> NsId {
        self.id
    }

    /// Moves the calling thread into this namespace.
    pub fn enter(&self) -> io::Result<()> {
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Runs `f` on a new thread that has entered `ns`, and returns its result.
pub fn run_in_netns<T, F>(ns: &NetNs, f: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter()?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace worker thread panicked")))
    })
}
