//! `vswitch` as a CNI plugin of type `vswitch`: started with `CNI_COMMAND` in its environment
//! and no arguments, it reads the network configuration on stdin, asks the running daemon
//! (on the configuration's `socket`) and prints the CNI result or error on stdout.
//!
//! A thin shim, as Multus's thick plugin and CNI's `dhcp` are: the daemon holds the state
//! (attachments keyed by container id and interface, see `vswitch_daemon::control::cni`).
//! Spec versions 1.0.0 and 1.1.0, and 0.4.0, which podman 4 converts results to.

use std::collections::HashMap;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Value, json};
use vswitch_daemon::api::{
    CniAddRequest, CniAttachment, CniGcReply, CniGcRequest, CniKey, CniRequest,
};

use crate::client::{Client, ClientError, seg};

/// The versions this plugin speaks, oldest first.
pub const SUPPORTED: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];
/// The most a configuration on stdin may be.
const MAX_STDIN: u64 = 1 << 20;

/// CNI's error codes (spec, "Error codes"), and this plugin's own (100 and up).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// The attachment, a name, an address or a host port is taken.
    pub const CONFLICT: u32 = 100;
    /// CHECK: the attachment is not what `prevResult` says.
    pub const CHECK_FAILED: u32 = 101;
}

/// A CNI error: printed as the spec's error JSON, with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The error JSON for a plugin speaking `version`.
    pub fn to_json(&self, version: &str) -> Value {
        let mut v = json!({ "cniVersion": version, "code": self.code, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        v
    }
}

/// The network configuration on stdin (unknown fields are ignored, as the spec asks).
#[derive(Debug, Default, Deserialize)]
struct NetConf {
    #[serde(rename = "cniVersion", default)]
    cni_version: String,
    #[serde(default)]
    name: String,
    /// The vswitch network (default: `name`).
    #[serde(default)]
    network: Option<String>,
    /// The daemon's control socket.
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(rename = "runtimeConfig", default)]
    runtime_config: RuntimeConfig,
    #[serde(rename = "prevResult", default)]
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    valid_attachments: Option<Vec<Attachment>>,
    #[serde(rename = "cni.dev/attachments", default)]
    attachments: Option<Vec<Attachment>>,
}

#[derive(Debug, Default, Deserialize)]
struct RuntimeConfig {
    #[serde(rename = "portMappings", default)]
    port_mappings: Vec<PortMapping>,
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default)]
    mac: Option<String>,
    /// Network name -> aliases (podman's form).
    #[serde(default)]
    aliases: HashMap<String, Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct PortMapping {
    #[serde(rename = "hostPort")]
    host_port: u16,
    #[serde(rename = "containerPort")]
    container_port: u16,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(rename = "hostIP", default)]
    host_ip: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Attachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

/// The plugin's environment, as the runtime sets it.
#[derive(Debug, Default, Clone)]
pub struct Env {
    pub command: String,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
}

impl Env {
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            command: var("CNI_COMMAND").unwrap_or_default(),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
        }
    }

    fn need(&self, value: &Option<String>, name: &str) -> Result<String, CniError> {
        value.clone().ok_or_else(|| {
            CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("{name} is required for {}", self.command),
            )
        })
    }
}

/// `CNI_ARGS`: `K=V;K=V`. Unknown keys are an error unless `IgnoreUnknown` is set.
#[derive(Debug, Default, PartialEq, Eq)]
struct Args {
    pod_name: Option<String>,
    ip: Option<String>,
    mac: Option<String>,
}

fn parse_args(raw: Option<&str>) -> Result<Args, CniError> {
    let mut out = Args::default();
    let Some(raw) = raw else {
        return Ok(out);
    };
    let mut unknown = Vec::new();
    let mut ignore_unknown = false;
    for pair in raw.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
            ));
        };
        match k {
            "IgnoreUnknown" => ignore_unknown = matches!(v, "1" | "true" | "True"),
            "K8S_POD_NAME" => out.pod_name = Some(v.to_owned()).filter(|v| !v.is_empty()),
            "IP" => out.ip = Some(v.to_owned()).filter(|v| !v.is_empty()),
            "MAC" => out.mac = Some(v.to_owned()).filter(|v| !v.is_empty()),
            "K8S_POD_NAMESPACE" | "K8S_POD_INFRA_CONTAINER_ID" | "K8S_POD_UID" => {}
            other => unknown.push(other.to_owned()),
        }
    }
    if !unknown.is_empty() && !ignore_unknown {
        return Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("CNI_ARGS: unknown keys {unknown:?} (set IgnoreUnknown=1 to allow them)"),
        ));
    }
    Ok(out)
}

/// Runs the plugin: returns what to print on stdout (if anything) or the error.
pub fn run(env: &Env, stdin: &[u8], default_socket: &Path) -> Result<Option<Value>, CniError> {
    if env.command == "VERSION" {
        return Ok(Some(version_reply(stdin)));
    }
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE_FAILURE,
            "cannot decode the network configuration",
        )
        .with_details(e.to_string())
    })?;
    if !SUPPORTED.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CNI version {:?} is not supported (supported: {})",
                conf.cni_version,
                SUPPORTED.join(", ")
            ),
        ));
    }
    let network = conf
        .network
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| conf.name.clone());
    if network.is_empty() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "the configuration names no network (`network` or `name`)",
        ));
    }
    let socket = conf
        .socket
        .clone()
        .unwrap_or_else(|| default_socket.to_owned());
    let client = Client::new(&socket)
        .map_err(|e| CniError::new(code::IO_FAILURE, format!("cannot start a client: {e}")))?;
    match env.command.as_str() {
        "ADD" => add(env, &conf, &network, &client).map(Some),
        "DEL" => del(env, &network, &client).map(|()| None),
        "CHECK" => check(env, &conf, &network, &client).map(|()| None),
        "STATUS" => status(&network, &client).map(|()| None),
        "GC" => gc(&conf, &network, &client).map(|()| None),
        "" => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_COMMAND is empty",
        )),
        other => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("unknown CNI_COMMAND {other:?}"),
        )),
    }
}

fn version_reply(stdin: &[u8]) -> Value {
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
        .filter(|v| SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| SUPPORTED[SUPPORTED.len() - 1].to_owned());
    json!({ "cniVersion": asked, "supportedVersions": SUPPORTED })
}

fn key(env: &Env) -> Result<CniKey, CniError> {
    Ok(CniKey {
        container_id: env.need(&env.container_id, "CNI_CONTAINERID")?,
        ifname: env.need(&env.ifname, "CNI_IFNAME")?,
    })
}

fn add(env: &Env, conf: &NetConf, network: &str, client: &Client) -> Result<Value, CniError> {
    let key = key(env)?;
    let netns = env.need(&env.netns, "CNI_NETNS")?;
    if !Path::new(&netns).exists() {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!("the network namespace {netns} does not exist"),
        ));
    }
    let args = parse_args(env.args.as_deref())?;
    let rc = &conf.runtime_config;
    let name = args
        .pod_name
        .clone()
        .unwrap_or_else(|| key.container_id.chars().take(12).collect());
    let mut ips: Vec<String> = Vec::new();
    for ip in rc.ips.iter().chain(args.ip.iter()) {
        let addr = ip.split_once('/').map_or(ip.as_str(), |(a, _)| a);
        let known = ips
            .iter()
            .any(|i| i.split_once('/').map_or(i.as_str(), |(a, _)| a) == addr);
        if !known {
            ips.push(ip.clone());
        }
    }
    let mut ports = Vec::new();
    for p in &rc.port_mappings {
        let proto = p.protocol.as_deref().unwrap_or("tcp").to_ascii_lowercase();
        if proto != "tcp" && proto != "udp" {
            return Err(CniError::new(
                code::UNSUPPORTED_FIELD,
                format!("portMappings: protocol {proto:?} is not supported (tcp, udp)"),
            ));
        }
        let host = match p.host_ip.as_deref().filter(|h| !h.is_empty()) {
            Some(h) if h.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv6()) => format!("[{h}]:"),
            Some(h) => format!("{h}:"),
            None => String::new(),
        };
        ports.push(format!(
            "{host}{}:{}/{proto}",
            p.host_port, p.container_port
        ));
    }
    let req = CniAddRequest {
        network: network.to_owned(),
        key,
        netns: netns.clone(),
        name,
        ips,
        mac: rc.mac.clone().or(args.mac),
        aliases: rc.aliases.get(&conf.name).cloned().unwrap_or_default(),
        ports,
    };
    let att: CniAttachment = client
        .post("/cni/add", &req)
        .map_err(|e| daemon_error(e, "ADD"))?;
    Ok(result(&conf.cni_version, &att, &netns))
}

fn del(env: &Env, network: &str, client: &Client) -> Result<(), CniError> {
    let req = CniRequest {
        network: network.to_owned(),
        key: key(env)?,
    };
    client
        .post_empty_reply("/cni/del", &req)
        .map_err(|e| daemon_error(e, "DEL"))
}

fn check(env: &Env, conf: &NetConf, network: &str, client: &Client) -> Result<(), CniError> {
    let netns = env.need(&env.netns, "CNI_NETNS")?;
    let req = CniRequest {
        network: network.to_owned(),
        key: key(env)?,
    };
    let att: CniAttachment = client
        .post("/cni/check", &req)
        .map_err(|e| daemon_error(e, "CHECK"))?;
    let Some(prev) = &conf.prev_result else {
        return Ok(());
    };
    let now = result(&conf.cni_version, &att, &netns);
    for field in ["interfaces", "ips"] {
        if normalized(&prev[field]) != normalized(&now[field]) {
            return Err(CniError::new(
                code::CHECK_FAILED,
                format!("the attachment's {field} differ from prevResult"),
            )
            .with_details(format!("prevResult: {}, now: {}", prev[field], now[field])));
        }
    }
    Ok(())
}

/// A result's list, for comparison: order and the 0.4.0 `version` keys aside.
fn normalized(v: &Value) -> Vec<Value> {
    let mut items: Vec<Value> = v.as_array().cloned().unwrap_or_default();
    for item in &mut items {
        if let Some(o) = item.as_object_mut() {
            o.remove("version");
        }
    }
    items.sort_by_key(|i| i.to_string());
    items
}

fn status(network: &str, client: &Client) -> Result<(), CniError> {
    let reachable = client.get::<Value>(&format!("/networks/{}", seg(network)));
    match reachable {
        Ok(_) => Ok(()),
        Err(ClientError::Daemon { status: 404, .. }) => Err(CniError::new(
            code::NOT_AVAILABLE,
            format!("the vswitch daemon has no network {network}"),
        )),
        Err(e) => Err(
            CniError::new(code::NOT_AVAILABLE, "the vswitch daemon is not available")
                .with_details(e.to_string()),
        ),
    }
}

fn gc(conf: &NetConf, network: &str, client: &Client) -> Result<(), CniError> {
    let listed = conf
        .valid_attachments
        .as_ref()
        .or(conf.attachments.as_ref());
    let Some(listed) = listed else {
        // Nothing says what is valid: removing everything would be a guess.
        return Ok(());
    };
    let req = CniGcRequest {
        network: network.to_owned(),
        valid: listed
            .iter()
            .map(|a| CniKey {
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
            })
            .collect(),
    };
    let _: CniGcReply = client
        .post("/cni/gc", &req)
        .map_err(|e| daemon_error(e, "GC"))?;
    Ok(())
}

/// A daemon's refusal as a CNI error.
fn daemon_error(e: ClientError, command: &str) -> CniError {
    let text = e.to_string();
    match e {
        ClientError::Connect { .. } => {
            CniError::new(code::TRY_AGAIN_LATER, "the vswitch daemon is not available")
                .with_details(text)
        }
        ClientError::Daemon { status, message } => {
            let code = match status {
                400 | 403 | 413 => code::INVALID_CONFIG,
                404 if command == "CHECK" => code::UNKNOWN_CONTAINER,
                404 => code::INVALID_CONFIG,
                409 => code::CONFLICT,
                503 => code::TRY_AGAIN_LATER,
                _ => code::IO_FAILURE,
            };
            CniError::new(code, message)
        }
        ClientError::Protocol(_) => CniError::new(code::IO_FAILURE, text),
    }
}

/// The CNI result of an attachment, in the configuration's version.
fn result(version: &str, att: &CniAttachment, netns: &str) -> Value {
    let ep = &att.endpoint;
    let old = version == "0.4.0";
    let mut ips = Vec::new();
    let mut routes = Vec::new();
    let mut nameservers = Vec::new();
    let families = [
        (&ep.ipv4_address, &ep.gateway, "4", "0.0.0.0/0"),
        (&ep.ipv6_address, &ep.ipv6_gateway, "6", "::/0"),
    ];
    for (address, gateway, family, default) in families {
        if address.is_empty() {
            continue;
        }
        let mut ip = json!({ "interface": 0, "address": address });
        if !gateway.is_empty() {
            ip["gateway"] = json!(gateway);
            nameservers.push(json!(gateway));
            if !att.internal {
                routes.push(json!({ "dst": default, "gw": gateway }));
            }
        }
        if old {
            ip["version"] = json!(family);
        }
        ips.push(ip);
    }
    let mut out = json!({
        "cniVersion": version,
        "interfaces": [{ "name": ep.ifname, "mac": ep.mac_address, "sandbox": netns }],
        "ips": ips,
        "dns": { "nameservers": nameservers },
    });
    if !routes.is_empty() {
        out["routes"] = json!(routes);
    }
    out
}

/// The conflist that makes network `network` a CNI network served by the daemon on `socket`.
pub fn conflist(network: &str, socket: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": network,
        "plugins": [{
            "type": "vswitch",
            "network": network,
            "socket": socket,
            "capabilities": { "portMappings": true, "ips": true, "mac": true, "aliases": true },
        }],
    })
}

/// The plugin's entry point: reads stdin, runs, prints, and gives the exit status.
pub fn main(default_socket: &Path) -> std::process::ExitCode {
    let env = Env::from_process();
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().take(MAX_STDIN).read_to_end(&mut stdin) {
        return fail(
            "1.1.0",
            &CniError::new(code::IO_FAILURE, format!("cannot read stdin: {e}")),
        );
    }
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
        .filter(|v| SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| SUPPORTED[SUPPORTED.len() - 1].to_owned());
    match run(&env, &stdin, default_socket) {
        Ok(Some(out)) => {
            println!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Ok(None) => std::process::ExitCode::SUCCESS,
        Err(e) => fail(&version, &e),
    }
}

fn fail(version: &str, e: &CniError) -> std::process::ExitCode {
    println!("{}", e.to_json(version));
    eprintln!("vswitch CNI: {}", e.msg);
    std::process::ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_know_podman_and_kubernetes_keys() {
        assert_eq!(
            parse_args(Some(
                "IgnoreUnknown=1;K8S_POD_NAME=web;IP=10.1.0.5;MAC=02:00:00:00:00:01;X=y"
            ))
            .expect("args"),
            Args {
                pod_name: Some("web".into()),
                ip: Some("10.1.0.5".into()),
                mac: Some("02:00:00:00:00:01".into()),
            }
        );
        assert_eq!(
            parse_args(Some("X=y")).expect_err("unknown").code,
            code::INVALID_ENVIRONMENT
        );
        assert_eq!(
            parse_args(Some("junk")).expect_err("junk").code,
            code::INVALID_ENVIRONMENT
        );
        assert_eq!(parse_args(None).expect("none"), Args::default());
    }

    #[test]
    fn version_lists_what_is_supported_and_echoes_a_known_version() {
        let v = version_reply(br#"{"cniVersion":"0.4.0"}"#);
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
        assert_eq!(version_reply(b"")["cniVersion"], "1.1.0");
    }

    fn attachment(internal: bool, v6: bool) -> CniAttachment {
        CniAttachment {
            endpoint: vswitch_daemon::api::EndpointInfo {
                id: "i".into(),
                endpoint_id: "e".into(),
                name: "web".into(),
                network: "n".into(),
                network_id: "nid".into(),
                target: vswitch_daemon::api::Target::Path("/run/netns/x".into()),
                ifname: "eth0".into(),
                mac_address: "02:42:0a:01:00:05".into(),
                ipv4_address: "10.1.0.5/24".into(),
                ipv6_address: if v6 {
                    "fd00::5/64".into()
                } else {
                    String::new()
                },
                gateway: "10.1.0.1".into(),
                ipv6_gateway: if v6 { "fd00::1".into() } else { String::new() },
                aliases: vec![],
                ports: vec![],
            },
            internal,
        }
    }

    #[test]
    fn results_follow_the_asked_version() {
        let r = result("1.0.0", &attachment(false, true), "/run/netns/x");
        assert_eq!(
            r,
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "mac": "02:42:0a:01:00:05", "sandbox": "/run/netns/x"}],
                "ips": [
                    {"interface": 0, "address": "10.1.0.5/24", "gateway": "10.1.0.1"},
                    {"interface": 0, "address": "fd00::5/64", "gateway": "fd00::1"}
                ],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}, {"dst": "::/0", "gw": "fd00::1"}],
                "dns": {"nameservers": ["10.1.0.1", "fd00::1"]}
            })
        );
        let old = result("0.4.0", &attachment(true, false), "/run/netns/x");
        assert_eq!(old["ips"][0]["version"], "4");
        assert!(
            old.get("routes").is_none(),
            "an internal network has no way out"
        );
    }

    #[test]
    fn errors_are_the_specs_json() {
        let e = CniError::new(code::INVALID_CONFIG, "bad").with_details("why");
        assert_eq!(
            e.to_json("1.0.0"),
            json!({"cniVersion": "1.0.0", "code": 7, "msg": "bad", "details": "why"})
        );
    }
}
