//! The client commands: each one request (or a few) to the daemon, printed.

use std::process::ExitCode;

use vswitch_daemon::api::{
    AttachRequest, ContainerInfo, Created, DaemonInfo, DisconnectRequest, EndpointInfo, FdbRow,
    NetworkCreate, NetworkInspect, NetworkStats, Target,
};

use crate::args::{AttachOpts, CniCommand, Command, NetworkCommand, PeerCommand};
use crate::client::{Client, seg};
use crate::containers;
use crate::table::{print_table, short_id};

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
        force: opts.force,
    })
}

pub(crate) fn run_client(command: Command, socket: &std::path::Path) -> anyhow::Result<ExitCode> {
    let client = Client::new(socket)?;
    match command {
        Command::Daemon(_)
        | Command::Init { .. }
        | Command::Demo { .. }
        | Command::TapHelper { .. }
        | Command::Completion { .. }
        | Command::Man { .. }
        | Command::SocketHelper { .. } => {
            unreachable!("handled by main")
        }
        Command::Run(args) => containers::run(&client, args),
        Command::Exec { name, cmd } => containers::exec(client, &name, &cmd),
        Command::Ps { all, quiet, format } => containers::ps(&client, all, quiet, &format),
        Command::Inspect { names } => {
            let cs: Vec<ContainerInfo> = client.get("/containers")?;
            let eps: Vec<EndpointInfo> = client.get("/endpoints")?;
            print_found(&names, |n| {
                crate::inspect::find(n, &cs, &eps)
                    .ok_or_else(|| format!("no such container or endpoint: {n}"))
            })
        }
        Command::Info => {
            let info: DaemonInfo = client.get("/info")?;
            println!("Version: {}", info.version);
            println!("Socket: {}", socket.display());
            println!("State directory: {}", info.state_dir);
            println!("Rootless: {}", info.rootless);
            if let Some(node) = &info.node {
                println!("Cluster node: {node}");
            }
            println!("Upstream DNS: {}", info.upstreams.join(", "));
            println!("Networks: {}", info.networks);
            println!("Endpoints: {}", info.endpoints);
            println!(
                "Containers: {} ({} running)",
                info.containers, info.running_containers
            );
            println!("Features: {}", info.features.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Command::Version => {
            println!("Client: vswitch {}", env!("CARGO_PKG_VERSION"));
            match client.get::<DaemonInfo>("/info") {
                Ok(info) => println!("Daemon: vswitch {}", info.version),
                Err(e) => {
                    println!("Daemon: not reachable on {} ({e})", socket.display());
                    return Ok(ExitCode::FAILURE);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
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
        Command::Cni(CniCommand::Config { network }) => {
            // The network must exist: a conflist for another would fail at the first ADD.
            let net: serde_json::Value = client.get(&format!("/networks/{}", seg(&network)))?;
            let name = net["Name"].as_str().unwrap_or(&network);
            println!("{}", crate::cni::conflist(name, socket));
            Ok(ExitCode::SUCCESS)
        }
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
            dns,
            opt,
            driver,
        } => {
            let mut options = std::collections::BTreeMap::new();
            for o in opt {
                let Some((k, v)) = o.split_once('=') else {
                    anyhow::bail!("invalid --opt {o:?}: expected KEY=VALUE");
                };
                options.insert(k.to_owned(), v.to_owned());
            }
            let req = NetworkCreate {
                name,
                subnets: subnet,
                gateways: gateway,
                ip_range,
                internal,
                mtu,
                enable_ipv6: ipv6,
                dns_servers: dns,
                options,
                driver,
            };
            let created: Created = client.post("/networks/create", &req)?;
            println!("{}", created.id);
            Ok(ExitCode::SUCCESS)
        }
        NetworkCommand::Ls {
            quiet,
            format,
            filter,
        } => {
            let filters = crate::inspect::parse_filters(&filter)?;
            let mut nets: Vec<NetworkInspect> = client.get("/networks")?;
            nets.retain(|n| crate::inspect::matches(n, &filters));
            match (quiet, format.as_str()) {
                (true, _) => nets.iter().for_each(|n| println!("{}", short_id(&n.id))),
                (false, "json") => {
                    for n in &nets {
                        let line = serde_json::json!({
                            "ID": short_id(&n.id), "Name": n.name, "Driver": n.driver,
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
                            short_id(&n.id).to_owned(),
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
        NetworkCommand::Inspect { networks } => print_found(&networks, |n| {
            client
                .get::<NetworkInspect>(&format!("/networks/{}", seg(n)))
                .map_err(|e| e.to_string())
        }),
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
        NetworkCommand::Peer(cmd) => {
            let (network, ip, verb) = match cmd {
                PeerCommand::Add { network, ip } => (network, ip, "add"),
                PeerCommand::Rm { network, ip } => (network, ip, "rm"),
            };
            client.post_empty_reply(
                &format!("/networks/{}/peers/{verb}", seg(&network)),
                &vswitch_daemon::api::PeerRequest { address: ip },
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints what `lookup` finds for each name as one JSON array, and one error line for each it
/// does not (failing the command then), as `docker inspect` does.
fn print_found<T: serde::Serialize>(
    names: &[String],
    lookup: impl Fn(&str) -> Result<T, String>,
) -> anyhow::Result<ExitCode> {
    let mut found = Vec::new();
    let mut failed = false;
    for n in names {
        match lookup(n) {
            Ok(v) => found.push(v),
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
