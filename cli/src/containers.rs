//! Client side of `vswitch run`, `exec`, `ps`, `stop`, `start`, `rm`, `logs`.

use std::ffi::CString;
use std::process::ExitCode;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

use crate::args::RunArgs;
use crate::client::{Client, ClientError, seg};
use vswitch_daemon::api::{ContainerInfo, LogChunk, RunRequest};

/// `vswitch run`: `-d` prints the id; otherwise streams the output and returns CMD's exit code,
/// passing Ctrl-C and SIGTERM on to the container.
pub fn run(client: &Client, args: RunArgs) -> anyhow::Result<ExitCode> {
    let req = RunRequest {
        name: args.name,
        network: Some(args.network),
        ipv4_address: args.ip,
        aliases: args.aliases,
        ports: args.publish,
        hostname: args.hostname,
        cmd: args.cmd,
    };
    let info: ContainerInfo = client.post("/containers/run", &req)?;
    if args.detach {
        println!("{}", info.id);
        return Ok(ExitCode::SUCCESS);
    }
    let name = seg(&info.name);
    let rt = client.runtime();
    let _guard = rt.enter();
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut offset = 0u64;
    loop {
        offset = print_logs(client, &name, offset)?;
        let c: ContainerInfo = client.get(&format!("/containers/{name}"))?;
        if c.pid.is_none() {
            print_logs(client, &name, offset)?;
            let code = c.exit_code.unwrap_or(255);
            return Ok(ExitCode::from(
                u8::try_from(code.clamp(0, 255)).unwrap_or(255),
            ));
        }
        let signal = rt.block_on(async {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => None,
                _ = sigint.recv() => Some("SIGINT"),
                _ = sigterm.recv() => Some("SIGTERM"),
            }
        });
        if let Some(sig) = signal {
            let _ = client.post_empty_reply(&format!("/containers/{name}/kill?signal={sig}"), &());
        }
    }
}

fn print_logs(client: &Client, name: &str, mut offset: u64) -> Result<u64, ClientError> {
    use std::io::Write;
    loop {
        let chunk: LogChunk = client.get(&format!("/containers/{name}/logs?offset={offset}"))?;
        if chunk.next_offset == offset {
            return Ok(offset);
        }
        print!("{}", chunk.data);
        let _ = std::io::stdout().flush();
        offset = chunk.next_offset;
    }
}

pub fn logs(client: &Client, name: &str) -> anyhow::Result<ExitCode> {
    print_logs(client, &seg(name), 0)?;
    Ok(ExitCode::SUCCESS)
}

/// `vswitch exec`: enters the container's network, UTS and mount namespaces and execs CMD
/// (so CMD's exit code is ours).
pub fn exec(client: Client, name: &str, cmd: &[String]) -> anyhow::Result<ExitCode> {
    let c: ContainerInfo = client.get(&format!("/containers/{}", seg(name)))?;
    let Some(pid) = c.pid else {
        anyhow::bail!("container {name} is not running");
    };
    // setns into a mount namespace needs a single-threaded process: drop the client's runtime.
    drop(client);
    let open = |ns: &str| {
        std::fs::File::open(format!("/proc/{pid}/ns/{ns}"))
            .map_err(|e| anyhow::anyhow!("cannot open the {ns} namespace of {name}: {e}"))
    };
    let (user, net, uts, mnt) = (open("user")?, open("net")?, open("uts")?, open("mnt")?);
    // Rootless containers live in a user namespace of their own: enter it first.
    let ino = |f: &std::fs::File| {
        f.metadata()
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .ok()
    };
    let own_user = std::fs::File::open("/proc/self/ns/user").ok();
    if own_user.as_ref().and_then(ino) != ino(&user) {
        setns(&user, CloneFlags::CLONE_NEWUSER)
            .map_err(|e| anyhow::anyhow!("cannot enter {name}'s user namespace: {e}"))?;
    }
    setns(&net, CloneFlags::CLONE_NEWNET)
        .map_err(|e| anyhow::anyhow!("cannot enter {name}'s network namespace: {e}"))?;
    setns(&uts, CloneFlags::CLONE_NEWUTS)
        .map_err(|e| anyhow::anyhow!("cannot enter {name}'s UTS namespace: {e}"))?;
    setns(&mnt, CloneFlags::CLONE_NEWNS)
        .map_err(|e| anyhow::anyhow!("cannot enter {name}'s mount namespace: {e}"))?;
    let args: Vec<CString> = cmd
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()?;
    let Some(prog) = args.first() else {
        anyhow::bail!("no command given");
    };
    let err = match nix::unistd::execvp(prog, &args) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    eprintln!("Error: {}: {}", cmd[0], err.desc());
    Ok(ExitCode::from(if err == nix::errno::Errno::ENOENT {
        127
    } else {
        126
    }))
}

pub fn ps(client: &Client, all: bool, quiet: bool, format: &str) -> anyhow::Result<ExitCode> {
    if !matches!(format, "table" | "json") {
        anyhow::bail!("unknown --format {format:?}: use table or json");
    }
    let list: Vec<ContainerInfo> = client.get("/containers")?;
    let shown = list.iter().filter(|c| all || c.pid.is_some());
    if quiet {
        shown.for_each(|c| println!("{}", crate::table::short_id(&c.id)));
        return Ok(ExitCode::SUCCESS);
    }
    if format == "json" {
        shown.for_each(|c| println!("{}", crate::inspect::ps_line(c)));
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![
        [
            "CONTAINER ID",
            "NAME",
            "NETWORK",
            "IPS",
            "PORTS",
            "STATUS",
            "COMMAND",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for c in shown {
        let line = crate::inspect::ps_line(c);
        rows.push(vec![
            crate::table::short_id(&c.id).to_owned(),
            c.name.clone(),
            c.network.clone(),
            c.ips.join(","),
            c.ports.join(", "),
            line["Status"].as_str().unwrap_or_default().to_owned(),
            c.cmd.join(" "),
        ]);
    }
    crate::table::print_table(&rows);
    Ok(ExitCode::SUCCESS)
}

/// Runs `f` for every name, printing each name that worked and one error line per failure.
pub fn each(
    names: &[String],
    f: impl Fn(&str) -> Result<(), ClientError>,
) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for n in names {
        match f(n) {
            Ok(()) => println!("{n}"),
            Err(e) => {
                eprintln!("Error: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
