//! `vswitch demo`: Docker's networking story, end to end, with vswitch alone.
//!
//! Starts a daemon of its own (temporary socket and state directory) unless told to use a
//! running one, creates `you_network`, runs `tomcat81` and `tomcat82` (Python's http.server)
//! with published ports, and shows each step as a transcript: `network ls`, ping by name from
//! one container to the other, HTTP through both published ports, a `container:tomcat81`
//! sidecar reaching `localhost:8080`, `network inspect`. Then it removes everything it made.
//! It exits 0 only if every step worked; a failing step says which and why.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

pub struct DemoOptions {
    /// Use the daemon on this socket instead of starting one.
    pub use_running: Option<PathBuf>,
}

struct Demo {
    bin: PathBuf,
    socket: PathBuf,
    tmp: PathBuf,
    daemon: Option<Child>,
    created_network: bool,
    containers: Vec<&'static str>,
}

type Step = Result<(), String>;

pub fn run(opts: DemoOptions) -> anyhow::Result<ExitCode> {
    let bin = std::env::current_exe()?;
    let tmp = std::env::temp_dir().join(format!("vswitch-demo-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let mut demo = Demo {
        bin,
        socket: opts
            .use_running
            .clone()
            .unwrap_or_else(|| tmp.join("vswitch.sock")),
        tmp,
        daemon: None,
        created_network: false,
        containers: Vec::new(),
    };
    let result = demo.steps(opts.use_running.is_none());
    demo.cleanup();
    match result {
        Ok(()) => {
            println!("\ndemo OK: every step worked");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("\ndemo FAILED: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

impl Demo {
    fn steps(&mut self, own_daemon: bool) -> Step {
        if own_daemon {
            self.start_daemon()?;
        }
        let p81 = free_port(8081);
        let p82 = free_port(8082);
        for (name, dir) in [("tomcat81", "www81"), ("tomcat82", "www82")] {
            let d = self.tmp.join(dir);
            std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
            std::fs::write(d.join("index.html"), format!("hello from {name}\n"))
                .map_err(|e| e.to_string())?;
        }
        self.vs("create the network", &["network", "create", "you_network"])?;
        self.created_network = true;
        for (name, port, dir) in [("tomcat81", p81, "www81"), ("tomcat82", p82, "www82")] {
            let publish = format!("{port}:8080");
            let root = self.tmp.join(dir).display().to_string();
            self.containers.push(name);
            self.vs(
                &format!("run {name}"),
                &[
                    "run",
                    "-d",
                    "--name",
                    name,
                    "--network",
                    "you_network",
                    "-p",
                    &publish,
                    "--",
                    "python3",
                    "-m",
                    "http.server",
                    "8080",
                    "--directory",
                    &root,
                ],
            )?;
        }
        self.vs("list networks", &["network", "ls"])?;
        self.vs("list containers", &["ps"])?;
        for port in [p81, p82] {
            wait_http(port)
                .map_err(|e| format!("the web server behind port {port} did not come up: {e}"))?;
        }
        self.vs(
            "ping tomcat82 by name from tomcat81",
            &[
                "exec", "tomcat81", "--", "ping", "-c", "3", "-i", "0.2", "tomcat82",
            ],
        )?;
        for (port, name) in [(p81, "tomcat81"), (p82, "tomcat82")] {
            println!("\n$ curl http://127.0.0.1:{port}/");
            let body = http_get(port).map_err(|e| format!("curl through port {port}: {e}"))?;
            print!("{body}");
            if !body.contains(name) {
                return Err(format!("port {port} answered {body:?}, expected {name}"));
            }
        }
        self.containers.push("sidecar");
        let out = self.vs(
            "a sidecar in tomcat81's network namespace reaches localhost:8080",
            &[
                "run", "--name", "sidecar", "--network", "container:tomcat81", "--", "python3",
                "-c",
                "import urllib.request; print(urllib.request.urlopen('http://localhost:8080/').read().decode(), end='')",
            ],
        )?;
        if !out.contains("hello from tomcat81") {
            return Err(format!("the sidecar got {out:?}"));
        }
        self.vs(
            "inspect the network",
            &["network", "inspect", "you_network"],
        )?;
        Ok(())
    }

    /// Runs `vswitch ARGS` against the demo's daemon, echoing it like a terminal transcript.
    fn vs(&self, what: &str, args: &[&str]) -> Result<String, String> {
        println!("\n$ vswitch {}", shown(args));
        let out = Command::new(&self.bin)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{what}: cannot run vswitch: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        print!("{stdout}");
        let _ = std::io::stdout().flush();
        if !out.status.success() {
            return Err(format!(
                "{what}: `vswitch {}` failed: {}",
                shown(args),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(stdout)
    }

    fn start_daemon(&mut self) -> Step {
        let log = std::fs::File::create(self.tmp.join("daemon.log")).map_err(|e| e.to_string())?;
        println!(
            "$ vswitch daemon --state-dir {} &",
            self.tmp.join("state").display()
        );
        let child = Command::new(&self.bin)
            .arg("--socket")
            .arg(&self.socket)
            .arg("daemon")
            .arg("--state-dir")
            .arg(self.tmp.join("state"))
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start the daemon: {e}"))?;
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(Ok(Some(status))) = self.daemon.as_mut().map(Child::try_wait) {
                let log = std::fs::read_to_string(self.tmp.join("daemon.log")).unwrap_or_default();
                return Err(format!("the daemon exited ({status}): {}", log.trim()));
            }
            if Instant::now() > deadline {
                return Err("the daemon did not open its socket within 15 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn cleanup(&mut self) {
        println!("\n(cleaning up)");
        let quiet = |args: &[&str]| {
            let _ = Command::new(&self.bin)
                .arg("--socket")
                .arg(&self.socket)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        for c in self.containers.iter().rev() {
            quiet(&["rm", "-f", c]);
        }
        if self.created_network {
            quiet(&["network", "rm", "you_network"]);
        }
        if let Some(mut d) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(d.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(d.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

fn shown(args: &[&str]) -> String {
    args.iter()
        .map(|a| {
            if a.contains('\'') {
                format!("\"{}\"", a.replace('"', "\\\""))
            } else if a.contains(' ') || a.contains('(') {
                format!("'{a}'")
            } else {
                (*a).to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `preferred` if it is free on the host, else any free port.
fn free_port(preferred: u16) -> u16 {
    if std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, preferred)).is_ok() {
        return preferred;
    }
    std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(preferred)
}

fn http_get(port: u16) -> Result<String, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP answer")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or("").to_owned());
    }
    Ok(body.to_owned())
}

fn wait_http(port: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match http_get(port) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
