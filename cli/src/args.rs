//! The command line: every subcommand and flag (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vswitch",
    version,
    about = "Userspace virtual switch for containers"
)]
pub(crate) struct Cli {
    /// Control socket of the daemon [default: /run/vswitch/vswitch.sock as root,
    /// $XDG_RUNTIME_DIR/vswitch/vswitch.sock otherwise]
    #[arg(long, global = true, env = "VSWITCH_SOCKET")]
    pub(crate) socket: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run the daemon in the foreground
    Daemon(DaemonArgs),
    /// Manage networks
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Use vswitch as a CNI plugin (podman, containerd, CRI-O)
    #[command(subcommand)]
    Cni(CniCommand),
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
        /// Only print ids
        #[arg(short, long)]
        quiet: bool,
        /// Output format: table or json (one object per line)
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Show containers or endpoints as JSON, shaped like `docker inspect`
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Show the client's and the daemon's versions
    Version,
    /// Show what the daemon is and holds: version, state directory, socket, upstream DNS
    /// servers, counts, rootless or not, features
    Info,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completion { shell: clap_complete::Shell },
    /// Write man pages (vswitch.1 and one per subcommand) into DIR
    Man { dir: PathBuf },
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
pub(crate) struct RunArgs {
    /// Run in the background and print the container id
    #[arg(short, long)]
    pub(crate) detach: bool,
    /// Container name (also its hostname and DNS name) [default: c-<short id>]
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// bridge (default), a network name, host, none, or container:NAME
    #[arg(long, default_value = "bridge")]
    pub(crate) network: String,
    /// Static IPv4 address on the network
    #[arg(long)]
    pub(crate) ip: Option<String>,
    /// Extra DNS name on the network (repeatable)
    #[arg(long = "alias")]
    pub(crate) aliases: Vec<String>,
    /// Publish a port: [HOST_IP:]HOST_PORT[-END]:CTR_PORT[-END][/tcp|/udp] or CTR_PORT
    #[arg(short = 'p', long = "publish", value_name = "SPEC")]
    pub(crate) publish: Vec<String>,
    /// Hostname inside the container [default: the name]
    #[arg(long)]
    pub(crate) hostname: Option<String>,
    /// The command and its arguments, after --
    #[arg(last = true, required = true)]
    pub(crate) cmd: Vec<String>,
}

#[derive(Args)]
pub(crate) struct DaemonArgs {
    /// State directory [default: /var/lib/vswitch as root, $XDG_DATA_HOME/vswitch otherwise]
    #[arg(long, env = "VSWITCH_STATE_DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// Log filter (error, warn, info, debug, trace, or a tracing filter directive)
    #[arg(long, default_value = "info")]
    pub(crate) log_level: String,
    /// Upstream DNS server, IP[:PORT] (repeatable, up to 3) [default: the nameservers of the
    /// host's /etc/resolv.conf, re-read when it changes]
    #[arg(long, value_parser = vswitch_dns::upstream::parse_upstream)]
    pub(crate) dns_upstream: Vec<std::net::SocketAddr>,
    /// TTL in seconds of container records
    #[arg(long, default_value_t = vswitch_dns::responder::DEFAULT_TTL)]
    pub(crate) dns_ttl: u32,
    /// Serve dockerd as its network and IPAM driver NAME (docker network create -d NAME) on
    /// DIR/NAME.sock
    #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "vswitch")]
    pub(crate) docker_plugin: Option<String>,
    /// Where dockerd looks for plugin sockets
    #[arg(long, value_name = "DIR", default_value = "/run/docker/plugins")]
    pub(crate) docker_plugin_dir: PathBuf,
    /// dockerd's API socket, asked for the names of Docker's networks and containers
    #[arg(
        long,
        value_name = "unix:///PATH",
        env = "DOCKER_HOST",
        default_value = "unix:///var/run/docker.sock"
    )]
    pub(crate) docker_host: String,
    /// Also serve <name>.<network> for every network to the host on ADDR:PORT (UDP and TCP)
    #[arg(long, value_name = "ADDR:PORT")]
    pub(crate) dns_listen: Option<std::net::SocketAddr>,
    /// Also serve GET /metrics (Prometheus) over TCP on IP:PORT [default: off; always on the
    /// control socket]
    #[arg(long, value_name = "IP:PORT")]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    /// UDP port of VXLAN for overlay networks (this host's and every other VTEP's)
    #[arg(long, default_value_t = 4789, value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) vxlan_port: u16,
    /// This host's address on the underlay: overlay networks' VXLAN leaves from it, and their
    /// MTU is its link's minus 50 [default: any address; the default route's link]
    #[arg(long, value_name = "IP")]
    pub(crate) advertise_addr: Option<std::net::IpAddr>,
    /// Join the cluster whose overlay networks live in etcd v3 at these client addresses
    /// (needs --advertise-addr)
    #[arg(long, value_name = "etcd://HOST:PORT[,HOST:PORT]")]
    pub(crate) cluster_store: Option<String>,
    /// This host's name in the cluster [default: the host name]
    #[arg(long, value_name = "NAME")]
    pub(crate) node_name: Option<String>,
    /// Seconds after which a host that stopped renewing its lease leaves the cluster
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i64).range(2..=3600))]
    pub(crate) cluster_ttl: i64,
    /// Let containers reach every service on the host's loopback through their gateway's
    /// address (by default only published ports are reachable there)
    #[arg(long)]
    pub(crate) allow_host_loopback: bool,
    /// Nice value of the datapath threads (-20..=19). Below 0 they get the CPU ahead of the
    /// containers' own threads, as kernel forwarding would; needs CAP_SYS_NICE (or
    /// RLIMIT_NICE), and without it they stay at the daemon's own value
    #[arg(long, default_value_t = -10, allow_hyphen_values = true,
          value_parser = clap::value_parser!(i32).range(-20..=19))]
    pub(crate) datapath_nice: i32,
    /// Microseconds a datapath thread keeps polling after traffic before it sleeps (0..=1000).
    /// Cuts request/response latency by about a third (to the kernel bridge's), at the cost of
    /// that much CPU after each burst; 0 turns it off. An idle network sleeps either way
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub(crate) datapath_busy_poll: u64,
}

#[derive(Args)]
pub(crate) struct AttachOpts {
    /// Endpoint name [default: the `ip netns` name, else a short id]
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Static IPv4 address
    #[arg(long)]
    pub(crate) ip: Option<String>,
    /// Static IPv6 address
    #[arg(long)]
    pub(crate) ip6: Option<String>,
    /// Extra DNS name for the endpoint on this network (repeatable)
    #[arg(long = "alias")]
    pub(crate) aliases: Vec<String>,
    /// MAC address [default: 02:42 followed by the IPv4 address]
    #[arg(long)]
    pub(crate) mac: Option<String>,
    /// Interface name inside the namespace [default: eth0, or the next free ethN]
    #[arg(long)]
    pub(crate) ifname: Option<String>,
    /// Publish a port: [HOST_IP:]HOST_PORT[-END]:CTR_PORT[-END][/tcp|/udp], or CTR_PORT for a
    /// random host port (repeatable)
    #[arg(short = 'p', long = "publish", value_name = "SPEC")]
    pub(crate) publish: Vec<String>,
    /// Attach even when TARGET is the host's initial network namespace (that of PID 1)
    #[arg(long)]
    pub(crate) force: bool,
}

#[derive(Subcommand)]
pub(crate) enum CniCommand {
    /// Print the CNI network configuration list (conflist) for network NET
    Config { network: String },
}

#[derive(Subcommand)]
pub(crate) enum NetworkCommand {
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
        /// Upstream DNS server (IP or IP:PORT) for this network's names from outside, instead
        /// of the daemon's; repeatable, up to 3
        #[arg(long = "dns", value_name = "IP")]
        dns: Vec<String>,
        /// Driver option KEY=VALUE: port-security=strict (the default: a container sends
        /// only from its own MAC and addresses) or off; repeatable
        #[arg(short = 'o', long = "opt", value_name = "KEY=VALUE")]
        opt: Vec<String>,
        /// vswitch (one host) or overlay (frames reach other hosts in VXLAN)
        #[arg(short = 'd', long, value_name = "DRIVER")]
        driver: Option<String>,
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
        /// Only networks that match KEY=VALUE: name (a part of the name), id (a prefix),
        /// driver or scope; repeatable (all must match)
        #[arg(short, long = "filter", value_name = "KEY=VALUE")]
        filter: Vec<String>,
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
    /// Register or remove an external VTEP (a kernel vxlan device, a hardware switch) of an
    /// overlay network
    #[command(subcommand)]
    Peer(PeerCommand),
}

#[derive(Subcommand)]
pub(crate) enum PeerCommand {
    /// Replicate the network's broadcasts to IP too, and learn the MACs it sends from
    Add {
        network: String,
        ip: std::net::IpAddr,
    },
    /// Forget the VTEP IP and the MACs learned from it
    #[command(alias = "remove")]
    Rm {
        network: String,
        ip: std::net::IpAddr,
    },
}
