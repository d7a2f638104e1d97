//! Switching: learning, flooding, isolation, pinned addresses, ports that go.

use vswitch_daemon::datapath::Event;

use crate::harness::{BROADCAST, Sim, carries, ms, raw_frame, secs};

#[test]
fn broadcasts_reach_every_other_port_and_unicast_only_its_owner_once_learned() {
    let sim = Sim::new(vec![]);
    let mut net = sim.network("l2", 1);
    let a = sim.plug(&mut net, "a");
    let b = sim.plug(&mut net, "b");
    let c = sim.plug(&mut net, "c");
    a.send(&raw_frame(a.mac.0, BROADCAST, b"hello all"));
    for p in [&b, &c] {
        let f = p.recv(secs(2)).expect("the broadcast arrives");
        assert!(carries(&f, b"hello all"));
    }
    assert!(a.silent_for(ms(100)), "no hairpin");
    // b has sent nothing yet, but its assigned MAC is pinned to its port from the start: a
    // frame for it goes to b alone, never flooded.
    a.send(&raw_frame(a.mac.0, b.mac.0, b"to b"));
    assert!(b.recv(secs(2)).is_some_and(|f| carries(&f, b"to b")));
    assert!(
        c.silent_for(ms(150)),
        "a frame for b's pinned MAC went to c"
    );
    // b answers; a's address was learned from its broadcast.
    b.send(&raw_frame(b.mac.0, a.mac.0, b"to a"));
    assert!(a.recv(secs(2)).is_some_and(|f| carries(&f, b"to a")));
    assert!(
        c.silent_for(ms(100)),
        "unicast to a known address is not flooded"
    );
    // A truly unknown destination floods to everybody else.
    let stranger = [0x02, 0xaa, 0, 0, 0, 1];
    a.send(&raw_frame(a.mac.0, stranger, b"to nobody"));
    for p in [&b, &c] {
        assert!(p.recv(secs(2)).is_some_and(|f| carries(&f, b"to nobody")));
    }
    let stats = sim.stats(&net);
    assert!(stats.flooded >= 2, "{stats:?}");
    let fdb = sim.fdb(&net);
    assert!(
        fdb.iter()
            .any(|r| r.mac_address == a.mac.to_string() && r.endpoint == "a"),
        "{fdb:?}"
    );
}

#[test]
fn networks_are_isolated_from_each_other() {
    let sim = Sim::new(vec![]);
    let mut red = sim.network("red", 2);
    let mut blue = sim.network("blue", 3);
    let r1 = sim.plug(&mut red, "r1");
    let r2 = sim.plug(&mut red, "r2");
    let b1 = sim.plug(&mut blue, "b1");
    r1.send(&raw_frame(r1.mac.0, BROADCAST, b"red only"));
    assert!(r2.recv(secs(2)).is_some_and(|f| carries(&f, b"red only")));
    // Straight at blue's host, by its MAC: the red switch does not know it and floods in red.
    r1.send(&raw_frame(r1.mac.0, b1.mac.0, b"cross"));
    assert!(r2.recv(secs(2)).is_some_and(|f| carries(&f, b"cross")));
    assert!(b1.silent_for(ms(200)), "a red frame reached blue");
    // Even sending from blue's MAC into red does not make red's frames reach blue.
    r1.send(&raw_frame(b1.mac.0, BROADCAST, b"spoofed"));
    assert!(b1.silent_for(ms(200)));
}

#[test]
fn another_ports_pinned_mac_cannot_be_taken_over() {
    let sim = Sim::new(vec![]);
    // Without port security too: the pin alone keeps the MACs.
    let mut net = sim.network_open("pin", 4);
    let a = sim.plug(&mut net, "a");
    let b = sim.plug(&mut net, "b");
    let c = sim.plug(&mut net, "c");
    // a claims b's MAC and the gateway's: both frames are dropped, not switched.
    a.send(&raw_frame(b.mac.0, BROADCAST, b"i am b"));
    a.send(&raw_frame(net.gw_mac.0, BROADCAST, b"i am the gateway"));
    assert!(c.silent_for(ms(200)), "an impersonating frame was switched");
    // Traffic for b still goes to b, not to a.
    c.send(&raw_frame(c.mac.0, b.mac.0, b"for b"));
    assert!(b.recv(secs(2)).is_some_and(|f| carries(&f, b"for b")));
    assert!(a.silent_for(ms(100)));
    let stats = sim.stats(&net);
    assert_eq!(stats.invalid_source, 2, "{stats:?}");
}

#[test]
fn malformed_frames_are_counted_and_dropped_and_traffic_goes_on() {
    let sim = Sim::new(vec![]);
    let mut net = sim.network("junk", 5);
    let a = sim.plug(&mut net, "a");
    let b = sim.plug(&mut net, "b");
    a.send_raw(&[0u8; 3]); // shorter than a virtio-net header
    a.send_raw(&[0u8; 20]); // a header and a runt
    a.send(&[0xff; 13]);
    a.send(&raw_frame(
        [0x01, 0, 0x5e, 0, 0, 1],
        BROADCAST,
        b"multicast source",
    ));
    a.send(&raw_frame(a.mac.0, BROADCAST, b"after the junk"));
    let f = b.recv(secs(2)).expect("the good frame arrives");
    assert!(carries(&f, b"after the junk"), "only the good frame: {f:?}");
    let stats = sim.stats(&net);
    assert_eq!(stats.malformed, 3, "{stats:?}");
    assert_eq!(stats.invalid_source, 1, "{stats:?}");
    let port_a = stats.ports.iter().find(|p| p.endpoint == "a").expect("a");
    assert_eq!(port_a.rx_frames, 5);
    assert_eq!(port_a.rx_dropped, 4);
}

#[test]
fn a_port_whose_device_goes_away_is_reported_and_forgotten() {
    let mut sim = Sim::new(vec![]);
    let mut net = sim.network("gone", 6);
    let a = sim.plug(&mut net, "a");
    let b = sim.plug(&mut net, "b");
    b.send(&raw_frame(b.mac.0, BROADCAST, b"hi"));
    assert!(a.recv(secs(2)).is_some());
    drop(b); // the device vanishes: the datapath's end hangs up
    match sim.next_event(secs(5)) {
        Some(Event::PortGone {
            network_id,
            endpoint_id,
        }) => {
            assert_eq!(network_id, net.id);
            assert!(endpoint_id.starts_with("ep-b"), "{endpoint_id}");
        }
        other => panic!("expected PortGone, got {other:?}"),
    }
    let stats = sim.stats(&net);
    assert!(stats.ports.iter().all(|p| p.endpoint != "b"), "{stats:?}");
    // The rest of the network is unaffected.
    let c = sim.plug(&mut net, "c");
    c.send(&raw_frame(c.mac.0, a.mac.0, b"still here"));
    assert!(a.recv(secs(2)).is_some_and(|f| carries(&f, b"still here")));
}

#[test]
fn a_removed_port_gets_nothing_more_and_its_addresses_are_forgotten() {
    let sim = Sim::new(vec![]);
    let mut net = sim.network("rm", 7);
    let a = sim.plug(&mut net, "a");
    let b = sim.plug(&mut net, "b");
    b.send(&raw_frame(b.mac.0, BROADCAST, b"learn me"));
    assert!(a.recv(secs(2)).is_some());
    assert!(sim.fdb(&net).iter().any(|r| r.endpoint == "b"));
    // Removing b's port closes the datapath's end: ours reads end-of-file.
    sim.rt.block_on(net.dp.remove_port(b.id)).expect("remove");
    assert!(b.recv(secs(2)).is_none());
    assert!(
        sim.fdb(&net)
            .iter()
            .all(|r| r.mac_address != b.mac.to_string()),
        "b's entries are flushed"
    );
    // Frames for b's MAC are no longer kept from flooding: a new port sees them.
    let c = sim.plug(&mut net, "c");
    a.send(&raw_frame(a.mac.0, b.mac.0, b"for the old b"));
    assert!(
        c.recv(secs(2))
            .is_some_and(|f| carries(&f, b"for the old b"))
    );
}
