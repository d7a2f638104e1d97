//! `vswitch __init`: the first process of a container, started by the daemon.
//!
//! It runs before any runtime or thread exists, because entering mount and user namespaces
//! needs a single-threaded process. It makes the container's namespaces, waits for the daemon's
//! go-ahead (one byte on stdin, sent once the network is attached, so CMD's first packet already
//! has `eth0`), binds the container's resolv.conf and hosts over /etc, sets the hostname and
//! execs CMD. Output goes wherever the daemon pointed stdout and stderr (the log file).

use std::ffi::CString;
use std::io::Read;
use std::path::Path;

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, setns, unshare};
use vswitch_daemon::container_init::{InitConfig, InitNet};

/// Runs the init steps and execs CMD; returns only on failure, with the exit code to use
/// (127 when CMD does not exist, 126 when it cannot be run, like a shell).
pub fn run(config_path: &Path) -> i32 {
    match setup(config_path) {
        Ok(never) => match never {},
        Err((code, msg)) => {
            eprintln!("vswitch: {msg}");
            code
        }
    }
}

enum Never {}

fn setup(config_path: &Path) -> Result<Never, (i32, String)> {
    let fail = |what: &str, e: &dyn std::fmt::Display| (1, format!("{what}: {e}"));
    let text = std::fs::read(config_path).map_err(|e| fail("cannot read the init config", &e))?;
    let cfg: InitConfig = serde_json::from_slice(&text).map_err(|e| fail("bad init config", &e))?;
    // A session of its own: signals to the daemon's process group or terminal (`kill %1` on a
    // `vswitch daemon &`, Ctrl-C, a hangup) do not reach the container, which outlives the
    // daemon as documented.
    nix::unistd::setsid().map_err(|e| fail("cannot start a session", &e))?;
    let rootless = !nix::unistd::geteuid().is_root();
    if let InitNet::Join(path) = &cfg.net {
        // container:X: X's user namespace first when rootless (its network namespace belongs
        // to it), then its network namespace.
        if rootless {
            let user = path.with_file_name("user");
            let f = std::fs::File::open(&user)
                .map_err(|e| fail("cannot open the user namespace to join", &e))?;
            setns(&f, CloneFlags::CLONE_NEWUSER)
                .map_err(|e| fail("cannot join the user namespace", &e))?;
        }
        let f = std::fs::File::open(path)
            .map_err(|e| fail("cannot open the network namespace to join", &e))?;
        setns(&f, CloneFlags::CLONE_NEWNET)
            .map_err(|e| fail("cannot join the network namespace", &e))?;
    }
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS;
    if matches!(cfg.net, InitNet::New { .. }) {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    if rootless && !matches!(cfg.net, InitNet::Join(_)) {
        // A user namespace of our own, mapping us to root inside (one ID: without setuid
        // helpers that is all an unprivileged process may map), owning the others.
        let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
        unshare(flags | CloneFlags::CLONE_NEWUSER).map_err(|e| {
            fail(
                "cannot create the container's namespaces (are user namespaces enabled?)",
                &e,
            )
        })?;
        if !cfg.maps_by_parent {
            std::fs::write("/proc/self/setgroups", "deny")
                .map_err(|e| fail("cannot write setgroups", &e))?;
            std::fs::write("/proc/self/uid_map", format!("0 {uid} 1"))
                .map_err(|e| fail("cannot write uid_map", &e))?;
            std::fs::write("/proc/self/gid_map", format!("0 {gid} 1"))
                .map_err(|e| fail("cannot write gid_map", &e))?;
        }
    } else {
        unshare(flags).map_err(|e| fail("cannot create the container's namespaces", &e))?;
    }
    if let InitNet::New { lo_only: true } = cfg.net {
        bring_lo_up().map_err(|e| fail("cannot bring lo up", &e))?;
    }

    // Wait for the go-ahead: the daemon has attached the network (or decided not to).
    let mut byte = [0u8; 1];
    match std::io::stdin().read(&mut byte) {
        Ok(1) => {}
        _ => return Err((1, "the daemon did not start the container".into())),
    }
    let null = std::fs::File::open("/dev/null").map_err(|e| fail("cannot open /dev/null", &e))?;
    nix::unistd::dup2_stdin(&null).map_err(|e| fail("cannot redirect stdin", &e))?;

    // Our mounts must not propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| fail("cannot make / a slave mount", &e))?;
    for (src, dst) in [
        (&cfg.resolv_conf, "/etc/resolv.conf"),
        (&cfg.hosts, "/etc/hosts"),
    ] {
        if let Some(src) = src {
            mount(
                Some(src.as_path()),
                dst,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| fail(&format!("cannot bind {} over {dst}", src.display()), &e))?;
        }
    }
    if let Some(h) = &cfg.hostname {
        nix::unistd::sethostname(h).map_err(|e| fail("cannot set the hostname", &e))?;
    }

    let args: Vec<CString> = cfg
        .cmd
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|_| (1, "command contains a NUL byte".to_owned()))?;
    let Some(prog) = args.first() else {
        return Err((1, "no command given".into()));
    };
    let err = match nix::unistd::execvp(prog, &args) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let code = match err {
        nix::errno::Errno::ENOENT => 127,
        _ => 126,
    };
    Err((code, format!("{}: {}", cfg.cmd[0], err.desc())))
}

fn bring_lo_up() -> anyhow::Result<()> {
    use vswitch_daemon::netns::plumb::{set_up, with_rtnetlink};
    with_rtnetlink(|handle| async move { set_up(&handle, "lo").await })
}
