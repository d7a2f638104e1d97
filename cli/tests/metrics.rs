//! `GET /metrics` (issue 19): on the control socket and on `--metrics-addr`, checked by
//! promtool, scraped by a real Prometheus (Debian's `prometheus`, in the daemon's namespace,
//! on a temporary data directory), and moving with known traffic.

use std::process::Command;

use vswitch_tests::{
    Daemon, Netns, NsDaemon, TempDir, curl, require_root, run_with_input, secs, text, wait_until,
};

const ADDR: &str = "127.0.0.1:9477";

/// The body of `GET /metrics` on the control socket (classic text format).
fn scrape(d: &Daemon) -> String {
    let raw = d.raw(b"GET /metrics HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n");
    let t = text(&raw);
    t.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// The value of the sample whose name and labels are `series`, exactly.
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// What Prometheus's instant query `q` returns, as the first result's value.
fn query(ns: &str, q: &str) -> Option<f64> {
    let (_, out) = curl(
        ns,
        &[
            "-G",
            "http://127.0.0.1:9090/api/v1/query",
            "--data-urlencode",
            &format!("query={q}"),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[test]
#[ignore = "needs root (network namespaces, TAP devices) and prometheus; run by scripts/test.sh as root"]
fn metrics_follow_traffic_and_a_real_prometheus_scrapes_them() {
    require_root();
    let d = Daemon::start_with(&["--metrics-addr", ADDR]);
    d.ok(&["network", "create", "web"]);
    let a = Netns::new("a");
    let b = Netns::new("b");
    d.ok(&["attach", "--network", "web", "--name", "ma", &a.name]);
    d.ok(&["attach", "--network", "web", "--name", "mb", &b.name]);

    let before = scrape(&d);
    let rx = "vswitch_port_receive_packets_total{network=\"web\",endpoint=\"ma\"}";
    let rx0 = value(&before, rx).expect("ma's receive counter");
    // Known traffic: 20 pings from ma by name (a local DNS answer), one name that is nowhere.
    let out = a.exec(
        &["ping", "-c", "20", "-i", "0.01", "-W", "2", "mb"],
        secs(20),
    );
    assert!(out.status.success(), "{}", text(&out.stdout));
    let nx = a.dig(&["+short", "nosuchname"]);
    assert!(nx.trim().is_empty(), "{nx}");

    let after = scrape(&d);
    let rx1 = value(&after, rx).expect("ma's receive counter");
    assert!(rx1 - rx0 >= 20.0, "{rx0} -> {rx1}");
    for (series, at_least) in [
        ("vswitch_endpoints{network=\"web\"}", 2.0),
        ("vswitch_fdb_entries{network=\"web\"}", 3.0),
        (
            "vswitch_dns_queries_total{network=\"web\",answered=\"local\",rcode=\"NOERROR\"}",
            1.0,
        ),
        (
            "vswitch_dns_queries_total{network=\"web\",answered=\"local\",rcode=\"NXDOMAIN\"}",
            1.0,
        ),
        ("vswitch_attach_duration_seconds_count", 2.0),
        ("vswitch_build_info{version=\"0.1.0\"}", 1.0),
    ] {
        let v = value(&after, series).unwrap_or(-1.0);
        assert!(v >= at_least, "{series} = {v}\n{after}");
    }
    let exact_endpoints = value(&after, "vswitch_endpoints{network=\"web\"}");
    assert_eq!(exact_endpoints, Some(2.0));

    // promtool takes the text as it is.
    let check = run_with_input(
        Command::new("promtool").args(["check", "metrics"]),
        Some(after.as_bytes()),
        secs(20),
    );
    assert!(
        check.status.success(),
        "promtool: {}{}",
        text(&check.stdout),
        text(&check.stderr)
    );

    // --metrics-addr serves the same, and nothing of the control API.
    let (_, tcp) = curl(&d.ns.name, &[&format!("http://{ADDR}/metrics")]);
    assert!(tcp.contains(rx), "{tcp}");
    let (_, code) = curl(
        &d.ns.name,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{ADDR}/networks"),
        ],
    );
    assert_eq!(code, "404");

    // A real Prometheus scrapes it (OpenMetrics, negotiated) and answers a query with the
    // traffic's count.
    let dir = TempDir(std::env::temp_dir().join(vswitch_tests::unique("-prom")));
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let config = dir.0.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: vswitch\n    \
             static_configs:\n      - targets: ['{ADDR}']\n"
        ),
    )
    .expect("config");
    let data = dir.0.join("data");
    let _prom = NsDaemon::spawn(
        &d.ns.name,
        &[
            "prometheus",
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", data.display()),
            "--web.listen-address=127.0.0.1:9090",
        ],
    );
    let q = format!("{rx} >= {}", rx0 + 20.0);
    let seen = wait_until(secs(40), || query(&d.ns.name, &q).is_some());
    assert!(seen, "Prometheus never returned {q}");
}
