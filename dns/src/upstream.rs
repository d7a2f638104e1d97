//! Upstream servers and the relay of queries to them.
//!
//! Queries are relayed as bytes (only the id is replaced, and restored in the answer), so
//! rcodes, EDNS options and the TC bit pass through untouched, and the client's transport is
//! kept: a UDP query goes upstream over UDP (a truncated answer reaches the client, which
//! retries over TCP), a TCP query over TCP. Up to three upstreams are tried in order within one
//! overall deadline; a timeout, SERVFAIL or REFUSED moves on to the next; if none gives a usable
//! answer the client gets SERVFAIL before the deadline (clients of aardvark-dns hang instead).
//! The number of forwards in flight is bounded, with a fair share for each network and client
//! ([`crate::fair`]); past its share a client is answered REFUSED.

use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use hickory_proto::op::{Message, ResponseCode};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fair::{FairShare, Permit};

/// At most this many upstreams are used, like glibc's MAXNS.
pub const MAX_UPSTREAMS: usize = 3;
/// A client gets an answer (at worst SERVFAIL) within this time.
pub const FORWARD_DEADLINE: Duration = Duration::from_millis(4500);
/// resolv.conf is looked at (stat) at most this often.
const RESOLV_CONF_RECHECK: Duration = Duration::from_secs(1);

/// Parses an `--dns-upstream` value: `IP`, `IP:PORT`, or `[IPv6]:PORT`.
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("invalid DNS upstream {s:?}: expected IP or IP:PORT"))
}

/// The `nameserver` entries of a resolv.conf text (at most [`MAX_UPSTREAMS`]).
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        .filter_map(|w| w.split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .take(MAX_UPSTREAMS)
        .collect()
}

/// Where queries go: fixed servers, or the host's resolv.conf, re-read when it changes.
#[derive(Debug)]
pub struct Upstreams {
    fixed: Vec<SocketAddr>,
    resolv_conf: PathBuf,
    cache: Mutex<Cached>,
}

#[derive(Debug, Default)]
struct Cached {
    checked: Option<Instant>,
    stamp: Option<(SystemTime, u64)>,
    servers: Vec<SocketAddr>,
}

impl Upstreams {
    pub fn new(fixed: Vec<SocketAddr>, resolv_conf: PathBuf) -> Self {
        Self {
            fixed: fixed.into_iter().take(MAX_UPSTREAMS).collect(),
            resolv_conf,
            cache: Mutex::new(Cached::default()),
        }
    }

    /// The servers to use now.
    pub fn current(&self) -> Vec<SocketAddr> {
        if !self.fixed.is_empty() {
            return self.fixed.clone();
        }
        let mut cache = self.cache.lock();
        let now = Instant::now();
        if cache
            .checked
            .is_some_and(|t| now.duration_since(t) < RESOLV_CONF_RECHECK)
        {
            return cache.servers.clone();
        }
        cache.checked = Some(now);
        let stamp = std::fs::metadata(&self.resolv_conf)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        if stamp != cache.stamp || stamp.is_none() {
            let text = std::fs::read_to_string(&self.resolv_conf).unwrap_or_default();
            let servers = parse_resolv_conf(&text);
            if servers != cache.servers {
                tracing::info!(file = %self.resolv_conf.display(), ?servers, "DNS upstreams changed");
            }
            cache.servers = servers;
            cache.stamp = stamp;
        }
        cache.servers.clone()
    }
}

/// Relays queries upstream, bounded and with failover.
#[derive(Debug, Clone)]
pub struct Forwarder {
    upstreams: Arc<Upstreams>,
    slots: FairShare,
    deadline: Duration,
}

impl Forwarder {
    pub fn new(upstreams: Arc<Upstreams>, max_inflight: usize) -> Self {
        Self {
            upstreams,
            slots: FairShare::new(max_inflight),
            deadline: FORWARD_DEADLINE,
        }
    }

    /// The servers queries go to now (the fixed ones, or resolv.conf's).
    pub fn upstreams(&self) -> Vec<SocketAddr> {
        self.upstreams.current()
    }

    /// A slot for one forward by `client` on `network`, or `None` if the pool or their fair
    /// share of it is used up (answer REFUSED then).
    pub fn try_acquire(&self, network: &str, client: IpAddr) -> Option<Permit> {
        self.slots.try_acquire(network, client)
    }

    /// Relays `query` and returns the answer for the client: the upstream's, or SERVFAIL.
    pub async fn forward(&self, query: &[u8], tcp: bool) -> Vec<u8> {
        self.forward_to(&self.upstreams.current(), query, tcp).await
    }

    /// Relays `query` to `servers` (a network's own upstreams, say) rather than the daemon's.
    pub async fn forward_to(&self, servers: &[SocketAddr], query: &[u8], tcp: bool) -> Vec<u8> {
        let Some(orig) = query.first_chunk::<2>().copied() else {
            return Vec::new();
        };
        let deadline = Instant::now() + self.deadline;
        let mut fallback: Option<Vec<u8>> = None;
        let mut q = query.to_vec();
        for (i, server) in servers.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let per_try = left / u32::try_from(servers.len() - i).unwrap_or(1);
            let id = next_id();
            q[..2].copy_from_slice(&id.to_be_bytes());
            let exchange = async {
                if tcp {
                    tcp_exchange(*server, &q).await
                } else {
                    udp_exchange(*server, &q, id).await
                }
            };
            match tokio::time::timeout(per_try, exchange).await {
                Ok(Ok(mut answer)) if answer.len() >= 12 => {
                    answer[..2].copy_from_slice(&orig);
                    let rcode = answer[3] & 0x0f;
                    if rcode == (u16::from(ResponseCode::ServFail) as u8)
                        || rcode == (u16::from(ResponseCode::Refused) as u8)
                    {
                        tracing::debug!(%server, rcode, "upstream declined; trying the next");
                        fallback = Some(answer);
                        continue;
                    }
                    return answer;
                }
                Ok(Ok(_)) => tracing::debug!(%server, "short answer from upstream"),
                Ok(Err(e)) => tracing::debug!(%server, error = %e, "upstream failed"),
                Err(_) => tracing::debug!(%server, "upstream timed out"),
            }
        }
        fallback.unwrap_or_else(|| servfail(query))
    }
}

async fn udp_exchange(server: SocketAddr, q: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = tokio::net::UdpSocket::bind(local).await?;
    sock.connect(server).await?;
    sock.send(q).await?;
    let mut buf = vec![0u8; 65_535];
    loop {
        let n = sock.recv(&mut buf).await?;
        // A connected socket only hears from the server; still insist on our id and QR.
        if n >= 12 && buf[..2] == id.to_be_bytes() && buf[2] & 0x80 != 0 {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn tcp_exchange(server: SocketAddr, q: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = tokio::net::TcpStream::connect(server).await?;
    let len = u16::try_from(q.len())
        .map_err(|_| std::io::Error::other("query longer than 65535 bytes"))?;
    let mut framed = Vec::with_capacity(q.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(q);
    s.write_all(&framed).await?;
    let n = s.read_u16().await?;
    let mut buf = vec![0u8; usize::from(n)];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

/// A SERVFAIL answer echoing the query's question, with an OPT record if the query had one (or
/// a bare one if the query does not parse).
pub fn servfail(query: &[u8]) -> Vec<u8> {
    match Message::from_vec(query) {
        Ok(req) => {
            let mut m = Message::response(req.metadata.id, req.metadata.op_code);
            m.metadata.recursion_desired = req.metadata.recursion_desired;
            m.metadata.recursion_available = true;
            m.metadata.response_code = ResponseCode::ServFail;
            m.add_queries(req.queries);
            if req.edns.is_some() {
                let mut edns = hickory_proto::op::Edns::new();
                edns.set_max_payload(1232);
                m.set_edns(edns);
            }
            m.to_vec().unwrap_or_default()
        }
        Err(_) => {
            let id = query.first_chunk::<2>().copied().unwrap_or([0, 0]);
            vec![id[0], id[1], 0x80, 0x82, 0, 0, 0, 0, 0, 0, 0, 0]
        }
    }
}

/// Unpredictable-enough query ids: a per-process random key hashed with a counter.
fn next_id() -> u16 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let mut h = KEY.get_or_init(Default::default).build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish() as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_parsing() {
        let text = "# comment\nsearch example.com\nnameserver 10.0.0.1\nnameserver fe80::1%eth0\n\
                    nameserver   127.0.0.53\nnameserver 9.9.9.9\noptions edns0\n";
        let got = parse_resolv_conf(text);
        assert_eq!(
            got,
            vec![
                "10.0.0.1:53".parse().expect("sa"),
                "[fe80::1]:53".parse().expect("sa"),
                "127.0.0.53:53".parse().expect("sa"),
            ]
        );
    }

    #[test]
    fn upstream_flags() {
        assert_eq!(
            parse_upstream("1.2.3.4"),
            Ok("1.2.3.4:53".parse().expect("sa"))
        );
        assert_eq!(
            parse_upstream("1.2.3.4:5353"),
            Ok("1.2.3.4:5353".parse().expect("sa"))
        );
        assert_eq!(
            parse_upstream("[::1]:54"),
            Ok("[::1]:54".parse().expect("sa"))
        );
        assert_eq!(parse_upstream("::1"), Ok("[::1]:53".parse().expect("sa")));
        assert!(parse_upstream("dns.google").is_err());
    }

    #[test]
    fn resolv_conf_changes_are_picked_up() {
        let dir = std::env::temp_dir().join(format!("vswitch-upstream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("resolv.conf");
        std::fs::write(&path, "nameserver 10.0.0.1\n").expect("write");
        let u = Upstreams::new(vec![], path.clone());
        assert_eq!(u.current(), vec!["10.0.0.1:53".parse().expect("sa")]);
        std::fs::write(&path, "nameserver 10.0.0.2\nnameserver 10.0.0.3\n").expect("write");
        u.cache.lock().checked = None; // skip the recheck interval
        assert_eq!(u.current().len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn servfail_echoes_the_question() {
        let mut q = Message::query();
        q.metadata.id = 7;
        q.add_query(hickory_proto::op::Query::query(
            hickory_proto::rr::Name::from_ascii("example.com").expect("name"),
            hickory_proto::rr::RecordType::A,
        ));
        let b = servfail(&q.to_vec().expect("enc"));
        let m = Message::from_vec(&b).expect("parse");
        assert_eq!(
            (m.metadata.id, m.metadata.response_code),
            (7, ResponseCode::ServFail)
        );
        assert_eq!(m.queries.len(), 1);
        assert!(m.edns.is_none(), "no OPT to a query without one");
        // To an EDNS query, with an OPT record (RFC 6891).
        q.set_edns(hickory_proto::op::Edns::new());
        let m = Message::from_vec(&servfail(&q.to_vec().expect("enc"))).expect("parse");
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert!(m.edns.is_some(), "OPT record in the SERVFAIL");
    }

    #[tokio::test]
    async fn unanswered_forward_is_servfail_within_the_deadline() {
        // A UDP socket that never answers stands in for a dead upstream.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = silent.local_addr().expect("addr");
        let mut f = Forwarder::new(
            Arc::new(Upstreams::new(vec![addr], "/nonexistent".into())),
            4,
        );
        f.deadline = Duration::from_millis(300);
        let mut q = Message::query();
        q.metadata.id = 9;
        q.add_query(hickory_proto::op::Query::query(
            hickory_proto::rr::Name::from_ascii("example.com").expect("name"),
            hickory_proto::rr::RecordType::A,
        ));
        let started = Instant::now();
        let b = f.forward(&q.to_vec().expect("enc"), false).await;
        assert!(started.elapsed() < Duration::from_secs(2));
        let m = Message::from_vec(&b).expect("parse");
        assert_eq!(
            (m.metadata.id, m.metadata.response_code),
            (9, ResponseCode::ServFail)
        );
        // The bound: two permits, the third is refused.
        let f = Forwarder::new(Arc::new(Upstreams::new(vec![addr], "/x".into())), 2);
        let client = IpAddr::from([10, 0, 0, 2]);
        let (a, b) = (f.try_acquire("a", client), f.try_acquire("b", client));
        assert!(a.is_some() && b.is_some() && f.try_acquire("c", client).is_none());
    }
}
