//! `vswitch` as a CNI plugin, driven the way a runtime drives it (CNI's own plugin tests do the
//! same): an environment, a configuration on stdin, and the exact result or error JSON on
//! stdout. Against a real daemon and real namespaces.

use std::process::Command;

use serde_json::{Value, json};
use vswitch_tests::{
    Daemon, Netns, NsDaemon, require_root, run_with_input, secs, text, vswitch_bin, wait_until,
};

/// A CNI invocation: what came out on stdout (JSON, or null when empty) and whether it
/// exited 0.
struct Reply {
    ok: bool,
    out: Value,
}

fn plugin(env: &[(&str, &str)], stdin: &str) -> Reply {
    let mut cmd = Command::new(vswitch_bin());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run_with_input(&mut cmd, Some(stdin.as_bytes()), secs(30));
    let stdout = text(&out.stdout);
    let value = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout:?}"))
    };
    Reply {
        ok: out.status.success(),
        out: value,
    }
}

fn conf(d: &Daemon, network: &str, version: &str, extra: Value) -> String {
    let mut c = json!({
        "cniVersion": version,
        "name": network,
        "type": "vswitch",
        "socket": d.socket,
    });
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(extra.clone());
    }
    c.to_string()
}

/// A plugin's environment, as pairs.
type Env<'a> = Vec<(&'a str, &'a str)>;

fn env<'a>(command: &'a str, id: &'a str, netns: &'a str) -> Env<'a> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
    ]
}

/// The error JSON's code, insisting on a failed exit and the spec's shape.
fn error_code(r: &Reply) -> u64 {
    assert!(!r.ok, "should have failed: {}", r.out);
    assert!(r.out["msg"].is_string(), "{}", r.out);
    assert!(r.out["cniVersion"].is_string(), "{}", r.out);
    r.out["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("no code: {}", r.out))
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn add_check_del_and_gc_as_a_runtime_calls_them() {
    require_root();
    let mut d = Daemon::start();
    d.ok(&["network", "create", "cni", "--subnet", "10.126.0.0/24"]);
    let a = Netns::new("a");
    let b = Netns::new("b");
    let a_path = format!("/run/netns/{}", a.name);
    let b_path = format!("/run/netns/{}", b.name);

    // VERSION needs no daemon.
    let v = plugin(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
    assert!(v.ok);
    assert_eq!(
        v.out,
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]})
    );

    // ADD, with podman's CNI_ARGS and runtimeConfig.
    let mut add_env = env("ADD", "aaaa1111bbbb2222cccc", &a_path);
    add_env.push((
        "CNI_ARGS",
        "IgnoreUnknown=1;K8S_POD_NAME=web1;K8S_POD_NAMESPACE=web1",
    ));
    let rc = json!({"runtimeConfig": {
        "portMappings": [{"hostPort": 18089, "containerPort": 8080, "protocol": "tcp", "hostIP": ""}],
        "ips": ["10.126.0.50/24"],
        "mac": "02:00:00:12:34:56",
        "aliases": {"cni": ["www"]},
    }});
    let added = plugin(&add_env, &conf(&d, "cni", "1.0.0", rc.clone()));
    assert!(added.ok, "{}", added.out);
    assert_eq!(
        added.out,
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "mac": "02:00:00:12:34:56", "sandbox": a_path}],
            "ips": [{"interface": 0, "address": "10.126.0.50/24", "gateway": "10.126.0.1"}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.126.0.1"}],
            "dns": {"nameservers": ["10.126.0.1"]},
        })
    );
    assert_eq!(d.ip_of("cni", "web1"), "10.126.0.50");
    assert!(
        a.addrs("eth0").contains("10.126.0.50/24"),
        "{}",
        a.addrs("eth0")
    );
    assert!(d.ok(&["port", "web1"]).contains("18089"));

    // A second container, 0.4.0 (podman 4's conversion), named from the container id.
    let b_env = env("ADD", "dddd3333eeee4444ffff", &b_path);
    let b_added = plugin(&b_env, &conf(&d, "cni", "0.4.0", json!({})));
    assert!(b_added.ok, "{}", b_added.out);
    assert_eq!(b_added.out["cniVersion"], "0.4.0");
    assert_eq!(b_added.out["ips"][0]["version"], "4");
    assert!(
        d.ok(&["network", "inspect", "cni"])
            .contains("dddd3333eeee")
    );
    // They reach each other, and the gateway's DNS knows the name and the alias (the engine
    // writes the container's resolv.conf from the result's dns).
    assert!(b.ping_within("10.126.0.50", secs(5)));
    let named = |what: &str| b.dig(&["@10.126.0.1", "+short", what]).trim().to_owned();
    assert_eq!(named("web1"), "10.126.0.50");
    assert_eq!(named("www"), "10.126.0.50");

    // ADD again for the same container and interface: an error, and nothing changes.
    let again = plugin(&add_env, &conf(&d, "cni", "1.0.0", rc.clone()));
    assert_eq!(error_code(&again), 100, "{}", again.out);
    assert_eq!(d.ip_of("cni", "web1"), "10.126.0.50");

    // CHECK against the ADD's result; then against a result that is not what was made.
    let mut prev = json!({"prevResult": added.out});
    let check = plugin(
        &env("CHECK", "aaaa1111bbbb2222cccc", &a_path),
        &conf(&d, "cni", "1.0.0", prev.clone()),
    );
    assert!(check.ok, "{}", check.out);
    assert_eq!(check.out, Value::Null);
    prev["prevResult"]["ips"][0]["address"] = json!("10.126.0.99/24");
    let check = plugin(
        &env("CHECK", "aaaa1111bbbb2222cccc", &a_path),
        &conf(&d, "cni", "1.0.0", prev),
    );
    assert_eq!(error_code(&check), 101, "{}", check.out);

    // The attachment outlives a daemon killed with SIGKILL.
    d.kill9_and_restart();
    assert!(
        b.ping_within("10.126.0.50", secs(10)),
        "back after a restart"
    );
    assert_eq!(named("web1"), "10.126.0.50");

    // GC with only b listed (the older key libcni also sends) removes a.
    let gc = plugin(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/usr/lib/cni")],
        &conf(
            &d,
            "cni",
            "1.1.0",
            json!({"cni.dev/attachments": [{"containerID": "dddd3333eeee4444ffff", "ifname": "eth0"}]}),
        ),
    );
    assert!(gc.ok, "{}", gc.out);
    let inspect = d.ok(&["network", "inspect", "cni"]);
    assert!(
        !inspect.contains("web1") && inspect.contains("dddd3333eeee"),
        "{inspect}"
    );
    assert!(!a.links().contains(&"eth0".to_owned()), "{:?}", a.links());

    // DEL is idempotent, and so is DEL of a network that does not exist.
    for _ in 0..2 {
        let del = plugin(
            &env("DEL", "dddd3333eeee4444ffff", &b_path),
            &conf(&d, "cni", "1.0.0", json!({})),
        );
        assert!(del.ok, "{}", del.out);
        assert_eq!(del.out, Value::Null);
    }
    assert!(
        !d.ok(&["network", "inspect", "cni"])
            .contains("dddd3333eeee")
    );
    let del = plugin(
        &env("DEL", "dddd3333eeee4444ffff", &b_path),
        &conf(&d, "nosuch", "1.0.0", json!({})),
    );
    assert!(del.ok, "{}", del.out);

    // STATUS: ready.
    let status = plugin(
        &[("CNI_COMMAND", "STATUS")],
        &conf(&d, "cni", "1.1.0", json!({})),
    );
    assert!(status.ok, "{}", status.out);
    assert_eq!(status.out, Value::Null);

    // `vswitch cni config` prints the conflist this test wrote by hand.
    let conflist: Value =
        serde_json::from_str(&d.ok(&["cni", "config", "cni"])).expect("conflist JSON");
    assert_eq!(
        conflist,
        json!({"cniVersion": "1.0.0", "name": "cni", "plugins": [{
            "type": "vswitch", "network": "cni", "socket": d.socket,
            "capabilities": {"portMappings": true, "ips": true, "mac": true, "aliases": true}}]})
    );
    assert!(
        d.fails(&["cni", "config", "nosuch"])
            .contains("network nosuch not found")
    );
}

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn bad_input_gets_the_specs_error_codes_and_changes_nothing() {
    require_root();
    let d = Daemon::start();
    d.ok(&["network", "create", "cni", "--subnet", "10.127.0.0/24"]);
    let a = Netns::new("a");
    let a_path = format!("/run/netns/{}", a.name);
    let good = conf(&d, "cni", "1.0.0", json!({}));
    let before = d.ok(&["network", "inspect", "cni"]);

    // Missing CNI_NETNS: exactly the spec's error JSON.
    let r = plugin(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ],
        &good,
    );
    assert!(!r.ok);
    assert_eq!(
        r.out,
        json!({"cniVersion": "1.0.0", "code": 4, "msg": "CNI_NETNS is required for ADD"})
    );
    let cases: Vec<(Env, String, u64)> = vec![
        // Unknown network.
        (
            env("ADD", "c1", &a_path),
            conf(&d, "nosuch", "1.0.0", json!({})),
            7,
        ),
        // Malformed JSON.
        (env("ADD", "c1", &a_path), "{not json".to_owned(), 6),
        // A version it does not speak.
        (
            env("ADD", "c1", &a_path),
            conf(&d, "cni", "0.2.0", json!({})),
            1,
        ),
        // A namespace that does not exist.
        (
            env("ADD", "c1", "/run/netns/vswitch-no-such-ns"),
            good.clone(),
            3,
        ),
        // CNI_ARGS with a key it does not know, and no IgnoreUnknown.
        (
            {
                let mut e = env("ADD", "c1", &a_path);
                e.push(("CNI_ARGS", "FOO=bar"));
                e
            },
            good.clone(),
            4,
        ),
        // A port protocol it does not carry.
        (
            env("ADD", "c1", &a_path),
            conf(
                &d,
                "cni",
                "1.0.0",
                json!({"runtimeConfig": {"portMappings": [
                    {"hostPort": 18090, "containerPort": 80, "protocol": "sctp"}]}}),
            ),
            2,
        ),
        // An address outside the subnet.
        (
            env("ADD", "c1", &a_path),
            conf(
                &d,
                "cni",
                "1.0.0",
                json!({"runtimeConfig": {"ips": ["192.0.2.5/24"]}}),
            ),
            7,
        ),
        // CHECK of an attachment that does not exist.
        (env("CHECK", "c1", &a_path), good.clone(), 3),
        // An unknown command.
        (env("FROB", "c1", &a_path), good.clone(), 4),
    ];
    for (e, stdin, want) in &cases {
        let r = plugin(e, stdin);
        assert_eq!(error_code(&r), *want, "{e:?} {stdin}: {}", r.out);
    }
    assert_eq!(
        d.ok(&["network", "inspect", "cni"]),
        before,
        "nothing changed"
    );
    assert_eq!(a.links(), vec!["lo"], "no interface left behind");

    // A daemon that is down: ADD may be tried again later, STATUS says not available.
    let down = json!({"cniVersion": "1.1.0", "name": "cni", "type": "vswitch",
        "socket": "/run/vswitch-test-no-such.sock"})
    .to_string();
    assert_eq!(error_code(&plugin(&env("ADD", "c1", &a_path), &down)), 11);
    assert_eq!(error_code(&plugin(&[("CNI_COMMAND", "STATUS")], &down)), 50);
    // A taken host port fails the ADD and leaves no endpoint, name or interface behind.
    let _holder = NsDaemon::spawn(
        &d.ns.name,
        &[
            "python3",
            "-c",
            "import socket, time\ns = socket.socket()\ns.bind(('0.0.0.0', 18091))\n\
             s.listen()\ntime.sleep(60)",
        ],
    );
    assert!(wait_until(secs(5), || {
        text(
            &d.ns
                .exec(&["ss", "-Hltn", "sport = :18091"], secs(5))
                .stdout,
        )
        .contains("18091")
    }));
    let mut named = env("ADD", "c2", &a_path);
    named.push(("CNI_ARGS", "K8S_POD_NAME=taken"));
    let r = plugin(
        &named,
        &conf(
            &d,
            "cni",
            "1.0.0",
            json!({"runtimeConfig": {"portMappings": [
                {"hostPort": 18091, "containerPort": 80, "protocol": "tcp"}]}}),
        ),
    );
    assert_eq!(error_code(&r), 100, "{}", r.out);
    assert_eq!(d.ok(&["network", "inspect", "cni"]), before);
    assert_eq!(a.links(), vec!["lo"]);
    let q = Netns::new("q");
    d.ok(&["attach", "--network", "cni", &q.name]);
    let dig = q.dig(&["@10.127.0.1", "taken"]);
    assert!(dig.contains("status: NXDOMAIN"), "{dig}");
}
