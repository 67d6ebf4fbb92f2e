//! Peer fetch: blocks move between the kvd daemons of a cluster over TCP, so a node that
//! misses a prefix locally loads it from the node that has it instead of recomputing it —
//! the prefill → decode path of disaggregated serving (a prefill node stores, a decode node
//! loads).
//!
//! Every data connection is mutual TLS ([`tls`]) unless `peer.tls = "off"`: a node serves
//! only nodes with a certificate of the cluster's CA, and takes blocks only from a node that
//! proves the name the cluster index gives the address it dials.
//!
//! Serving side: a data port ([`serve`]) answers [`kvd_proto::peer`] requests with the
//! block's bytes straight from the DRAM arena under a read lease (a disk-only block is read
//! into DRAM first, verified, as a local GET would). A block is only ever served from the
//! namespace asked for. A malformed or oversized request gets the connection closed and one
//! log line; connections are bounded by `peer.max_connections` in all and
//! `peer.max_connections_per_peer` from one address, and must open (TLS handshake, then
//! magic) within 5 s each.
//!
//! Fetching side: a lookup that misses locally ([`lookup`]) asks the cluster index which
//! nodes hold the rest of the chain, and where they listen (published in their lease), then
//! fetches the blocks in chain order, `peer.fetch_concurrency` at a time, each into a
//! reserved DRAM slot; the checksum the peer sent is verified over the received bytes before
//! the block is committed, so a wrong byte is never stored. The first block that cannot be
//! fetched ends the walk, and the lookup answers with what is now held locally.

pub mod tls;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvd_proto::frame::{PeerReport, TierCounts};
use kvd_proto::peer::{self as wire, Status, PEER_MAGIC, REPLY_HEADER};
use kvd_proto::{BlockKey, NamespaceId, Tier};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use twox_hash::XxHash3_64;

use crate::config::{PeerConfig, PeerTlsMode};
use crate::daemon::{Daemon, Namespace, Reservation};
use crate::store::ReserveError;

/// Idle connections kept per peer for later fetches.
const IDLE_PER_PEER: usize = 16;
/// Socket buffer asked for on data connections (the kernel caps it at its rmem/wmem max).
const SOCKET_BUFFER: u32 = 4 << 20;
/// Requests outstanding on one fetching connection.
const PIPELINE: usize = 4;
/// Received bytes are hashed in pieces of this size, each while it is still in cache.
const HASH_PIECE: usize = 256 << 10;
/// A served connection with no request for this long is closed.
const IDLE_SERVE: Duration = Duration::from_secs(120);
/// A connection's TLS handshake, and then its first bytes (the magic), must each complete
/// within this.
const HANDSHAKE: Duration = Duration::from_secs(5);

/// A data connection: plaintext TCP, or TLS over it.
trait PeerIo: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug> PeerIo for T {}

/// Bytes of ciphertext read per system call under TLS: rustls alone reads 4 KiB at a time
/// (four calls per 16 KiB record); a buffer between it and the socket lets one call carry
/// many records. (Writes need none: rustls hands the socket all pending records at once.)
const TLS_READ_BUFFER: usize = 256 << 10;

/// The socket under a TLS session, its reads buffered.
fn buffered(s: TcpStream) -> tokio::io::BufReader<TcpStream> {
    tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, s)
}

/// A dialed connection, kept idle for reuse with the node it was authenticated as.
type Conn = Box<dyn PeerIo>;

/// Where idle connections are kept: by node and address, so a connection authenticated as
/// one node is never handed out for another that came to use the same address.
fn pool_key(node: &str, addr: &str) -> String {
    format!("{node}@{addr}")
}

/// Why a block could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Connecting, sending or receiving failed.
    #[error("peer {addr}: {source}")]
    Io {
        /// Peer.
        addr: String,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// The node at that address did not prove the name the index gives it (no or another
    /// node's certificate, another CA's, expired), or refused this node's.
    #[error("peer {node} at {addr} failed mutual TLS authentication: {source}")]
    Auth {
        /// The node the index names.
        node: String,
        /// Its address.
        addr: String,
        /// rustls' reason.
        #[source]
        source: io::Error,
    },
    /// The peer does not hold it (any more).
    #[error("peer {0} does not hold the block")]
    Missing(String),
    /// The peer holds it but cannot read it now.
    #[error("peer {0} could not read the block now")]
    Unavailable(String),
    /// The reply made no sense (unknown status, zero or oversized length).
    #[error("peer {addr} sent a bad reply: {what}")]
    Protocol {
        /// Peer.
        addr: String,
        /// What was wrong.
        what: String,
    },
    /// The bytes did not match the checksum the peer sent.
    #[error("block from peer {0} failed its checksum; dropped")]
    Checksum(String),
    /// No DRAM slot for it (everything pinned or being read).
    #[error("no DRAM room for a fetched block")]
    NoRoom,
    /// The transfer took longer than `peer.timeout_ms`.
    #[error("peer {0}: timed out")]
    Timeout(String),
}

#[derive(Debug, Default)]
struct Counters {
    served_blocks: AtomicU64,
    served_bytes: AtomicU64,
    fetched_blocks: AtomicU64,
    fetched_bytes: AtomicU64,
    fetch_failures: AtomicU64,
    checksum_failures: AtomicU64,
    bad_requests: AtomicU64,
}

/// The daemon's peer-fetch state: configuration, counters, idle connections to peers.
#[derive(Debug)]
pub struct Peer {
    cfg: PeerConfig,
    advertise: String,
    counters: Counters,
    last_error: Mutex<String>,
    idle: Mutex<HashMap<String, Vec<Conn>>>,
    tls: Option<tls::PeerTls>,
}

impl Peer {
    /// Present when `peer.listen` is set; with `peer.tls = "mutual"` this node's certificate
    /// (for `node`) must load and verify.
    pub fn new(cfg: &PeerConfig, node: &str) -> Result<Option<Peer>, tls::TlsError> {
        if !cfg.enabled() {
            return Ok(None);
        }
        let tls = match cfg.tls {
            PeerTlsMode::Mutual => Some(tls::PeerTls::new(
                tls::TlsFiles {
                    cert: cfg.tls_cert.clone(),
                    key: cfg.tls_key.clone(),
                    ca: cfg.tls_ca.clone(),
                },
                node,
            )?),
            PeerTlsMode::Off => None,
        };
        Ok(Some(Peer {
            advertise: if cfg.advertise.is_empty() {
                cfg.listen.clone()
            } else {
                cfg.advertise.clone()
            },
            cfg: cfg.clone(),
            counters: Counters::default(),
            last_error: Mutex::new(String::new()),
            idle: Mutex::new(HashMap::new()),
            tls,
        }))
    }

    /// Whether data connections are mutual TLS.
    pub fn authenticated(&self) -> bool {
        self.tls.is_some()
    }

    /// The address published for other nodes.
    pub fn advertise(&self) -> &str {
        &self.advertise
    }

    /// State for `kvd-ctl status`.
    pub fn report(&self) -> PeerReport {
        let c = &self.counters;
        PeerReport {
            advertise: self.advertise.clone(),
            served_blocks: c.served_blocks.load(Ordering::Relaxed),
            served_bytes: c.served_bytes.load(Ordering::Relaxed),
            fetched_blocks: c.fetched_blocks.load(Ordering::Relaxed),
            fetched_bytes: c.fetched_bytes.load(Ordering::Relaxed),
            fetch_failures: c.fetch_failures.load(Ordering::Relaxed),
            checksum_failures: c.checksum_failures.load(Ordering::Relaxed),
            bad_requests: c.bad_requests.load(Ordering::Relaxed),
            last_error: self.last_error.lock().clone(),
        }
    }

    /// Whether lookups fetch from peers.
    pub fn fetches(&self) -> bool {
        self.cfg.fetch_on_lookup
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.cfg.timeout_ms))
    }

    /// A connection to `node` at `addr`: an idle one, or a new one that (with TLS) has
    /// proven to be `node` before anything is asked of it.
    async fn connect(&self, node: &str, addr: &str) -> Result<Conn, FetchError> {
        if let Some(s) = self
            .idle
            .lock()
            .get_mut(&pool_key(node, addr))
            .and_then(Vec::pop)
        {
            return Ok(s);
        }
        let io = |source| FetchError::Io {
            addr: addr.to_owned(),
            source,
        };
        let dial = async {
            let sa = tokio::net::lookup_host(addr)
                .await?
                .next()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
            let sock = if sa.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            // Room for a few blocks in flight: fewer wake-ups per block on both sides.
            sock.set_recv_buffer_size(SOCKET_BUFFER)?;
            let s = sock.connect(sa).await?;
            s.set_nodelay(true)?;
            Ok::<_, io::Error>(s)
        };
        let tcp = tokio::time::timeout(self.timeout(), dial)
            .await
            .map_err(|_| FetchError::Timeout(addr.to_owned()))?
            .map_err(io)?;
        let mut s: Conn = match &self.tls {
            None => Box::new(tcp),
            Some(t) => {
                let auth = |source| FetchError::Auth {
                    node: node.to_owned(),
                    addr: addr.to_owned(),
                    source,
                };
                let name = tls::server_name(node).map_err(auth)?;
                let hs = t.connector().connect(name, buffered(tcp));
                let s = tokio::time::timeout(self.timeout(), hs)
                    .await
                    .map_err(|_| FetchError::Timeout(addr.to_owned()))?
                    .map_err(auth)?;
                Box::new(s)
            }
        };
        s.write_all(&PEER_MAGIC).await.map_err(io)?;
        Ok(s)
    }

    fn give_back(&self, node: &str, addr: &str, s: Conn) {
        let mut idle = self.idle.lock();
        let v = idle.entry(pool_key(node, addr)).or_default();
        if v.len() < IDLE_PER_PEER {
            v.push(s);
        }
    }

    fn count(&self, key: &BlockKey, r: &Result<u64, FetchError>) {
        match r {
            // 0: this node came to hold the block meanwhile; nothing was fetched.
            Ok(0) => {}
            Ok(len) => {
                self.counters.fetched_blocks.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .fetched_bytes
                    .fetch_add(*len, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters.fetch_failures.fetch_add(1, Ordering::Relaxed);
                if matches!(e, FetchError::Checksum(_)) {
                    self.counters
                        .checksum_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, key = %key, "peer fetch");
                } else if matches!(e, FetchError::Auth { .. }) {
                    tracing::warn!(error = %e, "peer fetch refused: nothing was asked of it");
                } else {
                    tracing::debug!(error = %e, key = %key, "peer fetch failed");
                }
                *self.last_error.lock() = e.to_string();
            }
        }
    }

    /// Fetches `keys` from `node` at `addr` in order over one connection, with up to
    /// [`PIPELINE`] requests outstanding so the peer never waits for the next one; stops at
    /// the first failure. Returns how many were fetched (or found already held).
    async fn fetch_run(
        &self,
        now_ms: u64,
        ns: &Arc<Namespace>,
        (node, addr): (&str, &str),
        keys: &[BlockKey],
    ) -> usize {
        let mut s = match self.connect(node, addr).await {
            Ok(s) => s,
            Err(e) => {
                if let Some(k) = keys.first() {
                    self.count(k, &Err(e));
                }
                return 0;
            }
        };
        let (mut sent, mut done) = (0, 0);
        while done < keys.len() {
            while sent < keys.len() && sent - done < PIPELINE {
                let frame = wire::encode_fetch(&ns.id, &keys[sent]);
                let r = async {
                    s.write_all(&frame).await?;
                    s.flush().await
                }
                .await;
                if let Err(source) = r {
                    self.count(
                        &keys[done],
                        &Err(FetchError::Io {
                            addr: addr.to_owned(),
                            source,
                        }),
                    );
                    return done;
                }
                sent += 1;
            }
            let r = tokio::time::timeout(
                self.timeout(),
                self.receive(&mut s, now_ms, ns, addr, &keys[done]),
            )
            .await
            .unwrap_or_else(|_| Err(FetchError::Timeout(addr.to_owned())));
            self.count(&keys[done], &r);
            match r {
                Ok(_) => done += 1,
                // The connection is still in step (the reply was read whole) when the peer
                // said it lacks the block; not after anything else.
                Err(FetchError::Missing(_) | FetchError::Unavailable(_)) if sent == done + 1 => {
                    self.give_back(node, addr, s);
                    return done;
                }
                Err(_) => return done,
            }
        }
        self.give_back(node, addr, s);
        done
    }

    /// Reads one reply and stores its block: the length stored (0 when this node came to
    /// hold the block meanwhile; its bytes are read and dropped).
    async fn receive(
        &self,
        s: &mut Conn,
        now_ms: u64,
        ns: &Arc<Namespace>,
        addr: &str,
        key: &BlockKey,
    ) -> Result<u64, FetchError> {
        let io = |source| FetchError::Io {
            addr: addr.to_owned(),
            source,
        };
        let mut h = [0u8; REPLY_HEADER];
        s.read_exact(&mut h).await.map_err(io)?;
        let (status, len, checksum) = wire::decode_reply(&h);
        match status {
            Some(Status::Found) => {}
            Some(Status::Missing) => return Err(FetchError::Missing(addr.to_owned())),
            Some(Status::Unavailable) => return Err(FetchError::Unavailable(addr.to_owned())),
            None => {
                return Err(FetchError::Protocol {
                    addr: addr.to_owned(),
                    what: format!("status {}", h[0]),
                })
            }
        }
        let max = ns.store.lock().max_block();
        if len == 0 || len > max {
            return Err(FetchError::Protocol {
                addr: addr.to_owned(),
                what: format!("block of {len} bytes (this node takes 1..={max})"),
            });
        }
        let reserved = ns.store.lock().reserve(key, len);
        let slot = match reserved {
            Ok(slot) => slot,
            Err(ReserveError::Exists) => {
                // Stored here meanwhile: the bytes are read past, keeping the connection in
                // step with the requests still outstanding.
                let mut left = len;
                let mut scratch = vec![0u8; HASH_PIECE.min(len as usize)];
                while left > 0 {
                    let n = (left as usize).min(scratch.len());
                    s.read_exact(&mut scratch[..n]).await.map_err(io)?;
                    left -= n as u64;
                }
                return Ok(0);
            }
            Err(_) => return Err(FetchError::NoRoom),
        };
        let guard = Reservation::new(ns.clone(), slot);
        // SAFETY: the slot is reserved by this task and not committed, so nobody else reads
        // or writes it until it is committed or aborted (by `guard`, also when this future
        // is dropped mid-transfer); `ns` keeps the arena mapped meanwhile.
        let Some(buf) = (unsafe { ns.arena.slot_mut(slot.offset, len) }) else {
            return Err(FetchError::NoRoom);
        };
        // Hashed piece by piece as it arrives, while each piece is still in the CPU's cache.
        let mut hasher = XxHash3_64::new();
        for piece in buf.chunks_mut(HASH_PIECE) {
            s.read_exact(piece).await.map_err(io)?;
            std::hash::Hasher::write(&mut hasher, piece);
        }
        if std::hash::Hasher::finish(&hasher) != checksum {
            return Err(FetchError::Checksum(addr.to_owned()));
        }
        guard.commit_verified(key, len, checksum, now_ms);
        Ok(len)
    }
}

/// Binds the data port.
pub async fn bind(cfg: &PeerConfig) -> Result<TcpListener, io::Error> {
    let addr: SocketAddr = cfg
        .listen
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e}")))?;
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    // Inherited by accepted connections: a whole block fits in the send buffer.
    sock.set_send_buffer_size(SOCKET_BUFFER)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

/// Serves peers on `listener` until `stop` fires.
pub async fn serve(daemon: Arc<Daemon>, listener: TcpListener, stop: Arc<tokio::sync::Notify>) {
    let Some(peer) = daemon.peer.clone() else {
        return;
    };
    let adm = crate::accept::Admission::new(crate::accept::Caps {
        total: peer.cfg.max_connections as usize,
        per_addr: peer.cfg.max_connections_per_peer as usize,
    });
    while let Some((stream, addr, place)) =
        crate::accept::next("peer data port", &listener, &adm, &stop).await
    {
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let _place = place;
            serve_conn(&daemon, stream, addr).await;
        });
    }
}

/// Why a served connection ended early.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("{0}")]
    Frame(#[from] wire::PeerFrameError),
    #[error("TLS handshake refused: {0}")]
    Auth(io::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

async fn serve_conn(daemon: &Arc<Daemon>, s: TcpStream, addr: SocketAddr) {
    let _ = s.set_nodelay(true);
    let tls = daemon.peer.as_ref().and_then(|p| p.tls.as_ref());
    let r = match tls {
        None => {
            let mut s = s;
            serve_requests(daemon, &mut s).await
        }
        Some(t) => match tokio::time::timeout(HANDSHAKE, t.acceptor().accept(buffered(s))).await {
            Err(_) => Ok(()),
            Ok(Err(e)) => Err(ServeError::Auth(e)),
            Ok(Ok(mut s)) => serve_requests(daemon, &mut s).await,
        },
    };
    match r {
        Ok(()) => {}
        Err(e @ (ServeError::Frame(_) | ServeError::Auth(_))) => {
            if let Some(p) = &daemon.peer {
                p.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
                *p.last_error.lock() = format!("{addr}: {e}");
            }
            tracing::warn!(peer = %addr, error = %e, "peer data port: bad request; disconnecting");
        }
        Err(ServeError::Io(e)) => {
            tracing::debug!(peer = %addr, error = %e, "peer connection ended");
        }
    }
}

async fn serve_requests<S: AsyncRead + AsyncWrite + Unpin>(
    daemon: &Arc<Daemon>,
    s: &mut S,
) -> Result<(), ServeError> {
    let mut magic = [0u8; 8];
    match tokio::time::timeout(HANDSHAKE, s.read_exact(&mut magic)).await {
        Ok(r) => {
            r?;
        }
        Err(_) => return Ok(()),
    }
    if magic != PEER_MAGIC {
        return Err(wire::PeerFrameError::BadMagic.into());
    }
    let mut body = [0u8; wire::MAX_REQUEST];
    loop {
        let mut len = [0u8; 4];
        match tokio::time::timeout(IDLE_SERVE, s.read_exact(&mut len)).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => {
                r?;
            }
        }
        let n = wire::check_len(len)?;
        let limit = daemon.peer.as_ref().map_or(IDLE_SERVE, |p| p.timeout());
        let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "peer too slow");
        tokio::time::timeout(limit, s.read_exact(&mut body[..n]))
            .await
            .map_err(|_| timed_out())??;
        let (ns, key) = wire::decode_fetch(&body[..n])?;
        // A peer that stops reading must not hold the block's lease (and a connection) for
        // ever: each block is sent within peer.timeout_ms or the connection is dropped.
        tokio::time::timeout(limit, serve_block(daemon, s, ns, key))
            .await
            .map_err(|_| timed_out())??;
    }
}

/// A read lease on a served block, released when dropped.
struct Lease {
    ns: Arc<Namespace>,
    entry: u32,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.ns.store.lock().release(self.entry);
    }
}

/// Answers one fetch: the reply header and the block, flushed (a TLS stream may hold the
/// last record until then).
async fn serve_block<S: AsyncWrite + Unpin>(
    daemon: &Arc<Daemon>,
    s: &mut S,
    ns_id: NamespaceId,
    key: BlockKey,
) -> io::Result<()> {
    send_block(daemon, s, ns_id, key).await?;
    s.flush().await
}

async fn send_block<S: AsyncWrite + Unpin>(
    daemon: &Arc<Daemon>,
    s: &mut S,
    ns_id: NamespaceId,
    key: BlockKey,
) -> io::Result<()> {
    let ns = daemon.namespaces().into_iter().find(|n| n.id == ns_id);
    let Some(ns) = ns else {
        return s
            .write_all(&wire::encode_reply(Status::Missing, 0, 0))
            .await;
    };
    let now = daemon.now_ms();
    let mut hit = ns.store.lock().get(&key, now);
    if hit.is_none() {
        let (d, n) = (daemon.clone(), ns.clone());
        hit = tokio::task::spawn_blocking(move || d.read_into_dram(&n, &key, true))
            .await
            .ok()
            .flatten();
    }
    let Some(hit) = hit else {
        let on_disk = daemon
            .disk
            .as_ref()
            .is_some_and(|d| d.presence(&ns_id, &[key])[0]);
        let status = if on_disk {
            Status::Unavailable
        } else {
            Status::Missing
        };
        return s.write_all(&wire::encode_reply(status, 0, 0)).await;
    };
    let lease = Lease {
        ns: ns.clone(),
        entry: hit.entry,
    };
    let checksum = if hit.sealed {
        hit.checksum
    } else {
        let mut h = XxHash3_64::new();
        ns.arena.hash_range(&mut h, hit.offset, hit.len);
        std::hash::Hasher::finish(&h)
    };
    // SAFETY: `lease` holds the block (committed, so no client writes it; leased, so it is
    // not freed and reused) until the bytes are sent; `ns` keeps the arena mapped.
    let Some(buf) = (unsafe { ns.arena.block(hit.offset, hit.len) }) else {
        return s
            .write_all(&wire::encode_reply(Status::Unavailable, 0, 0))
            .await;
    };
    s.write_all(&wire::encode_reply(Status::Found, hit.len, checksum))
        .await?;
    s.write_all(buf).await?;
    drop(lease);
    if let Some(p) = &daemon.peer {
        p.counters.served_blocks.fetch_add(1, Ordering::Relaxed);
        p.counters
            .served_bytes
            .fetch_add(hit.len, Ordering::Relaxed);
    }
    Ok(())
}

/// A lookup: with peer fetch on, what the cluster index says peers hold beyond the local
/// prefix is fetched first; the answer is always from the local tiers.
pub async fn lookup(
    daemon: &Arc<Daemon>,
    ns: &Arc<Namespace>,
    keys: &[BlockKey],
) -> (u32, TierCounts) {
    let (prefix, tiers) = daemon.lookup(ns, keys);
    let (Some(peer), Some(index)) = (&daemon.peer, &daemon.index) else {
        return (prefix, tiers);
    };
    let rest = &keys[(prefix as usize).min(keys.len())..];
    if rest.is_empty() || !peer.fetches() {
        return (prefix, tiers);
    }
    let holders = match index.holders(&ns.id, rest).await {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(error = %e, "lookup: cluster index unavailable; local answer");
            return (prefix, tiers);
        }
    };
    let (me, addrs) = (index.node(), &holders.peers);
    // Each block from a peer that holds it, in DRAM if one does, the previous block's
    // source when it can (its connection is warm).
    let mut plan: Vec<(BlockKey, (String, String))> = Vec::new();
    let mut last: Option<String> = None;
    for (key, hs) in rest.iter().zip(&holders.per_key) {
        let mut cands: Vec<&(String, Tier)> = hs
            .iter()
            .filter(|(n, _)| n != me && addrs.contains_key(n))
            .collect();
        cands.sort_by_key(|c| (c.1 as u8, Some(&c.0) != last.as_ref()));
        let Some((node, _)) = cands.first() else {
            break;
        };
        last = Some(node.clone());
        plan.push((*key, (node.clone(), addrs[node].clone())));
    }
    if plan.is_empty() {
        return (prefix, tiers);
    }
    // Block i goes to lane i % conc; each lane fetches its blocks in order over pipelined
    // connections (one per run of blocks from the same peer), all lanes at once, each its own
    // task so that decryption and checksums spread over the runtime's threads (and stop with
    // the lookup: the set aborts them when dropped). Blocks past a failure may still arrive
    // (they are valid blocks); the answer is the local prefix.
    let now = daemon.now_ms();
    let conc = (peer.cfg.fetch_concurrency as usize).min(plan.len()).max(1);
    let mut lanes = tokio::task::JoinSet::new();
    for lane in 0..conc {
        let mine: Vec<(BlockKey, (String, String))> =
            plan.iter().skip(lane).step_by(conc).cloned().collect();
        let (peer, ns) = (peer.clone(), ns.clone());
        lanes.spawn(async move {
            let mut i = 0;
            while i < mine.len() {
                let (node, addr) = mine[i].1.clone();
                let run: Vec<BlockKey> = mine[i..]
                    .iter()
                    .take_while(|(_, (n, a))| *n == node && *a == addr)
                    .map(|(k, _)| *k)
                    .collect();
                let n = run.len();
                if peer.fetch_run(now, &ns, (&node, &addr), &run).await < n {
                    break;
                }
                i += n;
            }
        });
    }
    while lanes.join_next().await.is_some() {}
    daemon.lookup(ns, keys)
}
