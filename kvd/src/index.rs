//! Cluster index publisher: keeps Redis/Valkey told which blocks this node holds, in which
//! tier, so a router or another node can find a prefix anywhere in the cluster.
//!
//! Schema (every key under `index.key_prefix`, `kvd` by default):
//! - `kvd:nodes` — sorted set of the node names that have published, scored by their last
//!   heartbeat (unix ms); a reader's starting point. Names silent for [`FORGET_NODE_MS`] are
//!   dropped by whichever node heartbeats next.
//! - `kvd:node:<node>` — lease hash `{epoch, version, started_unix_ms, peer}` (`peer`: the
//!   node's data port for peer fetch, empty without one), expiring
//!   `lease_ttl_ms` after the last heartbeat (one every `lease_ttl_ms / 4` at most).
//! - `kvd:res:<node>:<epoch>:<namespace hex>` — hash of what the node holds in that
//!   namespace under that epoch: one field per copy, `<key hex>|<tier>` (`dram`, `disk`).
//!   It expires with the lease, so a dead node's entries vanish by themselves.
//!
//! Holdings are per node and namespace so that publishing is a few large commands (one
//! `HSET` carries up to [`FIELDS_PER_COMMAND`] blocks) rather than one command per block; a
//! lookup asks each live node's hash for the chain's fields with one `HMGET`. A reader counts
//! a node only while its lease exists, and reads the hash of the lease's epoch, so what a
//! node published before it restarted, or before it lost track of changes, stops counting
//! the moment it takes a new epoch — it then republishes everything under that epoch and
//! removes the old hashes.
//!
//! Changes come from the tiers' [`Journal`](crate::residency::Journal)s through
//! [`residency::run`], taken every `publish_interval_ms` and sent as pipelines of at most `batch_commands` commands, never
//! from the request path. When Redis is unreachable kvd keeps serving from its local index,
//! logs one warning per outage, and republishes under a new epoch once Redis is back.
//! Without `index.redis_urls` nothing here runs and kvd says so once at start.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::collections::{BTreeMap, HashMap, HashSet};

use kvd_proto::frame::{ClusterLookup, IndexReport, NodeHolding, TierCounts};
use kvd_proto::{BlockKey, NamespaceId, Tier};
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{Pipeline, RedisError};

use crate::config::IndexConfig;
use crate::daemon::Daemon;
use crate::residency::{self, Batch, Change};
use tokio::sync::mpsc;

/// Why publishing stopped for now (the loop retries; nothing here is fatal).
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// Redis refused or failed a command, or the connection broke.
    #[error("redis at {endpoint}: {source}")]
    Redis {
        /// Host and port only (URLs may hold passwords).
        endpoint: String,
        /// The driver's error.
        #[source]
        source: RedisError,
    },
    /// No answer within `index.timeout_ms`.
    #[error("redis at {endpoint}: no answer within {ms} ms")]
    Timeout {
        /// Host and port only.
        endpoint: String,
        /// The timeout.
        ms: u32,
    },
    /// The disk tier's catalog could not be read for a republish.
    #[error("reading the disk catalog to republish: {0}")]
    Disk(#[from] crate::disk::DiskError),
}

/// This node's name: the configured one, else the host name.
pub fn node_id(cfg: &IndexConfig) -> String {
    if !cfg.node_id.is_empty() {
        return cfg.node_id.clone();
    }
    host_name()
}

/// The host name, with the characters that separate parts of index keys and event topics
/// (`|`, ` `, `@`) replaced by `_`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().replace(['|', ' ', '@'], "_"))
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "kvd".into())
}

/// Redis key of a node's holdings in one namespace under one epoch.
pub fn holdings_key(prefix: &str, node: &str, epoch: u64, ns: &NamespaceId) -> String {
    format!("{prefix}:res:{node}:{epoch}:{}", ns.to_hex())
}

/// Redis key of a node's lease.
pub fn node_key(prefix: &str, node: &str) -> String {
    format!("{prefix}:node:{node}")
}

/// A node whose heartbeat is this old leaves the node set (its lease and holdings expired
/// long before).
pub const FORGET_NODE_MS: u64 = 24 * 3600 * 1000;

/// Redis key of the set of node names.
pub fn nodes_key(prefix: &str) -> String {
    format!("{prefix}:nodes")
}

/// Field of one copy in a holdings hash.
pub fn copy_field(key: &BlockKey, tier: Tier) -> String {
    format!("{}|{}", key.to_hex(), tier.name())
}

/// Most fields one `HSET`/`HDEL`/`HMGET` carries.
pub const FIELDS_PER_COMMAND: usize = 1024;

/// Most fields one pipeline carries (about 5 MB of request), whatever its command count.
const FIELDS_PER_PIPELINE: usize = 64 * FIELDS_PER_COMMAND;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What the publisher has done, for `kvd-ctl status`.
#[derive(Debug, Default)]
pub struct IndexStatus {
    connected: AtomicBool,
    epoch: AtomicU64,
    published: AtomicU64,
    republishes: AtomicU64,
    outages: AtomicU64,
    last_error: parking_lot::Mutex<String>,
}

/// One Redis server or a cluster.
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// A lazily (re)connected Redis handle: a failed command drops the connection and the next
/// one reconnects.
struct Redis {
    cfg: IndexConfig,
    endpoint: String,
    conn: Option<Conn>,
}

impl Redis {
    fn new(cfg: IndexConfig) -> Redis {
        let endpoint = cfg
            .redis_urls
            .iter()
            .map(|u| u.shown())
            .collect::<Vec<_>>()
            .join(",");
        Redis {
            cfg,
            endpoint,
            conn: None,
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.cfg.timeout_ms))
    }

    fn err(&self, source: RedisError) -> IndexError {
        IndexError::Redis {
            endpoint: self.endpoint.clone(),
            source,
        }
    }

    fn timed_out(&self) -> IndexError {
        IndexError::Timeout {
            endpoint: self.endpoint.clone(),
            ms: self.cfg.timeout_ms,
        }
    }

    async fn connect(&self) -> Result<Conn, IndexError> {
        let urls: Vec<String> = self
            .cfg
            .redis_urls
            .iter()
            .map(|u| u.expose().to_owned())
            .collect();
        let t = self.timeout();
        if self.cfg.cluster || urls.len() > 1 {
            let client = redis::cluster::ClusterClient::builder(urls)
                .connection_timeout(t)
                .response_timeout(t)
                .build()
                .map_err(|e| self.err(e))?;
            match tokio::time::timeout(t, client.get_async_connection()).await {
                Ok(c) => Ok(Conn::Cluster(c.map_err(|e| self.err(e))?)),
                Err(_) => Err(self.timed_out()),
            }
        } else {
            let client = redis::Client::open(urls[0].as_str()).map_err(|e| self.err(e))?;
            match tokio::time::timeout(t, client.get_multiplexed_async_connection()).await {
                Ok(c) => Ok(Conn::Single(c.map_err(|e| self.err(e))?)),
                Err(_) => Err(self.timed_out()),
            }
        }
    }

    /// Runs a pipeline (connecting first if needed); any failure drops the connection, and
    /// the next call reconnects.
    async fn query<T: redis::FromRedisValue>(&mut self, p: &Pipeline) -> Result<T, IndexError> {
        if self.conn.is_none() {
            self.conn = Some(self.connect().await?);
        }
        let t = self.timeout();
        let r = match self.conn.as_mut() {
            Some(Conn::Single(c)) => tokio::time::timeout(t, p.query_async::<T>(c)).await,
            // A cluster connection refuses pipelines whose keys live in different slots, so
            // each command goes on its own, all at once (the per-node connections multiplex
            // them); our pipelines are either all ignored (T = ()) or all answered in order.
            Some(Conn::Cluster(c)) => {
                let each = p.cmd_iter().map(|cmd| {
                    let mut c = c.clone();
                    async move { cmd.query_async::<redis::Value>(&mut c).await }
                });
                tokio::time::timeout(t, async {
                    let values = futures_util::future::try_join_all(each).await?;
                    Ok(T::from_redis_value(redis::Value::Array(values))?)
                })
                .await
            }
            None => return Err(self.timed_out()),
        };
        let r = match r {
            Ok(r) => r.map_err(|e| self.err(e)),
            Err(_) => Err(self.timed_out()),
        };
        if r.is_err() {
            self.conn = None;
        }
        r
    }
}

/// The publisher: what it has told Redis, and how.
struct Publisher {
    redis: Redis,
    node: String,
    started_ms: u64,
    epoch: u64,
    /// Everything must be republished under a new epoch before changes mean anything.
    resync: bool,
    last_heartbeat: Option<Instant>,
    /// Namespaces with a holdings hash under the current epoch (their expiry is refreshed
    /// with the lease).
    spaces: HashSet<NamespaceId>,
    /// This node's data port for peer fetch, published in the lease; empty when it has none.
    peer_addr: String,
    status: Arc<IndexStatus>,
}

impl Publisher {
    fn new(cfg: IndexConfig, status: Arc<IndexStatus>, peer_addr: String) -> Publisher {
        Publisher {
            status,
            peer_addr,
            node: node_id(&cfg),
            redis: Redis::new(cfg),
            started_ms: unix_ms(),
            epoch: 0,
            resync: true,
            last_heartbeat: None,
            spaces: Default::default(),
        }
    }

    async fn exec(&mut self, p: &Pipeline) -> Result<(), IndexError> {
        self.redis.query::<()>(p).await
    }

    /// Refreshes the lease and the expiry of this epoch's holdings. A lease that had vanished
    /// although this epoch already wrote it (Redis flushed, evicted or failed over to a
    /// replica without it, or this process stalled past the TTL) means the holdings may be
    /// gone too: everything is republished under a new epoch.
    async fn heartbeat(&mut self) -> Result<(), IndexError> {
        let prefix = &self.redis.cfg.key_prefix;
        let ttl = i64::from(self.redis.cfg.lease_ttl_ms);
        let k = node_key(prefix, &self.node);
        let now = unix_ms();
        let mut p = redis::pipe();
        p.zadd(nodes_key(prefix), &self.node, now);
        // HSET (not HMSET) answers how many fields were new: all of them when the lease had
        // vanished.
        p.cmd("HSET")
            .arg(&k)
            .arg("epoch")
            .arg(self.epoch)
            .arg("version")
            .arg(crate::daemon::VERSION)
            .arg("started_unix_ms")
            .arg(self.started_ms)
            .arg("peer")
            .arg(&self.peer_addr);
        p.pexpire(&k, ttl);
        for ns in &self.spaces {
            p.pexpire(holdings_key(prefix, &self.node, self.epoch, ns), ttl);
        }
        p.zrembyscore(nodes_key(prefix), 0, now.saturating_sub(FORGET_NODE_MS));
        // Nothing ignored, so a single server and a cluster answer alike: ZADD, HSET, ...
        let r: Vec<i64> = self.redis.query(&p).await?;
        let fresh = r.get(1).copied().unwrap_or(0) > 0;
        if fresh && self.last_heartbeat.is_some() && !self.resync {
            tracing::warn!(node = %self.node, epoch = self.epoch,
                "this node's lease had vanished from the cluster index; republishing everything");
            self.resync = true;
        }
        self.last_heartbeat = Some(Instant::now());
        Ok(())
    }

    /// Sends `changes` (and a heartbeat when due): consecutive changes of one namespace and
    /// direction become one `HSET`/`HDEL` of up to [`FIELDS_PER_COMMAND`] fields, in
    /// pipelines of at most `batch_commands` commands and [`FIELDS_PER_PIPELINE`] fields.
    async fn publish(&mut self, changes: &[Change]) -> Result<(), IndexError> {
        let due = self.last_heartbeat.is_none_or(|t| {
            t.elapsed() >= Duration::from_millis(u64::from(self.redis.cfg.lease_ttl_ms / 4))
        });
        let per = self.redis.cfg.batch_commands as usize;
        let prefix = self.redis.cfg.key_prefix.clone();
        let ttl = i64::from(self.redis.cfg.lease_ttl_ms);
        let mut p = redis::pipe();
        let (mut n, mut fields_in) = (0, 0);
        let mut i = 0;
        while i < changes.len() {
            let (ns, stored) = (changes[i].ns, changes[i].stored);
            let run = changes[i..]
                .iter()
                .take(FIELDS_PER_COMMAND)
                .take_while(|c| c.ns == ns && c.stored == stored)
                .count();
            let k = holdings_key(&prefix, &self.node, self.epoch, &ns);
            let fields = changes[i..i + run]
                .iter()
                .map(|c| copy_field(&c.key, c.tier));
            if stored {
                let pairs: Vec<(String, &str)> = fields.map(|f| (f, "1")).collect();
                // The hash may be new (first copy, or every copy had gone): it expires with
                // the lease from the start, or a node dying now would leave it forever.
                p.hset_multiple(&k, &pairs).ignore();
                p.pexpire(&k, ttl).ignore();
                self.spaces.insert(ns);
                n += 1;
            } else {
                p.hdel(&k, fields.collect::<Vec<_>>()).ignore();
            }
            n += 1;
            i += run;
            fields_in += run;
            if n >= per || fields_in >= FIELDS_PER_PIPELINE {
                self.exec(&p).await?;
                p = redis::pipe();
                (n, fields_in) = (0, 0);
            }
        }
        if n > 0 {
            self.exec(&p).await?;
        }
        if due {
            // After the changes, so a hash created in this round gets its expiry refreshed.
            self.heartbeat().await?;
        }
        self.status
            .published
            .fetch_add(changes.len() as u64, Ordering::Relaxed);
        self.status.connected.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Takes a new epoch, announces it, and publishes everything the node holds under it.
    async fn republish(
        &mut self,
        daemon: &Daemon,
        rx: &mut mpsc::Receiver<Batch>,
    ) -> Result<u64, IndexError> {
        // Changes recorded so far are covered by the snapshot below; later ones follow it
        // (and one taken meanwhile, replayed after it, sets a field as it already is).
        drop(residency::drain(rx));
        let (old_epoch, old_spaces) = (self.epoch, std::mem::take(&mut self.spaces));
        self.epoch = unix_ms().max(self.epoch + 1);
        self.status.epoch.store(self.epoch, Ordering::Relaxed);
        self.status.republishes.fetch_add(1, Ordering::Relaxed);
        self.last_heartbeat = None;
        self.publish(&[]).await?;
        let mut sent = 0u64;
        let per = FIELDS_PER_PIPELINE;
        for ns in daemon.namespaces() {
            let keys = ns.store.lock().live_keys();
            for chunk in keys.chunks(per) {
                let changes: Vec<Change> = chunk
                    .iter()
                    .map(|&key| Change::stored(ns.id, key, Tier::Dram))
                    .collect();
                self.publish(&changes).await?;
                sent += changes.len() as u64;
            }
        }
        if let Some(disk) = &daemon.disk {
            let mut after = None;
            loop {
                let page = disk.block_keys(after, per)?;
                let Some(&last) = page.last() else { break };
                let changes: Vec<Change> = page
                    .iter()
                    .map(|&(ns, key)| Change::stored(ns, key, Tier::Disk))
                    .collect();
                self.publish(&changes).await?;
                sent += changes.len() as u64;
                after = Some(last);
            }
        }
        // What this process published under its previous epoch (it expires anyway).
        if !old_spaces.is_empty() {
            let mut p = redis::pipe();
            for ns in &old_spaces {
                p.del(holdings_key(
                    &self.redis.cfg.key_prefix,
                    &self.node,
                    old_epoch,
                    ns,
                ))
                .ignore();
            }
            self.exec(&p).await?;
        }
        Ok(sent)
    }

    /// One publishing round: connect if needed, republish if needed, else send the changes.
    async fn round(
        &mut self,
        daemon: &Daemon,
        rx: &mut mpsc::Receiver<Batch>,
    ) -> Result<(), IndexError> {
        if self.resync {
            let t = Instant::now();
            let n = self.republish(daemon, rx).await?;
            self.resync = false;
            tracing::info!(
                endpoint = %self.redis.endpoint,
                node = %self.node,
                blocks = n,
                epoch = self.epoch,
                ms = t.elapsed().as_millis() as u64,
                "published this node's blocks to the cluster index"
            );
            return Ok(());
        }
        let (changes, lost) = residency::drain(rx);
        if lost {
            tracing::warn!(
                "more residency changes than index.journal_changes between two rounds; \
                 republishing everything under a new epoch"
            );
            self.resync = true;
            return Ok(());
        }
        self.publish(&changes).await
    }

    /// Removes the lease so lookups stop naming this node at once.
    async fn leave(&mut self) {
        let prefix = &self.redis.cfg.key_prefix;
        let mut p = redis::pipe();
        p.del(node_key(prefix, &self.node)).ignore();
        for ns in &self.spaces {
            p.del(holdings_key(prefix, &self.node, self.epoch, ns))
                .ignore();
        }
        if let Err(e) = self.exec(&p).await {
            tracing::debug!(error = %e, "could not remove the node lease at shutdown");
        }
    }
}

/// Answers cluster lookups from the index, on a connection of its own so a lookup never
/// waits behind a publishing round.
pub struct IndexReader {
    redis: tokio::sync::Mutex<Redis>,
    /// What the publisher has done.
    pub status: Arc<IndexStatus>,
    endpoint: String,
    node: String,
    prefix: String,
    batch: usize,
}

impl std::fmt::Debug for IndexReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexReader")
            .field("node", &self.node)
            .finish()
    }
}

/// What the index says about a chain: who holds each leading block, and where the nodes
/// listen for peer fetch.
#[derive(Debug, Default)]
pub struct Holders {
    /// For each leading key, the live (node, tier) pairs holding it.
    pub per_key: Vec<Vec<(String, Tier)>>,
    /// Each live node's data-port address, when it published one.
    pub peers: HashMap<String, String>,
}

/// Keys asked of Redis per round trip in a lookup; the walk stops at the first chunk with a
/// block nobody holds.
const LOOKUP_CHUNK: usize = 256;

impl IndexReader {
    /// A reader for `cfg`; `None` when no index is configured.
    pub fn new(cfg: &IndexConfig) -> Option<IndexReader> {
        cfg.enabled().then(|| {
            let redis = Redis::new(cfg.clone());
            IndexReader {
                status: Arc::default(),
                endpoint: redis.endpoint.clone(),
                node: node_id(cfg),
                prefix: cfg.key_prefix.clone(),
                batch: LOOKUP_CHUNK.min(cfg.batch_commands as usize),
                redis: tokio::sync::Mutex::new(redis),
            }
        })
    }

    /// This node's name in the index.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The publisher's state, for the stats.
    pub fn report(&self) -> IndexReport {
        let s = &self.status;
        IndexReport {
            endpoint: self.endpoint.clone(),
            node: self.node.clone(),
            connected: s.connected.load(Ordering::Relaxed),
            epoch: s.epoch.load(Ordering::Relaxed),
            published: s.published.load(Ordering::Relaxed),
            republishes: s.republishes.load(Ordering::Relaxed),
            outages: s.outages.load(Ordering::Relaxed),
            last_error: s.last_error.lock().clone(),
        }
    }

    /// For each leading key of the chain, the live (node, tier) pairs holding it (stopping
    /// after the first chunk that contains a key nobody holds), and the data-port address
    /// each live node published in its lease (nodes without one are left out of the map).
    pub async fn holders(
        &self,
        ns: &NamespaceId,
        keys: &[BlockKey],
    ) -> Result<Holders, IndexError> {
        let mut redis = self.redis.lock().await;
        let mut p = redis::pipe();
        p.zrange(nodes_key(&self.prefix), 0, -1);
        let (mut names,): (Vec<String>,) = redis.query(&p).await?;
        names.retain(|n| !n.is_empty() && n.len() <= 128);
        names.sort();
        let mut p = redis::pipe();
        for n in &names {
            p.cmd("HMGET")
                .arg(node_key(&self.prefix, n))
                .arg("epoch")
                .arg("peer");
        }
        let leases: Vec<(Option<String>, Option<String>)> = if names.is_empty() {
            Vec::new()
        } else {
            redis.query(&p).await?
        };
        let mut out = Holders::default();
        let mut live: Vec<(String, u64)> = Vec::new();
        for (n, (epoch, peer)) in names.into_iter().zip(leases) {
            let Some(epoch) = epoch.and_then(|e| e.parse().ok()) else {
                continue;
            };
            if let Some(a) = peer.filter(|a| !a.is_empty() && a.len() <= 256) {
                out.peers.insert(n.clone(), a);
            }
            live.push((n, epoch));
        }
        if live.is_empty() {
            return Ok(out);
        }
        let tiers = [Tier::Dram, Tier::Disk, Tier::S3];
        for chunk in keys.chunks(self.batch.max(1)) {
            let fields: Vec<String> = chunk
                .iter()
                .flat_map(|k| tiers.iter().map(move |t| copy_field(k, *t)))
                .collect();
            let mut p = redis::pipe();
            for (n, e) in &live {
                p.cmd("HMGET")
                    .arg(holdings_key(&self.prefix, n, *e, ns))
                    .arg(&fields);
            }
            let got: Vec<Vec<Option<String>>> = redis.query(&p).await?;
            let mut ended = false;
            for (i, _) in chunk.iter().enumerate() {
                let mut hs = Vec::new();
                for ((n, _), vals) in live.iter().zip(&got) {
                    for (j, t) in tiers.iter().enumerate() {
                        if vals.get(i * tiers.len() + j).is_some_and(Option::is_some) {
                            hs.push((n.clone(), *t));
                        }
                    }
                }
                ended |= hs.is_empty();
                out.per_key.push(hs);
            }
            if ended {
                break;
            }
        }
        Ok(out)
    }
}

/// Folds per-key holders into a lookup answer: the chain's prefix held anywhere, and each
/// node's own leading run with the fastest tier per block. `local`, when given, replaces
/// what the index says about the answering node (its catalogs are fresher than what it has
/// published).
pub fn summarize(holders: &[Vec<(String, Tier)>], local: Option<NodeHolding>) -> ClusterLookup {
    // Per node: its leading run so far, and where those blocks are.
    let mut runs: BTreeMap<&str, (u32, TierCounts)> = BTreeMap::new();
    let mut prefix_len = 0u32;
    for (i, hs) in holders.iter().enumerate() {
        if hs.is_empty() {
            break;
        }
        prefix_len += 1;
        let mut fastest: BTreeMap<&str, Tier> = BTreeMap::new();
        for (n, t) in hs {
            let e = fastest.entry(n.as_str()).or_insert(*t);
            if (*t as u8) < (*e as u8) {
                *e = *t;
            }
        }
        for (n, t) in fastest {
            let r = runs.entry(n).or_default();
            // A run continues only while the node held every earlier key: once it missed
            // one, its length stays behind `i` for good.
            if r.0 as usize == i {
                r.0 += 1;
                r.1.add(t);
            }
        }
    }
    let mut nodes: Vec<NodeHolding> = runs
        .into_iter()
        .filter(|(_, r)| r.0 > 0)
        .map(|(n, r)| NodeHolding {
            node: n.to_string(),
            prefix_len: r.0,
            tiers: r.1,
            local: false,
        })
        .collect();
    if let Some(l) = local {
        nodes.retain(|n| n.node != l.node);
        prefix_len = prefix_len.max(l.prefix_len);
        if l.prefix_len > 0 {
            nodes.push(NodeHolding { local: true, ..l });
        }
    }
    nodes.sort_by(|a, b| b.prefix_len.cmp(&a.prefix_len).then(a.node.cmp(&b.node)));
    ClusterLookup {
        prefix_len,
        nodes,
        cluster: true,
    }
}

/// Publishes the residency changes arriving on `rx` until `stop` fires.
pub async fn run(
    daemon: Arc<Daemon>,
    mut rx: mpsc::Receiver<Batch>,
    stop: Arc<tokio::sync::Notify>,
) {
    let cfg = daemon.cfg.index.clone();
    let interval = Duration::from_millis(u64::from(cfg.publish_interval_ms));
    let status = daemon
        .index
        .as_ref()
        .map(|r| r.status.clone())
        .unwrap_or_default();
    let peer_addr = daemon
        .peer
        .as_ref()
        .map(|p| p.advertise().to_owned())
        .unwrap_or_default();
    let mut p = Publisher::new(cfg, status.clone(), peer_addr);
    let mut down_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stop.notified() => break,
            _ = tokio::time::sleep(interval) => {}
        }
        match p.round(&daemon, &mut rx).await {
            Ok(()) => {
                if let Some(t) = down_since.take() {
                    tracing::info!(endpoint = %p.redis.endpoint, after_ms = t.elapsed().as_millis() as u64,
                        "cluster index reachable again");
                }
            }
            Err(e) => {
                status.connected.store(false, Ordering::Relaxed);
                *status.last_error.lock() = e.to_string();
                if down_since.is_none() {
                    status.outages.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "cluster index unavailable; serving from the \
                        local index, will republish when it is back");
                    down_since = Some(Instant::now());
                }
                p.resync = true;
                // While away, changes are not kept: the republish covers them.
                drop(residency::drain(&mut rx));
                tokio::select! {
                    _ = stop.notified() => break,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
    p.leave().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, Tier)]) -> Vec<(String, Tier)> {
        pairs.iter().map(|(n, t)| (n.to_string(), *t)).collect()
    }

    #[test]
    fn summarize_counts_each_nodes_leading_run_and_the_prefix_held_anywhere() {
        let holders = vec![
            h(&[("a", Tier::Dram), ("a", Tier::Disk), ("b", Tier::Disk)]),
            h(&[("a", Tier::Disk), ("b", Tier::Disk)]),
            h(&[("b", Tier::Dram), ("c", Tier::Dram)]),
            h(&[("a", Tier::Dram)]),
            h(&[]),
            h(&[("a", Tier::Dram), ("b", Tier::Dram)]),
        ];
        let r = summarize(&holders, None);
        assert_eq!(r.prefix_len, 4, "block 4 is held nowhere");
        let got: Vec<(&str, u32, [u32; 4])> = r
            .nodes
            .iter()
            .map(|n| (n.node.as_str(), n.prefix_len, n.tiers.0))
            .collect();
        // a: blocks 0,1 (dram, disk) then a gap at 2; b: 0..=2; c holds only block 2.
        assert_eq!(got, [("b", 3, [0, 1, 2, 0]), ("a", 2, [0, 1, 1, 0])]);
        // The answering node's own view replaces what the index said about it.
        let local = NodeHolding {
            node: "a".into(),
            prefix_len: 5,
            tiers: TierCounts([0, 5, 0, 0]),
            local: true,
        };
        let r = summarize(&holders, Some(local));
        assert_eq!(r.prefix_len, 5);
        assert_eq!((r.nodes[0].node.as_str(), r.nodes[0].local), ("a", true));
        assert_eq!(r.nodes.len(), 2);
    }

    #[test]
    fn key_layout() {
        let ns = NamespaceId([0xab; 16]);
        let key = BlockKey([1; 32]);
        let k = holdings_key("kvd", "n1", 42, &ns);
        assert_eq!(k, format!("kvd:res:n1:42:{}", "ab".repeat(16)));
        assert_eq!(
            copy_field(&key, Tier::Disk),
            format!("{}|disk", "01".repeat(32))
        );
        assert_eq!(node_key("kvd", "n1"), "kvd:node:n1");
        assert_eq!(nodes_key("kvd"), "kvd:nodes");
    }
}
