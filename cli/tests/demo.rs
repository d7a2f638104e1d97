//! The README's main job: `vswitch demo` must work on a clean machine.

use std::time::Duration;

use vswitch_tests::{Netns, require_root, run, text, vswitch_bin};

#[test]
#[ignore = "privileged: needs root and network namespaces; .ci/run runs it with --ignored"]
fn the_demo_runs_every_step_and_cleans_up() {
    require_root();
    // The demo runs its daemon in the namespace it is started in; give it a fresh one (with
    // loopback up, as on a host) so the test touches nothing of the machine's.
    let host = Netns::new("demo");
    let lo = run(
        std::process::Command::new("ip").args(["-n", &host.name, "link", "set", "lo", "up"]),
        Duration::from_secs(5),
    );
    assert!(lo.status.success());
    let out = run(
        std::process::Command::new("ip")
            .args(["netns", "exec", &host.name])
            .arg(vswitch_bin())
            .arg("demo"),
        Duration::from_secs(180),
    );
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        text(&out.stderr)
    );
    for step in [
        "$ vswitch network ls",
        "you_network",
        "$ vswitch exec tomcat81 -- ping",
        "3 received",
        "hello from tomcat81",
        "hello from tomcat82",
        "container:tomcat81",
        "\"Name\": \"you_network\"",
        "demo OK",
    ] {
        assert!(stdout.contains(step), "missing {step:?} in:\n{stdout}");
    }
    // Nothing left running: no container process of the demo.
    let ps = run(
        std::process::Command::new("ps").args(["-eo", "args"]),
        Duration::from_secs(5),
    );
    assert!(
        !text(&ps.stdout).contains("vswitch-demo-"),
        "demo containers left running"
    );
}
