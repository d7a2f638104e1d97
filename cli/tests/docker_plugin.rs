//! Docker's plugin protocol spoken to `vswitch daemon --docker-plugin` directly, as dockerd
//! speaks it (the calls and bodies dockerd 20.10 sends, bad ones included), with this test
//! doing what dockerd does with the answers: moving the interface Join names into a sandbox.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use vswitch_tests::{Daemon, Netns, require_root, run, secs, text, wait_until};

/// POSTs `body` (none: an empty body, as Plugin.Activate comes) to the plugin socket; returns
/// the status and the JSON answer.
fn call(sock: &Path, method: &str, body: Option<Value>) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "--max-time",
        "20",
        "-w",
        "\n%{http_code}",
        "-X",
        "POST",
    ])
    .arg("--unix-socket")
    .arg(sock)
    .arg(format!("http://plugin/{method}"))
    .args([
        "-H",
        "Content-Type: application/vnd.docker.plugins.v1.2+json",
    ]);
    if let Some(b) = body {
        cmd.args(["-d", &b.to_string()]);
    }
    let out = run(&mut cmd, secs(30));
    let out = text(&out.stdout);
    let (body, status) = out.rsplit_once('\n').unwrap_or(("", "0"));
    let value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{method}: {e}: {body:?}"));
    (status.parse().unwrap_or(0), value)
}

fn ok(sock: &Path, method: &str, body: Value) -> Value {
    let (status, v) = call(sock, method, Some(body));
    assert_eq!(status, 200, "{method}: {v}");
    v
}

/// An error answer: non-200 with the protocol's `{"Err": "..."}`; returns the message.
fn err(sock: &Path, method: &str, body: Value) -> String {
    let (status, v) = call(sock, method, Some(body));
    assert_ne!(status, 200, "{method} should fail: {v}");
    let e = v["Err"].as_str().unwrap_or_else(|| panic!("no Err: {v}"));
    assert!(!e.is_empty() && !e.contains('\n'), "{e:?}");
    e.to_owned()
}

fn plugin_daemon() -> (Daemon, PathBuf) {
    let dir = std::env::temp_dir().join(vswitch_tests::unique("-plugins"));
    let d = Daemon::start_with(&[
        "--docker-plugin",
        "--docker-plugin-dir",
        dir.to_str().expect("utf-8"),
        "--docker-host",
        "unix:///nonexistent/docker.sock",
    ]);
    let sock = dir.join("vswitch.sock");
    assert!(wait_until(secs(5), || sock.exists()), "{}", d.log());
    (d, sock)
}

const NET: &str = "8d6e3f0c2b1a49e7a5c4d3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2";
const EP: &str = "f55ca5a5671be056aa2e6df93dd03e791c0a17d9e6a264742b1c293685e7a519";

#[test]
#[ignore = "needs root (network namespaces, TAP devices); run by scripts/test.sh as root"]
fn docker_calls_make_a_network_an_endpoint_and_a_working_interface() {
    require_root();
    let (d, sock) = plugin_daemon();
    let (status, v) = call(&sock, "Plugin.Activate", None);
    assert_eq!(status, 200);
    assert_eq!(v, json!({"Implements": ["NetworkDriver", "IpamDriver"]}));
    assert_eq!(
        call(&sock, "NetworkDriver.GetCapabilities", None).1["Scope"],
        "local"
    );
    assert_eq!(
        call(&sock, "IpamDriver.GetCapabilities", None).1["RequiresMACAddress"],
        false
    );
    let spaces = call(&sock, "IpamDriver.GetDefaultAddressSpaces", None).1;
    assert!(spaces["LocalDefaultAddressSpace"].is_string(), "{spaces}");
    for m in ["NetworkDriver.DiscoverNew", "NetworkDriver.DiscoverDelete"] {
        ok(&sock, m, json!({"DiscoveryType": 1, "DiscoveryData": {}}));
    }

    // The pool, its gateway, then the network (`--subnet --gateway --ip-range`).
    let pool = ok(
        &sock,
        "IpamDriver.RequestPool",
        json!({"AddressSpace":"vswitch-local","Pool":"10.99.0.0/24","SubPool":"10.99.0.128/25","Options":{},"V6":false}),
    );
    assert_eq!(pool["Pool"], "10.99.0.0/24");
    let pool_id = pool["PoolID"].as_str().expect("PoolID").to_owned();
    let gw = ok(
        &sock,
        "IpamDriver.RequestAddress",
        json!({"PoolID": pool_id, "Address": "10.99.0.254", "Options": {"RequestAddressType":"com.docker.network.gateway"}}),
    );
    assert_eq!(gw["Address"], "10.99.0.254/24");
    // An overlapping pool is refused while this one is promised.
    let e = err(
        &sock,
        "IpamDriver.RequestPool",
        json!({"AddressSpace":"vswitch-local","Pool":"10.99.0.0/16","SubPool":"","V6":false}),
    );
    assert!(e.contains("overlaps"), "{e}");
    ok(
        &sock,
        "NetworkDriver.CreateNetwork",
        json!({"NetworkID": NET, "Options": {"com.docker.network.enable_ipv6": false, "com.docker.network.generic": {}},
               "IPv4Data": [{"AddressSpace":"vswitch-local","Gateway":"10.99.0.254/24","Pool":"10.99.0.0/24"}], "IPv6Data": []}),
    );
    // Without dockerd to ask, the network keeps its provisional name.
    let name = format!("docker-{}", &NET[..12]);
    let net = d.inspect(&name);
    assert_eq!(net["IPAM"]["Config"][0]["Gateway"], "10.99.0.254", "{net}");
    assert_eq!(
        net["IPAM"]["Config"][0]["IPRange"], "10.99.0.128/25",
        "{net}"
    );

    // Addresses come from the range; a wanted one (`--ip`) is given once.
    let a = ok(
        &sock,
        "IpamDriver.RequestAddress",
        json!({"PoolID": pool_id, "Address": "", "Options": null}),
    );
    assert_eq!(a["Address"], "10.99.0.129/24");
    ok(
        &sock,
        "IpamDriver.RequestAddress",
        json!({"PoolID": pool_id, "Address": "10.99.0.10", "Options": null}),
    );
    let e = err(
        &sock,
        "IpamDriver.RequestAddress",
        json!({"PoolID": pool_id, "Address": "10.99.0.10", "Options": null}),
    );
    assert!(e.contains("in use"), "{e}");
    ok(
        &sock,
        "IpamDriver.ReleaseAddress",
        json!({"PoolID": pool_id, "Address": "10.99.0.10/24"}),
    );

    // The endpoint, then Join: an interface in the daemon's namespace for Docker to move.
    let created = ok(
        &sock,
        "NetworkDriver.CreateEndpoint",
        json!({"NetworkID": NET, "EndpointID": EP, "Interface": {"Address":"10.99.0.129/24","AddressIPv6":"","MacAddress":""},
               "Options": {"com.docker.network.portmap":[{"Proto":6,"IP":"","Port":8080,"HostIP":"","HostPort":18095,"HostPortEnd":18095}]}}),
    );
    let mac = created["Interface"]["MacAddress"]
        .as_str()
        .expect("a MAC for Docker")
        .to_owned();
    let sandbox = Netns::new("sb");
    let joined = ok(
        &sock,
        "NetworkDriver.Join",
        json!({"NetworkID": NET, "EndpointID": EP, "SandboxKey": sandbox.path(), "Options": {}}),
    );
    assert_eq!(joined["Gateway"], "10.99.0.254");
    assert_eq!(joined["InterfaceName"]["DstPrefix"], "eth");
    let src = joined["InterfaceName"]["SrcName"]
        .as_str()
        .expect("SrcName")
        .to_owned();
    // What dockerd does next: move it into the sandbox, name it, address it.
    let ip = |args: &[&str]| {
        let out = run(Command::new("ip").args(args), secs(10));
        assert!(out.status.success(), "ip {args:?}: {}", text(&out.stderr));
    };
    ip(&[
        "-n",
        &d.ns.name,
        "link",
        "set",
        &src,
        "netns",
        &sandbox.name,
        "name",
        "eth0",
    ]);
    ip(&[
        "-n",
        &sandbox.name,
        "addr",
        "add",
        "10.99.0.129/24",
        "dev",
        "eth0",
    ]);
    ip(&["-n", &sandbox.name, "link", "set", "eth0", "up"]);
    ip(&["-n", &sandbox.name, "link", "set", "lo", "up"]);
    let link = text(
        &run(
            Command::new("ip").args(["-n", &sandbox.name, "-o", "link", "show", "dev", "eth0"]),
            secs(10),
        )
        .stdout,
    );
    assert!(link.contains(&mac), "{link}");
    // The TAP's fd kept working through the move: the gateway answers.
    assert!(sandbox.ping_within("10.99.0.254", secs(5)), "{}", d.log());
    ok(
        &sock,
        "NetworkDriver.ProgramExternalConnectivity",
        json!({"NetworkID": NET, "EndpointID": EP, "Options": {"com.docker.network.portmap":[{"Proto":6,"IP":"","Port":8080,"HostIP":"","HostPort":18095,"HostPortEnd":18095}]}}),
    );
    let info = ok(
        &sock,
        "NetworkDriver.EndpointOperInfo",
        json!({"NetworkID": NET, "EndpointID": EP}),
    );
    assert_eq!(
        info["Value"]["com.docker.network.portmap"][0]["HostPort"], 18095,
        "{info}"
    );
    // vswitch learnt the interface's name and namespace once it was there.
    let settled = wait_until(secs(10), || d.log().contains("Docker endpoint settled"));
    assert!(settled, "{}", d.log());

    // Bad calls: one clear line each, nothing changed.
    let before = d.ok(&["network", "inspect", &name]);
    for (method, body, says) in [
        (
            "NetworkDriver.CreateEndpoint",
            json!({"NetworkID": "00ff00ff00ff00ff", "EndpointID": "aaaaaaaaaaaaaaaa", "Interface": {"Address": "10.99.0.5/24"}}),
            "no vswitch network",
        ),
        (
            "NetworkDriver.CreateEndpoint",
            json!({"NetworkID": NET, "EndpointID": "../../etc", "Interface": {"Address": "10.99.0.5/24"}}),
            "invalid endpoint id",
        ),
        (
            "NetworkDriver.CreateEndpoint",
            json!({"NetworkID": NET, "EndpointID": "bbbbbbbbbbbbbbbb", "Interface": {"Address": "10.98.0.5/24"}}),
            "not an endpoint address",
        ),
        (
            "NetworkDriver.CreateEndpoint",
            json!({"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": "10.99.0.5/24"}}),
            "exists",
        ),
        (
            "NetworkDriver.CreateEndpoint",
            json!({"NetworkID": NET}),
            "invalid",
        ),
        (
            "NetworkDriver.Join",
            json!({"NetworkID": NET, "EndpointID": "cccccccccccccccc", "SandboxKey": "/x"}),
            "not created",
        ),
        (
            "NetworkDriver.CreateNetwork",
            json!({"NetworkID": "dddddddddddddddd", "IPv4Data": []}),
            "IPv4 pool",
        ),
        (
            "NetworkDriver.CreateNetwork",
            json!({"NetworkID": "eeeeeeeeeeeeeeee", "Options": {"com.docker.network.generic": {"bogus": "1"}}, "IPv4Data": [{"AddressSpace": "vswitch-local", "Pool": "10.98.0.0/24", "Gateway": "10.98.0.1/24"}]}),
            "bogus",
        ),
        (
            "NetworkDriver.CreateNetwork",
            json!({"NetworkID": "ffffffffffffffff", "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": "10.98.0.0/24", "Gateway": "10.98.0.1/24"}]}),
            "--ipam-driver vswitch",
        ),
        (
            "NetworkDriver.CreateEndpoint",
            json!({"NetworkID": NET, "EndpointID": "abababababababab", "Interface": {"Address": "10.99.0.20/24", "MacAddress": "02:42:0a:63:00:fe"}}),
            "MAC address 02:42:0a:63:00:fe is already in use",
        ),
        (
            "NetworkDriver.CreateEndpoint",
            json!({"NetworkID": NET, "EndpointID": "abababababababab", "Interface": {"Address": "10.99.0.20/24", "MacAddress": mac}}),
            "already in use",
        ),
        (
            "NetworkDriver.CreateEndpoint",
            json!({"NetworkID": NET, "EndpointID": "abababababababab", "Interface": {"Address": "10.99.0.129/24", "MacAddress": "02:00:00:00:00:99"}}),
            "address 10.99.0.129 is already in use",
        ),
        (
            "NetworkDriver.CreateEndpoint",
            json!({"NetworkID": NET, "EndpointID": "abababababababab", "Interface": {"Address": "10.99.0.20/24", "MacAddress": "01:00:5e:00:00:01"}}),
            "not a unicast",
        ),
        (
            "NetworkDriver.CreateEndpoint",
            json!({"NetworkID": NET, "EndpointID": "abababababababab", "Interface": {"Address": "10.99.0.20/24", "AddressIPv6": "fd00::5/64"}}),
            "no IPv6 subnet",
        ),
        (
            "IpamDriver.RequestAddress",
            json!({"PoolID": "10.55.0.0/24", "Address": ""}),
            "unknown pool",
        ),
        (
            "IpamDriver.RequestPool",
            json!({"Pool": "10.300.0.0/24"}),
            "invalid",
        ),
        (
            "IpamDriver.RequestPool",
            json!({"Pool": "", "Options": {"x": "y"}}),
            "option",
        ),
        (
            "IpamDriver.RequestAddress",
            json!({"PoolID": "nonsense", "Address": ""}),
            "unknown pool",
        ),
        (
            "IpamDriver.RequestAddress",
            json!({"PoolID": pool_id, "Address": "10.1.1.1"}),
            "not a host address",
        ),
        ("NetworkDriver.Nonsense", json!({}), "unknown plugin call"),
    ] {
        let e = err(&sock, method, body);
        assert!(e.contains(says), "{method}: {e:?} should say {says:?}");
    }
    ok(
        &sock,
        "NetworkDriver.CreateEndpoint",
        json!({"NetworkID": NET, "EndpointID": "cdcdcdcdcdcdcdcd", "Interface": {"Address": "10.99.0.30/24"}}),
    );
    for key in [
        "/proc/1/ns/net",
        "/run/netns/../../proc/1/ns/net",
        "relative/netns/x",
        "/tmp/x",
    ] {
        let e = err(
            &sock,
            "NetworkDriver.Join",
            json!({"NetworkID": NET, "EndpointID": "cdcdcdcdcdcdcdcd", "SandboxKey": key}),
        );
        assert!(e.contains("invalid sandbox key"), "{key}: {e}");
    }
    ok(
        &sock,
        "NetworkDriver.DeleteEndpoint",
        json!({"NetworkID": NET, "EndpointID": "cdcdcdcdcdcdcdcd"}),
    );
    let (status, v) = {
        let out = run(
            Command::new("curl")
                .args(["-s", "-w", "\n%{http_code}", "-X", "POST", "--unix-socket"])
                .arg(&sock)
                .args(["http://plugin/NetworkDriver.Join", "-d", "{not json"]),
            secs(30),
        );
        let out = text(&out.stdout);
        let (b, s) = out.rsplit_once('\n').unwrap_or(("", "0"));
        (s.to_owned(), b.to_owned())
    };
    assert_eq!(status, "400", "{v}");
    assert!(v.contains("\"Err\""), "{v}");
    assert_eq!(d.ok(&["network", "inspect", &name]), before);
    let e = d.fails(&["network", "rm", &name]);
    assert!(e.contains("docker network rm"), "{e}");

    // Leave, DeleteEndpoint, DeleteNetwork: nothing of it is left.
    ok(
        &sock,
        "NetworkDriver.RevokeExternalConnectivity",
        json!({"NetworkID": NET, "EndpointID": EP}),
    );
    ok(
        &sock,
        "NetworkDriver.Leave",
        json!({"NetworkID": NET, "EndpointID": EP}),
    );
    ok(
        &sock,
        "NetworkDriver.DeleteEndpoint",
        json!({"NetworkID": NET, "EndpointID": EP}),
    );
    ok(
        &sock,
        "NetworkDriver.DeleteEndpoint",
        json!({"NetworkID": NET, "EndpointID": EP}),
    );
    assert_eq!(sandbox.links(), vec!["lo"], "the TAP is gone");
    ok(
        &sock,
        "NetworkDriver.DeleteNetwork",
        json!({"NetworkID": NET}),
    );
    ok(&sock, "IpamDriver.ReleasePool", json!({"PoolID": pool_id}));
    assert!(!d.ok(&["network", "ls"]).contains(&name));
    let listening = run(
        Command::new("ip").args(["netns", "exec", &d.ns.name, "ss", "-Htln", "sport = :18095"]),
        secs(10),
    );
    assert!(
        text(&listening.stdout).trim().is_empty(),
        "port still bound"
    );

    // The socket goes with the daemon.
    d.signal("TERM");
    assert!(
        wait_until(secs(10), || !sock.exists()),
        "plugin socket left behind"
    );
    let _ = std::fs::remove_dir_all(sock.parent().expect("dir"));
}

#[test]
#[ignore = "needs root (network namespaces); run by scripts/test.sh as root"]
fn a_docker_network_adopts_vswitch_s_own_network_of_the_same_subnet() {
    require_root();
    let (d, sock) = plugin_daemon();
    d.ok(&["network", "create", "--subnet", "10.97.0.0/24", "shared"]);
    // Adopting takes the network as it is: an --internal Docker network cannot adopt an open one.
    ok(
        &sock,
        "IpamDriver.RequestPool",
        json!({"Pool":"10.97.0.0/24","SubPool":"","V6":false}),
    );
    let e = err(
        &sock,
        "NetworkDriver.CreateNetwork",
        json!({"NetworkID": "abcdefabcdefabcdef", "Options": {"com.docker.network.internal": true},
               "IPv4Data": [{"AddressSpace":"vswitch-local","Pool":"10.97.0.0/24","Gateway":"10.97.0.1/24"}]}),
    );
    assert!(e.contains("internal"), "{e}");
    let pool = ok(
        &sock,
        "IpamDriver.RequestPool",
        json!({"Pool":"10.97.0.0/24","SubPool":"","V6":false}),
    );
    ok(
        &sock,
        "NetworkDriver.CreateNetwork",
        json!({"NetworkID": NET, "IPv4Data": [{"AddressSpace":"vswitch-local","Pool":"10.97.0.0/24","Gateway":"10.97.0.1/24"}]}),
    );
    let ls = d.ok(&["network", "ls"]);
    assert!(ls.contains("shared") && !ls.contains("docker-"), "{ls}");
    // Docker's endpoints get addresses that vswitch's own do not hold.
    let ns = Netns::new("own");
    d.ok(&["attach", "--network", "shared", &ns.name]);
    let own = d.ip_of("shared", &ns.name);
    let a = ok(
        &sock,
        "IpamDriver.RequestAddress",
        json!({"PoolID": pool["PoolID"], "Address": ""}),
    );
    assert_ne!(a["Address"], format!("{own}/24"));
    // ... and vswitch's own attach does not take the address Docker holds.
    let other = Netns::new("own2");
    d.ok(&["attach", "--network", "shared", &other.name]);
    assert_ne!(
        format!("{}/24", d.ip_of("shared", &other.name)),
        a["Address"].as_str().expect("address")
    );
    d.ok(&["detach", &other.name]);
    // docker network rm lets go of it: vswitch's network and endpoint stay.
    ok(
        &sock,
        "NetworkDriver.DeleteNetwork",
        json!({"NetworkID": NET}),
    );
    assert_eq!(d.ip_of("shared", &ns.name), own);
    d.ok(&["detach", &ns.name]);
    d.ok(&["network", "rm", "shared"]);
}

#[test]
#[ignore = "needs root (network namespaces, TAP devices); run by scripts/test.sh as root"]
fn dual_stack_and_driver_options_reach_the_network() {
    require_root();
    let (d, sock) = plugin_daemon();
    let v4 = ok(
        &sock,
        "IpamDriver.RequestPool",
        json!({"Pool":"10.96.0.0/24","SubPool":"","V6":false}),
    );
    let v6 = ok(
        &sock,
        "IpamDriver.RequestPool",
        json!({"Pool":"","SubPool":"","V6":true}),
    );
    let subnet6 = v6["Pool"].as_str().expect("v6 pool").to_owned();
    assert!(
        subnet6.starts_with("fd") && subnet6.ends_with("/64"),
        "{subnet6}"
    );
    let gw6 = ok(
        &sock,
        "IpamDriver.RequestAddress",
        json!({"PoolID": v6["PoolID"], "Address": "", "Options": {"RequestAddressType":"com.docker.network.gateway"}}),
    );
    let gw6 = gw6["Address"].as_str().expect("gateway").to_owned();
    ok(
        &sock,
        "NetworkDriver.CreateNetwork",
        json!({"NetworkID": NET, "Options": {"com.docker.network.enable_ipv6": true,
               "com.docker.network.generic": {"com.docker.network.driver.mtu": "1400"}},
               "IPv4Data": [{"AddressSpace":"vswitch-local","Pool":"10.96.0.0/24","Gateway":"10.96.0.1/24"}],
               "IPv6Data": [{"Pool": subnet6, "Gateway": gw6}]}),
    );
    let net = d.inspect(&format!("docker-{}", &NET[..12]));
    assert_eq!(net["EnableIPv6"], true, "{net}");
    assert_eq!(
        net["Options"]["com.docker.network.driver.mtu"], "1400",
        "{net}"
    );
    let a6 = ok(
        &sock,
        "IpamDriver.RequestAddress",
        json!({"PoolID": v6["PoolID"], "Address": ""}),
    );
    let a4 = ok(
        &sock,
        "IpamDriver.RequestAddress",
        json!({"PoolID": v4["PoolID"], "Address": ""}),
    );
    ok(
        &sock,
        "NetworkDriver.CreateEndpoint",
        json!({"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": a4["Address"], "AddressIPv6": a6["Address"], "MacAddress": "02:42:0a:60:00:02"}}),
    );
    let sandbox = Netns::new("sb6");
    let joined = ok(
        &sock,
        "NetworkDriver.Join",
        json!({"NetworkID": NET, "EndpointID": EP, "SandboxKey": sandbox.path()}),
    );
    assert_eq!(
        joined["GatewayIPv6"].as_str(),
        gw6.split('/').next(),
        "{joined}"
    );
    let src = joined["InterfaceName"]["SrcName"]
        .as_str()
        .expect("SrcName");
    let mtu = text(
        &run(
            Command::new("ip").args(["-n", &d.ns.name, "-o", "link", "show", "dev", src]),
            secs(10),
        )
        .stdout,
    );
    assert!(
        mtu.contains("mtu 1400") && mtu.contains("02:42:0a:60:00:02"),
        "{mtu}"
    );
    ok(
        &sock,
        "NetworkDriver.Leave",
        json!({"NetworkID": NET, "EndpointID": EP}),
    );
    ok(
        &sock,
        "NetworkDriver.DeleteEndpoint",
        json!({"NetworkID": NET, "EndpointID": EP}),
    );
    ok(
        &sock,
        "NetworkDriver.DeleteNetwork",
        json!({"NetworkID": NET}),
    );
}
