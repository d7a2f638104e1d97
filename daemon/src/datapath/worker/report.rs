//! What the datapath thread reports: its MAC table and counters.

use std::time::Instant;

use vswitch_switch::PortId;

use super::{GATEWAY_NAME, TUNNEL_NAME, TunnelPort, Worker};
use crate::api::{FdbRow, NetworkStats, PortStatsRow};

impl Worker {
    pub(super) fn fdb_rows(&self, now: Instant) -> Vec<FdbRow> {
        let mut rows: Vec<FdbRow> = self
            .bridge
            .fdb()
            .iter(now)
            .map(|(mac, port, age)| FdbRow {
                mac_address: mac.to_string(),
                port: port.index() as u32,
                endpoint: self.port_name(port),
                age_seconds: (age.as_millis() as f64) / 1000.0,
            })
            .collect();
        rows.sort_by(|a, b| a.port.cmp(&b.port).then(a.mac_address.cmp(&b.mac_address)));
        rows
    }

    pub(super) fn stats(&self) -> NetworkStats {
        let ports = self
            .bridge
            .ports()
            .filter_map(|p| {
                let s = self.bridge.port_stats(p)?;
                // The gateway's frames from host sockets that never got in count as drops on
                // its way into the switch.
                let backlog_drops = if p == self.gateway_port {
                    self.injector.dropped()
                } else {
                    0
                };
                Some(PortStatsRow {
                    port: p.index() as u32,
                    endpoint: self.port_name(p),
                    rx_frames: s.rx_frames,
                    rx_bytes: s.rx_bytes,
                    rx_dropped: s.rx_dropped + backlog_drops,
                    tx_frames: s.tx_frames,
                    tx_bytes: s.tx_bytes,
                    tx_dropped: s.tx_dropped,
                })
            })
            .collect();
        let b = self.bridge.stats();
        let fdb = self.bridge.fdb_events();
        NetworkStats {
            network: self.network_name.clone(),
            ports,
            malformed: b.malformed,
            invalid_source: b.invalid_source,
            learn_refused: b.learn_refused,
            flooded: b.flooded,
            fdb_entries: self.bridge.fdb().len(),
            spoofed: b.spoofed,
            too_big: b.too_big,
            tcp_flows: self.gateway.tcp_flows(),
            tcp_large_flows: self.gateway.tcp_large_flows(),
            udp_flows: self.services.udp.len(),
            icmp_flows: self.services.icmp.len(),
            tunnel: self.tunnel.as_ref().map(TunnelPort::stats),
            backlog_dropped: self.injector.dropped() + self.tunnel_injector.dropped(),
            udp_flows_evicted: self.services.udp_evicted,
            icmp_flows_refused: self.services.icmp_refused,
            tcp_flows_refused: self.gateway.tcp_flows_refused(),
            fdb_learned: fdb.learned,
            fdb_moved: fdb.moved,
            fdb_aged: fdb.aged,
            dns: crate::api::DnsCounters {
                local: self.services.dns_local.to_vec(),
                upstream: self.injector.upstream_rcodes(),
                refused: self.services.dns_refused,
            },
        }
    }

    fn port_name(&self, port: PortId) -> String {
        if port == self.gateway_port {
            return GATEWAY_NAME.to_owned();
        }
        if self.tunnel.as_ref().is_some_and(|t| t.port == port) {
            return TUNNEL_NAME.to_owned();
        }
        match self.ports.get(port.index()) {
            Some(Some(io)) => io.endpoint_name.clone(),
            _ => String::new(),
        }
    }
}
