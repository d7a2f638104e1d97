//! `vswitch`: a userspace virtual switch for containers, with a Docker-shaped CLI.
//!
//! `vswitch daemon` runs the daemon; every other subcommand is a client of its control socket.
//! The daemon itself is the `vswitch-daemon` library; this binary holds the command line, the
//! client, the container client side (`run`, `exec`, ...), the demo and the container init.

mod client;
mod containers;
mod demo;
mod init;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use client::{Client, seg};
use vswitch_daemon::api::{
    AttachRequest, Created, DisconnectRequest, EndpointInfo, FdbRow, NetworkCreate, NetworkInspect,
    NetworkStats, Target,
};

#[derive(Parser)]
#[command(
    name = "vswitch",
    version,
    about = "Userspace virtual switch for containers"
)]
struct Cli {
    /// Control socket of the daemon [default: /run/vswitch/vswitch.sock as root,
    /// $XDG_RUNTIME_DIR/vswitch/vswitch.sock otherwise]
    #[arg(long, global = true, env = "VSWITCH_SOCKET")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground
    Daemon(DaemonArgs),
    /// Manage networks
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Attach a network namespace (PID, netns path or `ip netns` name) to a network
    Attach {
        /// Network to attach to
        #[arg(long, default_value = "bridge")]
        network: String,
        #[command(flatten)]
        opts: AttachOpts,
        /// PID, netns path (/proc/PID/ns/net, /run/netns/X) or `ip netns` name
        target: String,
    },
    /// Detach an endpoint from every network it is attached to
    Detach { name: String },
    /// Show a network's MAC table
    Fdb { network: String },
    /// Show per-port counters
    Stats { network: Option<String> },
    /// List an endpoint's published ports (CTR_PORT/PROTO -> HOST_IP:HOST_PORT)
    Port { name: String },
    /// Run a command in a new container (network, mount and UTS namespaces, host filesystem)
    Run(RunArgs),
    /// Run a command inside a running container's namespaces
    Exec {
        name: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// List containers
    Ps {
        /// Show all containers (default: running only)
        #[arg(short, long)]
        all: bool,
    },
    /// Stop containers (SIGTERM, then SIGKILL after the timeout)
    Stop {
        #[arg(required = true)]
        names: Vec<String>,
        /// Seconds to wait before SIGKILL
        #[arg(short, long, default_value_t = 10)]
        time: u64,
    },
    /// Start stopped containers again
    Start {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove containers
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
        /// Kill running containers first
        #[arg(short, long)]
        force: bool,
    },
    /// Print a container's output
    Logs { name: String },
    /// Docker's networking story with vswitch alone, as a transcript; cleans up after itself
    Demo {
        /// Use the daemon on --socket instead of starting a temporary one
        #[arg(long)]
        use_running: bool,
    },
    /// Rootless attach: opens a TAP inside a process's namespaces (started by the daemon)
    #[command(name = "__tap-helper", hide = true)]
    TapHelper {
        #[arg(long)]
        pid: u32,
        #[arg(long)]
        spec: String,
    },
    /// Makes sockets inside a container's namespaces for a rootless daemon
    #[command(name = "__socket-helper", hide = true)]
    SocketHelper {
        #[arg(long)]
        pid: u32,
        #[arg(long)]
        netns_inode: u64,
    },
    /// The first process of a container (started by the daemon)
    #[command(name = "__init", hide = true)]
    Init {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Run in the background and print the container id
    #[arg(short, long)]
    detach: bool,
    /// Container name (also its hostname and DNS name) [default: c-<short id>]
    #[arg(long)]
    name: Option<String>,
    /// bridge (default), a network name, host, none, or container:NAME
    #[arg(long, default_value = "bridge")]
    network: String,
    /// Static IPv4 address on the network
    #[arg(long)]
    ip: Option<String>,
    /// Extra DNS name on the network (repeatable)
    #[arg(long = "alias")]
    aliases: Vec<String>,
    /// Publish a port: [HOST_IP:]HOST_PORT[-END]:CTR_PORT[-END][/tcp|/udp] or CTR_PORT
    #[arg(short = 'p', long = "publish", value_name = "SPEC")]
    publish: Vec<String>,
    /// Hostname inside the container [default: the name]
    #[arg(long)]
    hostname: Option<String>,
    /// The command and its arguments, after --
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

#[derive(Args)]
struct DaemonArgs {
    /// State directory [default: /var/lib/vswitch as root, $XDG_DATA_HOME/vswitch otherwise]
    #[arg(long, env = "VSWITCH_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Log filter (error, warn, info, debug, trace, or a tracing filter directive)
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Upstream DNS server, IP[:PORT] (repeatable, up to 3) [default: the nameservers of the
    /// host's /etc/resolv.conf, re-read when it changes]
    #[arg(long, value_parser = vswitch_dns::upstream::parse_upstream)]
    dns_upstream: Vec<std::net::SocketAddr>,
    /// TTL in seconds of container records
    #[arg(long, default_value_t = vswitch_dns::responder::DEFAULT_TTL)]
    dns_ttl: u32,
    /// Also serve <name>.<network> for every network to the host on ADDR:PORT (UDP and TCP)
    #[arg(long, value_name = "ADDR:PORT")]
    dns_listen: Option<std::net::SocketAddr>,
    /// Let containers reach every service on the host's loopback through their gateway's
    /// address (by default only published ports are reachable there)
    #[arg(long)]
    allow_host_loopback: bool,
    /// Nice value of the datapath threads (-20..=19). Below 0 they get the CPU ahead of the
    /// containers' own threads, as kernel forwarding would; needs CAP_SYS_NICE (or
    /// RLIMIT_NICE), and without it they stay at the daemon's own value
    #[arg(long, default_value_t = -10, allow_hyphen_values = true,
          value_parser = clap::value_parser!(i32).range(-20..=19))]
    datapath_nice: i32,
    /// Microseconds a datapath thread keeps polling after traffic before it sleeps (0..=1000).
    /// Cuts request/response latency by about a third (to the kernel bridge's), at the cost of
    /// that much CPU after each burst; 0 turns it off. An idle network sleeps either way
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(0..=1000))]
    datapath_busy_poll: u64,
}

#[derive(Args)]
struct AttachOpts {
    /// Endpoint name [default: the `ip netns` name, else a short id]
    #[arg(long)]
    name: Option<String>,
    /// Static IPv4 address
    #[arg(long)]
    ip: Option<String>,
    /// Static IPv6 address
    #[arg(long)]
    ip6: Option<String>,
    /// Extra DNS name for the endpoint on this network (repeatable)
    #[arg(long = "alias")]
    aliases: Vec<String>,
    /// MAC address [default: 02:42 followed by the IPv4 address]
    #[arg(long)]
    mac: Option<String>,
    /// Interface name inside the namespace [default: eth0, or the next free ethN]
    #[arg(long)]
    ifname: Option<String>,
    /// Publish a port: [HOST_IP:]HOST_PORT[-END]:CTR_PORT[-END][/tcp|/udp], or CTR_PORT for a
    /// random host port (repeatable)
    #[arg(short = 'p', long = "publish", value_name = "SPEC")]
    publish: Vec<String>,
}

#[derive(Subcommand)]
enum NetworkCommand {
    /// Create a network
    Create {
        name: String,
        /// Subnet in CIDR form; give it twice for IPv4 and IPv6
        #[arg(long)]
        subnet: Vec<String>,
        /// Gateway address (one per address family)
        #[arg(long)]
        gateway: Vec<String>,
        /// Allocate endpoint addresses from this sub-range
        #[arg(long)]
        ip_range: Option<String>,
        /// No route to the outside
        #[arg(long)]
        internal: bool,
        /// MTU of the endpoints' interfaces
        #[arg(long)]
        mtu: Option<u32>,
        /// Enable IPv6 (a ULA /64 is chosen without an IPv6 --subnet)
        #[arg(long)]
        ipv6: bool,
    },
    /// List networks
    #[command(alias = "list")]
    Ls {
        /// Only print ids
        #[arg(short, long)]
        quiet: bool,
        /// Output format: table or json (one object per line)
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Show networks as JSON
    Inspect {
        #[arg(required = true)]
        networks: Vec<String>,
    },
    /// Remove networks
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        networks: Vec<String>,
    },
    /// Attach a namespace to a network (same as `attach --network NET`)
    Connect {
        network: String,
        target: String,
        #[command(flatten)]
        opts: AttachOpts,
    },
    /// Detach an endpoint from one network
    Disconnect { network: String, name: String },
}

fn main() -> ExitCode {
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
                ExitCode::FAILURE
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
        other => run_client(other, &socket),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
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

fn run_daemon(args: DaemonArgs, socket: PathBuf, is_root: bool) -> anyhow::Result<ExitCode> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .map_err(|e| anyhow::anyhow!("invalid --log-level {:?}: {e}", args.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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
        },
        dns_listen: args.dns_listen,
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

fn attach_request(target: &str, opts: AttachOpts) -> anyhow::Result<AttachRequest> {
    Ok(AttachRequest {
        target: Target::parse(target).map_err(anyhow::Error::msg)?,
        name: opts.name,
        ipv4_address: opts.ip,
        ipv6_address: opts.ip6,
        aliases: opts.aliases,
        mac_address: opts.mac,
        ifname: opts.ifname,
        ports: opts.publish,
    })
}

fn run_client(command: Command, socket: &std::path::Path) -> anyhow::Result<ExitCode> {
    let client = Client::new(socket)?;
    match command {
        Command::Daemon(_)
        | Command::Init { .. }
        | Command::Demo { .. }
        | Command::TapHelper { .. }
        | Command::SocketHelper { .. } => {
            unreachable!("handled by main")
        }
        Command::Run(args) => containers::run(&client, args),
        Command::Exec { name, cmd } => containers::exec(client, &name, &cmd),
        Command::Ps { all } => containers::ps(&client, all),
        Command::Stop { names, time } => containers::each(&names, |n| {
            client.post_empty_reply(&format!("/containers/{}/stop?t={time}", seg(n)), &())
        }),
        Command::Start { names } => containers::each(&names, |n| {
            client.post_empty_reply(&format!("/containers/{}/start", seg(n)), &())
        }),
        Command::Rm { names, force } => containers::each(&names, |n| {
            client.delete(&format!("/containers/{}?force={}", seg(n), u8::from(force)))
        }),
        Command::Logs { name } => containers::logs(&client, &name),
        Command::Attach {
            network,
            opts,
            target,
        } => attach(&client, &network, &target, opts),
        Command::Detach { name } => {
            client.delete(&format!("/endpoints/{}", seg(&name)))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Fdb { network } => {
            let rows: Vec<FdbRow> = client.get(&format!("/networks/{}/fdb", seg(&network)))?;
            let mut table = vec![vec![
                "MAC ADDRESS".to_owned(),
                "PORT".to_owned(),
                "ENDPOINT".to_owned(),
                "AGE".to_owned(),
            ]];
            for r in rows {
                table.push(vec![
                    r.mac_address,
                    r.port.to_string(),
                    r.endpoint,
                    format!("{:.1}s", r.age_seconds),
                ]);
            }
            print_table(&table);
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats { network } => {
            let path = match &network {
                Some(n) => format!("/stats?network={}", seg(n)),
                None => "/stats".to_owned(),
            };
            let nets: Vec<NetworkStats> = client.get(&path)?;
            let mut table = vec![
                [
                    "NETWORK",
                    "PORT",
                    "ENDPOINT",
                    "RX FRAMES",
                    "RX BYTES",
                    "RX DROPPED",
                    "TX FRAMES",
                    "TX BYTES",
                    "TX DROPPED",
                ]
                .map(String::from)
                .to_vec(),
            ];
            for n in nets {
                for p in n.ports {
                    table.push(vec![
                        n.network.clone(),
                        p.port.to_string(),
                        p.endpoint,
                        p.rx_frames.to_string(),
                        p.rx_bytes.to_string(),
                        p.rx_dropped.to_string(),
                        p.tx_frames.to_string(),
                        p.tx_bytes.to_string(),
                        p.tx_dropped.to_string(),
                    ]);
                }
            }
            print_table(&table);
            Ok(ExitCode::SUCCESS)
        }
        Command::Port { name } => {
            let eps: Vec<EndpointInfo> = client.get("/endpoints")?;
            let mine: Vec<&EndpointInfo> = eps.iter().filter(|e| e.name == name).collect();
            if mine.is_empty() {
                anyhow::bail!("endpoint {name} not found");
            }
            let mut lines: Vec<String> = mine
                .iter()
                .flat_map(|e| e.ports.iter().map(ToString::to_string))
                .collect();
            lines.sort();
            lines.dedup();
            for l in lines {
                println!("{l}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Network(cmd) => network(&client, cmd),
    }
}

fn attach(
    client: &Client,
    network: &str,
    target: &str,
    opts: AttachOpts,
) -> anyhow::Result<ExitCode> {
    let req = attach_request(target, opts)?;
    let ep: EndpointInfo = client.post(&format!("/networks/{}/connect", seg(network)), &req)?;
    println!("{}", ep.id);
    Ok(ExitCode::SUCCESS)
}

fn network(client: &Client, cmd: NetworkCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        NetworkCommand::Create {
            name,
            subnet,
            gateway,
            ip_range,
            internal,
            mtu,
            ipv6,
        } => {
            let req = NetworkCreate {
                name,
                subnets: subnet,
                gateways: gateway,
                ip_range,
                internal,
                mtu,
                enable_ipv6: ipv6,
            };
            let created: Created = client.post("/networks/create", &req)?;
            println!("{}", created.id);
            Ok(ExitCode::SUCCESS)
        }
        NetworkCommand::Ls { quiet, format } => {
            let nets: Vec<NetworkInspect> = client.get("/networks")?;
            match (quiet, format.as_str()) {
                (true, _) => nets.iter().for_each(|n| println!("{}", &n.id[..12])),
                (false, "json") => {
                    for n in &nets {
                        let line = serde_json::json!({
                            "ID": &n.id[..12], "Name": n.name, "Driver": n.driver,
                            "Scope": n.scope, "IPv6": n.enable_ipv6, "Internal": n.internal,
                            "CreatedAt": n.created,
                        });
                        println!("{line}");
                    }
                }
                (false, "table") => {
                    let mut table = vec![
                        ["NETWORK ID", "NAME", "DRIVER", "SCOPE"]
                            .map(String::from)
                            .to_vec(),
                    ];
                    for n in &nets {
                        table.push(vec![
                            n.id[..12].to_owned(),
                            n.name.clone(),
                            n.driver.clone(),
                            n.scope.clone(),
                        ]);
                    }
                    print_table(&table);
                }
                (false, other) => anyhow::bail!("unknown --format {other:?}: use table or json"),
            }
            Ok(ExitCode::SUCCESS)
        }
        NetworkCommand::Inspect { networks } => {
            let mut found = Vec::new();
            let mut failed = false;
            for n in &networks {
                match client.get::<NetworkInspect>(&format!("/networks/{}", seg(n))) {
                    Ok(net) => found.push(net),
                    Err(e) => {
                        eprintln!("Error: {e}");
                        failed = true;
                    }
                }
            }
            println!("{}", serde_json::to_string_pretty(&found)?);
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        NetworkCommand::Rm { networks } => containers::each(&networks, |n| {
            client.delete(&format!("/networks/{}", seg(n)))
        }),
        NetworkCommand::Connect {
            network,
            target,
            opts,
        } => attach(client, &network, &target, opts),
        NetworkCommand::Disconnect { network, name } => {
            client.post_empty_reply(
                &format!("/networks/{}/disconnect", seg(&network)),
                &DisconnectRequest { container: name },
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints rows as left-aligned columns separated by at least three spaces, like `docker`.
fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        println!("{line}");
    }
}
