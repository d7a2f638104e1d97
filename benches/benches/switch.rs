//! Micro-benchmarks of the switch core: per-frame decision cost, with a small and a 10k-entry
//! forwarding database, and flooding.

use std::time::Instant;

use divan::Bencher;
use vswitch_switch::{Bridge, Config, Decision, PortId};

fn main() {
    divan::main();
}

fn frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    f.resize(12 + 1514, 0x45);
    f
}

fn mac(i: u32) -> [u8; 6] {
    let [a, b, c, d] = i.to_be_bytes();
    [0x02, 0x00, a, b, c, d]
}

/// A bridge with `ports` ports and `entries` learned addresses spread over them.
fn bridge(ports: usize, entries: u32) -> (Bridge, Vec<PortId>, Instant) {
    let mut b = Bridge::new(Config {
        fdb_capacity: 16_384,
        ..Config::default()
    });
    let ids: Vec<PortId> = (0..ports).map(|_| b.add_port()).collect();
    let now = Instant::now();
    for i in 0..entries {
        let p = ids[i as usize % ports];
        let _ = b.handle_frame(now, p, &frame([0xff; 6], mac(i)));
    }
    (b, ids, now)
}

/// Known unicast: learn the source, look up the destination, forward.
#[divan::bench(args = [2, 10_000])]
fn unicast_decision(bencher: Bencher, entries: u32) {
    let (mut b, ids, now) = bridge(4, entries.max(2));
    let f = frame(mac(1), mac(0));
    bencher.bench_local(|| {
        let d = b.handle_frame(now, ids[0], divan::black_box(&f));
        assert_eq!(d, Decision::Forward(ids[1]));
    });
}

/// Broadcast: learn the source, count a flood over every other port.
#[divan::bench(args = [4, 200])]
fn flood_decision(bencher: Bencher, ports: usize) {
    let (mut b, ids, now) = bridge(ports, 2);
    let f = frame([0xff; 6], mac(0));
    bencher.bench_local(|| {
        let d = b.handle_frame(now, ids[0], divan::black_box(&f));
        let n = b.flood_ports(ids[0]).count();
        assert_eq!((d, n), (Decision::Flood, ports - 1));
    });
}

/// FDB lookups alone at 10k entries.
#[divan::bench]
fn fdb_lookup_10k(bencher: Bencher) {
    let (b, _, now) = bridge(4, 10_000);
    let mut i = 0u32;
    bencher.bench_local(|| {
        i = (i + 7919) % 10_000;
        divan::black_box(b.fdb().lookup(now, vswitch_switch::MacAddr(mac(i))))
    });
}
