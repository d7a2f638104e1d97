//! `GET /metrics`: the daemon's counters in the OpenMetrics text format (which Prometheus
//! scrapes), encoded by `prometheus-client`.
//!
//! The datapath's counters are not read through shared memory: each scrape asks every
//! datapath for its counters by message ([`crate::api::NetworkStats`], the same snapshot as
//! `vswitch stats`), between two frames, and a registry is built from the answers. Nothing on
//! the hot path takes a lock or touches an atomic for metrics. The histograms are the
//! exception: they live here, fed by the control plane (attach) and the DNS relay (upstream
//! answers), off the datapath.
//!
//! Label sets are bounded: networks, endpoints, reasons, protocols and response codes. No label
//! carries a client's address or a queried name.

pub mod http;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::api::NetworkStats;

/// The content type of what [`render`] returns.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of [`to_classic`]'s text.
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a client's `Accept` header asks for OpenMetrics (Prometheus does); everybody else
/// (curl, promtool, older scrapers) gets the classic text format.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// The body and content type of a scrape whose request had `headers`.
pub fn negotiate(headers: &hyper::HeaderMap, openmetrics: String) -> (String, &'static str) {
    let accept = headers
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    if wants_openmetrics(accept) {
        (openmetrics, CONTENT_TYPE)
    } else {
        (to_classic(&openmetrics), CLASSIC_CONTENT_TYPE)
    }
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics text from [`render`]: a
/// counter's family is named with its `_total`, as its samples are; an info becomes a gauge
/// named `_info`; the `# EOF` marker goes. Samples are unchanged.
pub fn to_classic(openmetrics: &str) -> String {
    let mut kinds: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            kinds.insert(name, kind);
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta.and_then(|(p, rest)| rest.split_once(' ').map(|(n, tail)| (p, n, tail))) {
            Some((p, name, tail)) => {
                let (suffix, tail) = match (kinds.get(name).copied(), p) {
                    (Some("counter"), _) => ("_total", tail),
                    (Some("info"), "# TYPE ") => ("_info", "gauge"),
                    (Some("info"), _) => ("_info", tail),
                    _ => ("", tail),
                };
                out.push_str(&format!("{p}{name}{suffix} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

type Labels = Vec<(&'static str, String)>;

/// The daemon's long-lived metrics (the rest are taken afresh for each scrape).
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Seconds from a query's relay upstream to its answer.
    pub upstream_latency: Histogram,
    /// Seconds an attach took, from the request to the endpoint being plugged in.
    pub attach_duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            // 0.5 ms to about 4 s.
            upstream_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            // 1 ms to about 16 s.
            attach_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
        }
    }
}

/// What one scrape shows.
pub struct Snapshot {
    pub networks: Vec<NetworkStats>,
    /// Endpoints per network name, including networks whose datapath did not answer.
    pub endpoints: Vec<(String, usize)>,
}

/// DNS response codes as labels (the rest as `other`).
pub fn rcode_name(rcode: usize) -> &'static str {
    match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        _ => "other",
    }
}

fn counter(r: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    r.register(name, help, f.clone());
    f
}

fn gauge(r: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    r.register(name, help, f.clone());
    f
}

fn net(n: &str) -> Labels {
    vec![("network", n.to_owned())]
}

fn with(mut l: Labels, k: &'static str, v: &str) -> Labels {
    l.push((k, v.to_owned()));
    l
}

fn set(g: &Family<Labels, Gauge>, l: &Labels, v: u64) {
    g.get_or_create(l).set(i64::try_from(v).unwrap_or(i64::MAX));
}

/// Counts each `(value of key, count)` of `items` under `base` labels plus `key`.
fn count_by(f: &Family<Labels, Counter>, base: &Labels, key: &'static str, items: &[(&str, u64)]) {
    for &(value, n) in items {
        f.get_or_create(&with(base.clone(), key, value)).inc_by(n);
    }
}

/// The text of one scrape.
pub fn render(s: &Snapshot, m: &Metrics) -> String {
    let mut r = Registry::default();
    r.register(
        "vswitch_build",
        "vswitch's version",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION").to_owned())]),
    );
    ports(&mut r, &s.networks);
    networks(&mut r, s);
    dns(&mut r, &s.networks);
    tunnels(&mut r, &s.networks);
    r.register(
        "vswitch_dns_upstream_duration_seconds",
        "Time from relaying a query upstream to its answer",
        m.upstream_latency.clone(),
    );
    r.register(
        "vswitch_attach_duration_seconds",
        "Time an attach took, request to plugged-in endpoint",
        m.attach_duration.clone(),
    );
    let mut out = String::new();
    // Writing to a String does not fail.
    let _ = encode(&mut out, &r);
    out
}

fn ports(r: &mut Registry, nets: &[NetworkStats]) {
    let rx_bytes = counter(
        r,
        "vswitch_port_receive_bytes",
        "Bytes a port sent into the switch",
    );
    let rx_packets = counter(
        r,
        "vswitch_port_receive_packets",
        "Frames a port sent into the switch",
    );
    let tx_bytes = counter(
        r,
        "vswitch_port_transmit_bytes",
        "Bytes the switch delivered to a port",
    );
    let tx_packets = counter(
        r,
        "vswitch_port_transmit_packets",
        "Frames the switch delivered to a port",
    );
    let rx_drops = counter(
        r,
        "vswitch_port_receive_drops",
        "Frames from a port that the switch dropped, or that never got in (backlog)",
    );
    let tx_drops = counter(
        r,
        "vswitch_port_transmit_drops",
        "Frames a port could not take",
    );
    for n in nets {
        for p in &n.ports {
            let l = with(net(&n.network), "endpoint", &p.endpoint);
            rx_bytes.get_or_create(&l).inc_by(p.rx_bytes);
            rx_packets.get_or_create(&l).inc_by(p.rx_frames);
            tx_bytes.get_or_create(&l).inc_by(p.tx_bytes);
            tx_packets.get_or_create(&l).inc_by(p.tx_frames);
            tx_drops.get_or_create(&l).inc_by(p.tx_dropped);
            rx_drops
                .get_or_create(&with(l, "reason", "port"))
                .inc_by(p.rx_dropped);
        }
    }
}

fn networks(r: &mut Registry, s: &Snapshot) {
    let drops = counter(
        r,
        "vswitch_drops",
        "Frames the switch dropped, by reason (malformed, invalid_source, spoofed, too_big, backlog)",
    );
    let fdb = gauge(r, "vswitch_fdb_entries", "MAC table entries");
    let events = counter(
        r,
        "vswitch_fdb_events",
        "MAC table events: learned, moved (to another port), aged (out), refused (table full)",
    );
    let floods = counter(
        r,
        "vswitch_floods",
        "Frames flooded (broadcast, multicast, unknown unicast)",
    );
    let flows = gauge(
        r,
        "vswitch_nat_flows",
        "NAT and published-port flows, by protocol",
    );
    let large = gauge(
        r,
        "vswitch_nat_tcp_large_flows",
        "TCP flows with large buffers",
    );
    let endpoints = gauge(r, "vswitch_endpoints", "Endpoints attached to a network");
    let nat_lost = counter(
        r,
        "vswitch_nat_flows_lost",
        "NAT flows evicted to make room (UDP) or refused for want of room (ping, TCP)",
    );
    for n in &s.networks {
        let l = net(&n.network);
        count_by(
            &drops,
            &l,
            "reason",
            &[
                ("malformed", n.malformed),
                ("invalid_source", n.invalid_source),
                ("spoofed", n.spoofed),
                ("too_big", n.too_big),
                ("backlog", n.backlog_dropped),
            ],
        );
        count_by(
            &nat_lost,
            &l,
            "outcome",
            &[
                ("udp_evicted", n.udp_flows_evicted),
                ("icmp_refused", n.icmp_flows_refused),
                ("tcp_refused", n.tcp_flows_refused),
            ],
        );
        set(&fdb, &l, n.fdb_entries as u64);
        count_by(
            &events,
            &l,
            "event",
            &[
                ("learned", n.fdb_learned),
                ("moved", n.fdb_moved),
                ("aged", n.fdb_aged),
                ("refused", n.learn_refused),
            ],
        );
        floods.get_or_create(&l).inc_by(n.flooded);
        for (proto, v) in [
            ("tcp", n.tcp_flows),
            ("udp", n.udp_flows),
            ("icmp", n.icmp_flows),
        ] {
            set(&flows, &with(l.clone(), "proto", proto), v as u64);
        }
        set(&large, &l, n.tcp_large_flows as u64);
    }
    for (name, count) in &s.endpoints {
        set(&endpoints, &net(name), *count as u64);
    }
}

fn dns(r: &mut Registry, nets: &[NetworkStats]) {
    let queries = counter(
        r,
        "vswitch_dns_queries",
        "DNS queries by who answered (local, upstream, refused: over the fair share) and response code",
    );
    for n in nets {
        let l = net(&n.network);
        for (answered, codes) in [("local", &n.dns.local), ("upstream", &n.dns.upstream)] {
            for (rcode, &v) in codes.iter().enumerate().filter(|(_, v)| **v > 0) {
                let l = with(
                    with(l.clone(), "answered", answered),
                    "rcode",
                    rcode_name(rcode),
                );
                queries.get_or_create(&l).inc_by(v);
            }
        }
        let l = with(with(l, "answered", "refused"), "rcode", "REFUSED");
        queries.get_or_create(&l).inc_by(n.dns.refused);
    }
}

fn tunnels(r: &mut Registry, nets: &[NetworkStats]) {
    let rx = counter(
        r,
        "vswitch_vxlan_receive_packets",
        "VXLAN packets taken into an overlay network",
    );
    let drops = counter(
        r,
        "vswitch_vxlan_receive_drops",
        "VXLAN packets dropped, by reason",
    );
    let tx = counter(
        r,
        "vswitch_vxlan_transmit_packets",
        "Frames sent to other hosts, by kind",
    );
    let tx_drops = counter(
        r,
        "vswitch_vxlan_transmit_drops",
        "Frames not sent to other hosts: refused by the socket, or over the flood budget",
    );
    for n in nets {
        let Some(t) = &n.tunnel else { continue };
        let l = net(&n.network);
        rx.get_or_create(&l).inc_by(t.rx_packets);
        count_by(
            &drops,
            &l,
            "reason",
            &[
                ("malformed", t.rx_malformed),
                ("foreign_vni", t.rx_foreign_vni),
                ("not_member", t.rx_not_member),
                ("spoofed", t.rx_spoofed),
            ],
        );
        count_by(
            &tx,
            &l,
            "kind",
            &[("unicast", t.tx_unicast), ("flood", t.tx_flooded)],
        );
        count_by(
            &tx_drops,
            &l,
            "reason",
            &[
                ("socket", t.tx_dropped),
                ("flood_budget", t.tx_flood_limited),
            ],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{DnsCounters, PortStatsRow};

    fn stats() -> NetworkStats {
        NetworkStats {
            network: "web".into(),
            ports: vec![PortStatsRow {
                port: 1,
                endpoint: "tomcat82".into(),
                rx_frames: 12,
                rx_bytes: 3400,
                rx_dropped: 2,
                tx_frames: 10,
                tx_bytes: 3000,
                tx_dropped: 0,
            }],
            malformed: 1,
            invalid_source: 0,
            learn_refused: 0,
            flooded: 4,
            fdb_entries: 3,
            spoofed: 5,
            too_big: 0,
            tcp_flows: 2,
            tcp_large_flows: 0,
            udp_flows: 1,
            icmp_flows: 0,
            tunnel: None,
            dns: DnsCounters {
                local: vec![7, 0, 0, 2],
                upstream: vec![1],
                refused: 3,
            },
            backlog_dropped: 9,
            udp_flows_evicted: 0,
            icmp_flows_refused: 0,
            tcp_flows_refused: 0,
            fdb_learned: 6,
            fdb_moved: 1,
            fdb_aged: 0,
        }
    }

    #[test]
    fn a_scrape_names_what_the_datapath_counted() {
        let m = Metrics::default();
        m.upstream_latency.observe(0.003);
        let text = render(
            &Snapshot {
                networks: vec![stats()],
                endpoints: vec![("web".into(), 1), ("idle".into(), 0)],
            },
            &m,
        );
        for line in [
            "vswitch_build_info{version=\"",
            "vswitch_port_receive_bytes_total{network=\"web\",endpoint=\"tomcat82\"} 3400",
            "vswitch_port_transmit_packets_total{network=\"web\",endpoint=\"tomcat82\"} 10",
            "vswitch_port_receive_drops_total{network=\"web\",endpoint=\"tomcat82\",reason=\"port\"} 2",
            "vswitch_drops_total{network=\"web\",reason=\"spoofed\"} 5",
            "vswitch_drops_total{network=\"web\",reason=\"backlog\"} 9",
            "vswitch_fdb_entries{network=\"web\"} 3",
            "vswitch_fdb_events_total{network=\"web\",event=\"learned\"} 6",
            "vswitch_endpoints{network=\"idle\"} 0",
            "vswitch_nat_flows{network=\"web\",proto=\"tcp\"} 2",
            "vswitch_dns_queries_total{network=\"web\",answered=\"local\",rcode=\"NOERROR\"} 7",
            "vswitch_dns_queries_total{network=\"web\",answered=\"local\",rcode=\"NXDOMAIN\"} 2",
            "vswitch_dns_queries_total{network=\"web\",answered=\"upstream\",rcode=\"NOERROR\"} 1",
            "vswitch_dns_queries_total{network=\"web\",answered=\"refused\",rcode=\"REFUSED\"} 3",
            "vswitch_dns_upstream_duration_seconds_count 1",
            "# EOF",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        assert!(
            !text.contains("vswitch_vxlan_receive_packets_total{"),
            "no tunnel, no series"
        );
        // An overlay network's tunnel counters.
        let mut ov = stats();
        ov.network = "ov".into();
        ov.tunnel = Some(crate::api::TunnelStatsRow {
            rx_not_member: 2,
            tx_flooded: 3,
            tx_flood_limited: 4,
            ..Default::default()
        });
        let text = render(
            &Snapshot {
                networks: vec![ov],
                endpoints: vec![],
            },
            &m,
        );
        for line in [
            "vswitch_vxlan_receive_drops_total{network=\"ov\",reason=\"not_member\"} 2",
            "vswitch_vxlan_transmit_packets_total{network=\"ov\",kind=\"flood\"} 3",
            "vswitch_vxlan_transmit_drops_total{network=\"ov\",reason=\"flood_budget\"} 4",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
    }
}
