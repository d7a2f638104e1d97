//! What a hostile container, or the outside, cannot grow: the backlog of frames from host
//! sockets and the forwarding table.

use std::net::SocketAddr;

use vswitch_daemon::datapath::protocol::MAX_BACKLOG_BYTES;

use crate::harness::{BROADCAST, Sim, carries, raw_frame, secs};

/// Frames from host sockets queue for a datapath under a byte budget: a datapath that is not
/// taking them (here: not running yet) holds at most that much, the rest is dropped and shows
/// in the gateway port's receive drops.
#[test]
fn frames_from_host_sockets_beyond_the_backlog_are_dropped_and_counted() {
    let sim = Sim::new(vec![]);
    let mut net = sim.network_paused("backlog", 41);
    let injector = net.dp.injector();
    let sa = |s: &str| s.parse::<SocketAddr>().expect("addr");
    let frame = vec![0u8; 1400];
    let fits = MAX_BACKLOG_BYTES / frame.len();
    let sent = fits + 500;
    for i in 0..sent {
        let key = (
            sa("10.41.0.2:5000"),
            SocketAddr::new([192, 0, 2, 1].into(), i as u16),
        );
        assert!(
            injector.udp_in(key, frame.clone(), None),
            "the datapath exists"
        );
    }
    assert_eq!(injector.dropped(), 500);
    net.dp.run().expect("run");
    let stats = sim.stats(&net);
    let gw = stats
        .ports
        .iter()
        .find(|p| p.endpoint == "(gateway)")
        .expect("gateway port");
    assert_eq!(gw.rx_dropped, 500, "{stats:?}");
    // The stats answer came after every queued frame was taken: the budget is whole again,
    // and as much again gets in without a drop.
    for _ in 0..fits {
        injector.udp_in(
            (sa("10.41.0.2:5000"), sa("192.0.2.1:1")),
            frame.clone(),
            None,
        );
    }
    assert_eq!(injector.dropped(), 500);
}

/// On a network without port security, a container sending from thousands of made-up MACs
/// fills the table only to its bound; the other containers' own addresses, pinned to their
/// ports, keep working.
#[test]
fn a_mac_flood_fills_the_table_only_to_its_bound() {
    let sim = Sim::new(vec![]);
    let mut net = sim.network_open("flood", 42);
    let a = sim.plug(&mut net, "a");
    let b = sim.plug(&mut net, "b");
    let capacity = vswitch_switch::Config::default().fdb_capacity;
    let sent = capacity + 2000;
    for i in 0..sent as u32 {
        let [_, x, y, z] = i.to_be_bytes();
        let fake = [0x02, 0xee, 0, x, y, z];
        // To a's own MAC: learnt, then dropped (no hairpin), so the flood fills the table and
        // nobody's socket.
        a.send(&raw_frame(fake, a.mac.0, b"flood"));
    }
    // Everything sent has been handled once b hears a's marker behind the flood.
    a.send(&raw_frame(a.mac.0, BROADCAST, b"marker"));
    let got = std::iter::from_fn(|| b.recv(secs(5)))
        .find(|f| carries(f, b"marker"))
        .is_some();
    assert!(got, "the marker never arrived");
    let stats = sim.stats(&net);
    assert!(
        stats.fdb_entries <= capacity,
        "{} entries for a capacity of {capacity}",
        stats.fdb_entries
    );
    assert!(stats.learn_refused > 0, "{stats:?}");
    // b is still reached by unicast, and only b.
    let c = sim.plug(&mut net, "c");
    c.send(&raw_frame(c.mac.0, b.mac.0, b"for b"));
    assert!(
        std::iter::from_fn(|| b.recv(secs(2))).any(|f| carries(&f, b"for b")),
        "b unreachable after the flood"
    );
}

/// With port security (the default), the made-up MACs do not get in at all: every frame is
/// dropped and counted, and the table does not grow.
#[test]
fn a_mac_flood_on_a_guarded_port_learns_nothing() {
    let sim = Sim::new(vec![]);
    let mut net = sim.network("guarded", 43);
    let a = sim.plug(&mut net, "a");
    let b = sim.plug(&mut net, "b");
    let before = sim.stats(&net).fdb_entries;
    for i in 0..5000u32 {
        let [_, x, y, z] = i.to_be_bytes();
        a.send(&raw_frame([0x02, 0xee, 0, x, y, z], BROADCAST, b"flood"));
    }
    a.send(&raw_frame(a.mac.0, BROADCAST, b"marker"));
    let first = b.recv(secs(5)).expect("the marker arrives");
    assert!(carries(&first, b"marker"), "a flood frame got through");
    let stats = sim.stats(&net);
    assert_eq!(stats.spoofed, 5000, "{stats:?}");
    assert_eq!(
        stats.fdb_entries, before,
        "nothing learned (a's MAC was pinned already): {stats:?}"
    );
    assert_eq!(stats.learn_refused, 0);
}
