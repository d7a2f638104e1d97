//! Passing file descriptors between processes over a Unix socket (`SCM_RIGHTS`).
//!
//! Rootless attach needs it: a helper process opens the TAP inside the target's user and
//! network namespaces (which a multithreaded daemon cannot enter) and hands the fd back.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// Sends `fd` with a one-byte message over the connected Unix socket `sock`.
pub fn send_fd(sock: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> io::Result<()> {
    let fds = [fd.as_raw_fd()];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(b"F")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

/// Receives one fd sent with [`send_fd`]. Extra descriptors, if a peer sent any, are closed.
pub fn recv_fd(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut received: Vec<OwnedFd> = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            received.extend(fds.into_iter().map(crate::sys::own_received_fd));
        }
    }
    let mut it = received.into_iter();
    it.next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no file descriptor received"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn an_fd_crosses_a_socket_pair() {
        let (a, b) = UnixStream::pair().expect("pair");
        let (mut r, w) = UnixStream::pair().expect("pair");
        send_fd(a.as_fd(), w.as_fd()).expect("send");
        drop(w);
        let got = recv_fd(b.as_fd()).expect("recv");
        let mut w2 = UnixStream::from(got);
        w2.write_all(b"through").expect("write");
        drop(w2);
        let mut s = String::new();
        r.read_to_string(&mut s).expect("read");
        assert_eq!(s, "through");
    }
}
