//! `vswitch`: a userspace virtual switch for containers, with a Docker-shaped CLI.
//!
//! `vswitch daemon` runs the daemon; every other subcommand is a client of its control socket.
//! The daemon itself is the `vswitch-daemon` library; this binary holds the command line, the
//! client, the container client side (`run`, `exec`, ...), the demo and the container init.

mod args;
mod client;
mod cni;
mod commands;
mod containers;
mod demo;
mod init;
mod inspect;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command, DaemonArgs};

fn main() -> ExitCode {
    // A container runtime runs CNI plugins with CNI_COMMAND set and no arguments.
    if std::env::var_os("CNI_COMMAND").is_some() && std::env::args_os().len() == 1 {
        let is_root = nix::unistd::geteuid().is_root();
        let socket =
            default_socket(is_root).unwrap_or_else(|_| PathBuf::from("/run/vswitch/vswitch.sock"));
        return cni::main(&socket);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    if let Command::TapHelper { pid, spec } = &cli.command {
        // Single-threaded on purpose: it enters a user namespace.
        return match vswitch_daemon::netns::plumb::tap_helper(*pid, spec) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("Error: {e:#}");
                // The kind of failure (a taken name, a namespace not ours) goes back in the
                // status.
                ExitCode::from(vswitch_daemon::netns::plumb::helper_exit_code(&e))
            }
        };
    }
    if let Command::SocketHelper { pid, netns_inode } = &cli.command {
        // Single-threaded on purpose: it enters a user namespace.
        return match vswitch_daemon::host::direct::socket_helper(*pid, *netns_inode) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("Error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Init { config } = &cli.command {
        // Before anything else: entering namespaces needs a single-threaded process.
        let code = init::run(config);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    match &cli.command {
        Command::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "vswitch", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man { dir } => {
            return match write_man_pages(dir) {
                Ok(n) => {
                    println!("wrote {n} man pages to {}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("Error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    let is_root = nix::unistd::geteuid().is_root();
    let socket = match cli.socket.clone() {
        Some(s) => s,
        // The demo makes its own socket unless told to use a running daemon.
        None if matches!(cli.command, Command::Demo { use_running: false }) => PathBuf::new(),
        None => match default_socket(is_root) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("Error: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let result = match cli.command {
        Command::Daemon(args) => run_daemon(args, socket, is_root),
        Command::Demo { use_running } => demo::run(demo::DemoOptions {
            use_running: use_running.then(|| socket.clone()),
        }),
        other => commands::run_client(other, &socket),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `vswitch man DIR`: `vswitch.1`, and `vswitch-SUB.1` (`vswitch-network-ls.1`, ...) for every
/// subcommand but the hidden ones. Returns how many pages it wrote.
fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<usize> {
    use anyhow::Context;
    fn walk(cmd: &clap::Command, name: &str, dir: &std::path::Path) -> anyhow::Result<usize> {
        let cmd = cmd.clone().name(name.to_owned());
        let path = dir.join(format!("{name}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
        // Never through a symbolic link someone left in the directory.
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&path)
            .and_then(|mut f| f.write_all(&page))
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mut n = 1;
        for sub in cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            n += walk(sub, &format!("{name}-{}", sub.get_name()), dir)?;
        }
        Ok(n)
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = <Cli as clap::CommandFactory>::command();
    cmd.build();
    walk(&cmd, "vswitch", dir)
}

fn default_socket(is_root: bool) -> Result<PathBuf, String> {
    if is_root {
        return Ok(PathBuf::from("/run/vswitch/vswitch.sock"));
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => Ok(PathBuf::from(dir).join("vswitch/vswitch.sock")),
        _ => Err(
            "XDG_RUNTIME_DIR is not set, so there is no default socket for an unprivileged user: \
             log in through a session that sets it (systemd-logind does), export it, or pass --socket"
                .to_owned(),
        ),
    }
}

fn default_state_dir(is_root: bool) -> PathBuf {
    if is_root {
        return PathBuf::from("/var/lib/vswitch");
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("vswitch");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/share/vswitch")
}

/// `--cluster-store` and its companions, checked.
fn cluster_config(
    args: &DaemonArgs,
) -> anyhow::Result<Option<vswitch_daemon::cluster::ClusterConfig>> {
    use vswitch_daemon::cluster::{ClusterConfig, records::valid_node};
    let Some(store) = &args.cluster_store else {
        return Ok(None);
    };
    let endpoints = ClusterConfig::parse_store(store).map_err(anyhow::Error::msg)?;
    let Some(advertise) = args.advertise_addr else {
        anyhow::bail!(
            "--cluster-store needs --advertise-addr (this host's address on the underlay)"
        );
    };
    let node = match &args.node_name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default(),
    };
    if !valid_node(&node) {
        anyhow::bail!("invalid --node-name {node:?}: letters, digits, '-', '_' and '.'");
    }
    Ok(Some(ClusterConfig {
        endpoints,
        node,
        advertise,
        ttl: args.cluster_ttl,
    }))
}

fn run_daemon(args: DaemonArgs, socket: PathBuf, is_root: bool) -> anyhow::Result<ExitCode> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .map_err(|e| anyhow::anyhow!("invalid --log-level {:?}: {e}", args.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cluster = cluster_config(&args)?;
    let state_dir = args.state_dir.unwrap_or_else(|| default_state_dir(is_root));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("vswitch-ctl")
        .build()?;
    if args.dns_upstream.len() > vswitch_dns::upstream::MAX_UPSTREAMS {
        anyhow::bail!(
            "at most {} --dns-upstream servers",
            vswitch_dns::upstream::MAX_UPSTREAMS
        );
    }
    let opts = vswitch_daemon::Options {
        socket,
        state_dir,
        dns: vswitch_daemon::RuntimeOptions {
            upstreams: args.dns_upstream,
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            ttl: args.dns_ttl,
            max_forwards: 1024,
            host_loopback: args.allow_host_loopback,
            datapath_nice: args.datapath_nice,
            datapath_busy_poll: std::time::Duration::from_micros(args.datapath_busy_poll),
            vxlan: vswitch_daemon::host::vxlan::VxlanConfig {
                port: args.vxlan_port,
                advertise: args.advertise_addr,
            },
            cluster,
        },
        dns_listen: args.dns_listen,
        metrics_addr: args.metrics_addr,
        docker_plugin: match args.docker_plugin {
            Some(name) => {
                if !vswitch_daemon::valid_plugin_name(&name) {
                    anyhow::bail!("invalid --docker-plugin name {name:?}");
                }
                Some(vswitch_daemon::docker::PluginOptions {
                    name,
                    dir: args.docker_plugin_dir,
                    engine: args.docker_host,
                })
            }
            None => None,
        },
    };
    rt.block_on(vswitch_daemon::serve(opts))?;
    Ok(ExitCode::SUCCESS)
}

/// A bad command line gets one line on stderr (clap's first, which names the argument and the
/// problem) and exit status 2; `--help` and `--version` print as usual.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        _ => {
            let rendered = e.render().to_string();
            let line = rendered
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("bad command line");
            let line = line.strip_prefix("error: ").unwrap_or(line);
            eprintln!("Error: {line} (see --help)");
            ExitCode::from(2)
        }
    }
}
