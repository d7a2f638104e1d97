//! TAP devices with virtio-net headers and offloads.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::sys;
use vswitch_switch::vnet::VNET_HDR_LEN;

/// Why a TAP could not be opened or configured.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "cannot open /dev/net/tun: {0} (the device must exist and be readable and writable; the usual mode is 0666)"
    )]
    OpenDevice(#[source] io::Error),
    #[error("cannot create TAP device {name}: {source}")]
    Create {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot configure TAP device {name} ({what}): {source}")]
    Configure {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// An open TAP device: the fd frames are read from and written to.
///
/// Every frame read starts with a [`VNET_HDR_LEN`]-byte virtio-net header, and every frame
/// written must too. Offloads are on: the kernel may hand over frames up to 64 KiB with a
/// partial checksum and GSO metadata, and it accepts the same back.
///
/// A non-persistent TAP disappears when its last fd is closed, wherever its network namespace
/// is: dropping the `Tap` removes the device.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Creates the TAP device `name` in the calling thread's network namespace, with a
    /// virtio-net header and checksum/TSO offloads. The fd is non-blocking. Fails if a device of
    /// that name exists already (`IFF_TUN_EXCL`): never attaches to somebody else's TAP.
    pub fn create(name: &str) -> Result<Self, TapError> {
        Self::create_with(name, true)
    }

    /// As [`Tap::create`]; without `offloads` the kernel hands over only complete checksums
    /// and frames no longer than the MTU (for frames that leave the host in a tunnel, which
    /// no receiving kernel would finish or segment).
    pub fn create_with(name: &str, offloads: bool) -> Result<Self, TapError> {
        let fd = sys::open_tun().map_err(TapError::OpenDevice)?;
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL)
            as libc::c_short;
        let name =
            sys::tun_set_iff(fd.as_fd(), name, flags).map_err(|source| TapError::Create {
                name: name.to_owned(),
                source,
            })?;
        let configure = |what, r: io::Result<()>| {
            r.map_err(|source| TapError::Configure {
                name: name.clone(),
                what,
                source,
            })
        };
        configure(
            "virtio-net header size",
            sys::tun_set_vnet_hdr_size(fd.as_fd(), VNET_HDR_LEN as libc::c_int),
        )?;
        configure(
            "offloads",
            sys::tun_set_offload(
                fd.as_fd(),
                if offloads {
                    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
                } else {
                    0
                },
            ),
        )?;
        Ok(Self { fd, name })
    }

    /// The name the device had when it was opened (it may have been renamed since).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the device survives the closing of its last fd.
    pub fn set_persist(&self, persist: bool) -> Result<(), TapError> {
        sys::tun_set_persist(self.fd.as_fd(), persist).map_err(|source| TapError::Configure {
            name: self.name.clone(),
            what: "persistence",
            source,
        })
    }

    /// Gives up the fd.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
