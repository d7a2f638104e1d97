//! A Linux kernel VXLAN endpoint, for interop tests of overlay networks.

use std::process::Command;
use std::time::Duration;

use crate::{Netns, run, text};

/// A Linux VXLAN endpoint for interop tests: in namespace `host`, `vx0` (VNI `vni`, port 4789,
/// from `local`) on bridge `br0`, flooding to each of `flood`; and a new "container" namespace
/// behind a veth on that bridge, holding `ip`/24 with MTU 1450.
pub fn kernel_vtep(host: &str, vni: u32, local: &str, flood: &[&str], ip: &str) -> Netns {
    let kc = Netns::new("kc");
    let sh = |args: &[&str]| {
        let out = run(
            Command::new(args[0]).args(&args[1..]),
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    };
    let vni = vni.to_string();
    let ip = format!("{ip}/24");
    sh(&[
        "ip", "-n", host, "link", "add", "vx0", "type", "vxlan", "id", &vni, "dstport", "4789",
        "local", local,
    ]);
    sh(&["ip", "-n", host, "link", "add", "br0", "type", "bridge"]);
    sh(&[
        "ip", "-n", host, "link", "set", "vx0", "master", "br0", "up",
    ]);
    sh(&["ip", "-n", host, "link", "set", "br0", "up"]);
    for dst in flood {
        sh(&[
            "bridge",
            "-n",
            host,
            "fdb",
            "append",
            "00:00:00:00:00:00",
            "dev",
            "vx0",
            "dst",
            dst,
        ]);
    }
    sh(&[
        "ip", "-n", host, "link", "add", "k0", "type", "veth", "peer", "name", "eth0", "netns",
        &kc.name,
    ]);
    sh(&["ip", "-n", host, "link", "set", "k0", "master", "br0", "up"]);
    sh(&["ip", "-n", &kc.name, "addr", "add", &ip, "dev", "eth0"]);
    sh(&[
        "ip", "-n", &kc.name, "link", "set", "eth0", "mtu", "1450", "up",
    ]);
    sh(&["ip", "-n", &kc.name, "link", "set", "lo", "up"]);
    kc
}
