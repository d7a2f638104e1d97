//! The design's limit, as a column of `benches/e2e.sh`: a bare TAP-to-TAP forwarder. It makes
//! a TAP named `eth0` in each of two network namespaces (virtio-net header and offloads, as
//! vswitch's ports have), then moves every frame read from one, header and all, to the other.
//! Nothing else: no learning, no parsing, no gateway. It runs with the datapath's thread
//! priority and busy-poll window, so that what vswitch costs beyond it is the switch's own
//! work.
//!
//!   tapfwd NETNS_A NETNS_B [--nice N] [--busy-poll-us U]
//!
//! It prints `ready` once both TAPs exist (the caller then gives them addresses and brings
//! them up), and runs until killed.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use vswitch_netdev::Tap;
use vswitch_netdev::ns::{NetNs, run_in_netns};

/// Frames read from one TAP before looking at the other, as the datapath does.
const BATCH: usize = 64;

fn tap_in(netns: &str) -> Result<OwnedFd, Box<dyn std::error::Error>> {
    let path = Path::new("/run/netns").join(netns);
    let ns = NetNs::open(&path)?;
    let tap = run_in_netns(&ns, || Tap::create_with("eth0", true))??;
    let fd = tap.into_fd();
    let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
    fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(fd)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut nice, mut busy_us) = (-10, 50u64);
    let mut names = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--nice" => nice = it.next().ok_or("--nice N")?.parse()?,
            "--busy-poll-us" => busy_us = it.next().ok_or("--busy-poll-us U")?.parse()?,
            other => names.push(other.to_owned()),
        }
    }
    let [a, b] = names.as_slice() else {
        return Err("usage: tapfwd NETNS_A NETNS_B [--nice N] [--busy-poll-us U]".into());
    };
    let fds = [tap_in(a)?, tap_in(b)?];
    println!("ready");
    std::io::stdout().flush()?;
    if let Err(e) = vswitch_netdev::set_thread_nice(nice) {
        eprintln!("tapfwd: keeping the default priority: {e}");
    }
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    for (i, fd) in fds.iter().enumerate() {
        epoll.add(fd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
    }
    let window = Duration::from_micros(busy_us);
    let mut last_traffic: Option<Instant> = None;
    let mut events = vec![EpollEvent::empty(); 8];
    let mut buf = vec![0u8; 65_536 + 64];
    loop {
        let spinning = last_traffic.is_some_and(|t| t.elapsed() < window);
        let timeout = if spinning {
            EpollTimeout::ZERO
        } else {
            EpollTimeout::NONE
        };
        let n = match epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        for ev in &events[..n] {
            let from = usize::from(ev.data() == 1);
            let (src, dst) = (&fds[from], &fds[1 - from]);
            for _ in 0..BATCH {
                match nix::unistd::read(src, &mut buf) {
                    Ok(0) | Err(Errno::EAGAIN) => break,
                    Ok(len) => {
                        let _ = nix::unistd::write(dst, &buf[..len]);
                    }
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if n > 0 {
            last_traffic = Some(Instant::now());
        } else if spinning {
            std::thread::yield_now();
        }
    }
}
