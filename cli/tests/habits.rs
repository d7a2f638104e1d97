//! The Docker user's habits (issue 19): `ps -q` and `--format json`, `inspect NAME`,
//! `network ls --filter`, `version`, `info`, shell completions and man pages.

use std::process::Command;

use vswitch_tests::{Daemon, Netns, TempDir, require_root, run, secs, text, vswitch_bin};

fn vswitch(args: &[&str]) -> std::process::Output {
    run(Command::new(vswitch_bin()).args(args), secs(20))
}

#[test]
fn completions_and_man_pages_are_generated() {
    let bash = vswitch(&["completion", "bash"]);
    assert!(bash.status.success());
    let script = text(&bash.stdout);
    assert!(
        script.contains("vswitch") && script.contains("network"),
        "{script}"
    );
    let check = vswitch_tests::run_with_input(
        Command::new("bash").args(["-n"]),
        Some(script.as_bytes()),
        secs(10),
    );
    assert!(check.status.success(), "bash -n: {}", text(&check.stderr));
    let zsh = text(&vswitch(&["completion", "zsh"]).stdout);
    assert!(zsh.starts_with("#compdef vswitch"), "{zsh}");
    let fish = text(&vswitch(&["completion", "fish"]).stdout);
    assert!(fish.contains("complete -c vswitch"), "{fish}");
    let bad = vswitch(&["completion", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2));

    let dir = TempDir(std::env::temp_dir().join(vswitch_tests::unique("-man")));
    let out = vswitch(&["man", dir.0.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for page in [
        "vswitch.1",
        "vswitch-network-ls.1",
        "vswitch-ps.1",
        "vswitch-network-peer-add.1",
    ] {
        let body = std::fs::read_to_string(dir.0.join(page)).unwrap_or_default();
        assert!(body.contains(".TH"), "{page}: {body}");
    }
    assert!(
        !dir.0.join("vswitch-help.1").exists(),
        "no pages for clap's help"
    );
    let ls = std::fs::read_to_string(dir.0.join("vswitch-network-ls.1")).unwrap_or_default();
    assert!(ls.contains("filter"), "{ls}");
}

#[test]
#[ignore = "needs root (network namespaces, TAP devices); run by scripts/test.sh as root"]
fn ps_inspect_ls_filters_version_and_info_answer_as_docker_users_expect() {
    require_root();
    let d = Daemon::start();
    d.ok(&["network", "create", "frontend"]);
    d.ok(&["network", "create", "backend"]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "web1",
        "--network",
        "frontend",
        "--",
        "sleep",
        "300",
    ]);
    let bare = Netns::new("bare");
    d.ok(&[
        "attach",
        "--network",
        "backend",
        "--name",
        "lonely",
        &bare.name,
    ]);

    // ps -q: the short ids, one per line; --format json: one object per line.
    let ids = d.ok(&["ps", "-q"]);
    let ids: Vec<&str> = ids.lines().collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(ids[0].len(), 12);
    let json = d.ok(&["ps", "--format", "json"]);
    let line: serde_json::Value = serde_json::from_str(json.trim()).expect("one JSON object");
    assert_eq!(line["Names"], "web1");
    assert_eq!(line["ID"], ids[0]);
    assert_eq!(line["State"], "running");
    let e = d.fails(&["ps", "--format", "yaml"]);
    assert!(e.contains("unknown --format"), "{e}");

    // inspect: a container and a bare endpoint, shaped like docker inspect.
    let v: serde_json::Value =
        serde_json::from_str(&d.ok(&["inspect", "web1", "lonely"])).expect("a JSON array");
    assert_eq!(v[0]["Name"], "/web1");
    assert_eq!(v[0]["State"]["Running"], true);
    let ip = v[0]["NetworkSettings"]["Networks"]["frontend"]["IPAddress"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(ip.starts_with("172."), "{v}");
    assert_eq!(d.ip_of("frontend", "web1"), ip);
    assert_eq!(v[1]["Name"], "/lonely");
    assert!(v[1]["NetworkSettings"]["Networks"]["backend"]["MacAddress"].is_string());
    let e = d.fails(&["inspect", "nobody"]);
    assert!(e.contains("no such container or endpoint: nobody"), "{e}");

    // network ls --filter.
    let names = d.ok(&[
        "network",
        "ls",
        "--filter",
        "name=front",
        "--format",
        "json",
    ]);
    let names: Vec<serde_json::Value> = names
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert_eq!(names.len(), 1);
    assert_eq!(names[0]["Name"], "frontend");
    let q = d.ok(&[
        "network",
        "ls",
        "-q",
        "-f",
        "name=end",
        "-f",
        "driver=vswitch",
    ]);
    assert_eq!(q.lines().count(), 2, "{q}");
    let e = d.fails(&["network", "ls", "--filter", "label=x"]);
    assert!(e.contains("unknown filter"), "{e}");

    // version and info.
    let v = d.ok(&["version"]);
    let want = format!("Daemon: vswitch {}", env!("CARGO_PKG_VERSION"));
    assert!(v.contains(&want), "{v}");
    let info = d.ok(&["info"]);
    for want in [
        "Networks: 3",
        "Endpoints: 2",
        "Containers: 1 (1 running)",
        "Rootless: false",
        "Features: dns, nat",
    ] {
        assert!(info.contains(want), "{want:?} not in\n{info}");
    }
    assert!(
        info.contains(&format!("State directory: {}", d.state.display())),
        "{info}"
    );
}
