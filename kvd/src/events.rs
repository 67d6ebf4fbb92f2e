//! KV events in vLLM's wire format over ZMQ, so a prefix-cache-aware router (llm-d's precise
//! scorer) sees the blocks kvd holds, tier by tier, as it sees an engine's own.
//!
//! Wire (DESIGN.md §6, vLLM's `ZmqEventPublisher`): PUB messages of three frames
//! `[topic, seq, payload]` — topic `kv@<pod>@<model>`, `seq` a big-endian u64 counting
//! batches from 0, payload a msgpack `[ts, [events…], dp_rank]`. Events are
//! `BlockStored {block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
//! lora_name, …}`, `BlockRemoved {block_hashes, medium, …}` and `AllBlocksCleared {}`, as
//! maps with a `type` field (vLLM ≥ 0.28) or as positional arrays led by the type name
//! (older vLLM), by configuration. A block hash is the last 8 bytes of its key read
//! big-endian, as vLLM turns its own digests into integers. `medium` names the tier
//! (`CPU`, `DISK`, `OBJECT_STORE` by default).
//!
//! Changes arrive from the tiers' journals through [`residency::run`]; a block's tokens and
//! parent come from the [`Lineage`](crate::lineage::Lineage) the engine sent. A block stored
//! without one is not announced (an event without tokens is dropped by llm-d anyway) and is
//! counted. When changes were lost (the feed overflowed) every known model's topic gets
//! `AllBlocksCleared` and then everything still held is announced again.
//!
//! An optional ROUTER socket replays the last `replay_batches` batches: a request
//! `[identity, "", start_seq]` is answered with `[identity, "", topic, seq, payload]` for
//! every kept batch from `start_seq` on, then `[identity, "", "", -1, ""]`. Requests are
//! answered on the requester's own connection task, never on the publisher's loop.
//! Like vLLM, an endpoint with `*` or an `ipc://` one is bound; any other is connected to,
//! and reconnected to when the subscriber goes away. The sockets speak ZMTP through
//! [`crate::zmtp`], which bounds what a peer can make them allocate or hold.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use kvd_proto::frame::EventsReport;
use kvd_proto::{BlockKey, NamespaceId, Tier};
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::config::{EventForm, EventsConfig};
use crate::daemon::Daemon;
use crate::lineage::Lineage;
use crate::residency::{self, Batch, Change};
use crate::zmtp::{self, PubSocket, RouterSocket, ZmtpError};

/// How long the publisher waits at shutdown for its last messages to be written.
const SHUTDOWN_LINGER: Duration = Duration::from_millis(200);

/// Most events in one batch (one ZMQ message).
pub const EVENTS_PER_BATCH: usize = 512;
/// Most blocks in one `BlockStored`/`BlockRemoved` event.
pub const BLOCKS_PER_EVENT: usize = 256;
/// Sequence number of the replay's end marker (-1 as a signed big-endian i64).
const END_SEQ: [u8; 8] = [0xff; 8];

/// The u64 an event carries for a key: its last 8 bytes, big-endian.
pub fn block_hash(key: &BlockKey) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key.0[24..]);
    u64::from_be_bytes(b)
}

/// One KV event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Blocks now held, each the parent of the next.
    Stored {
        /// Their hashes.
        hashes: Vec<u64>,
        /// Hash of the first one's parent.
        parent: Option<u64>,
        /// Their tokens, concatenated.
        tokens: Vec<u32>,
        /// Tokens per block.
        block_size: u32,
        /// Tier name.
        medium: Arc<str>,
        /// LoRA adapter.
        lora: Option<Arc<str>>,
    },
    /// Blocks no longer held in `medium`.
    Removed {
        /// Their hashes.
        hashes: Vec<u64>,
        /// Tier name.
        medium: Arc<str>,
    },
    /// Forget everything this publisher announced.
    Cleared,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = rmp::encode::write_str(out, s);
}

fn put_u64s(out: &mut Vec<u8>, v: impl ExactSizeIterator<Item = u64>) {
    let _ = rmp::encode::write_array_len(out, v.len() as u32);
    for x in v {
        let _ = rmp::encode::write_uint(out, x);
    }
}

fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => put_str(out, s),
        None => {
            let _ = rmp::encode::write_nil(out);
        }
    }
}

impl Event {
    fn encode(&self, form: EventForm, out: &mut Vec<u8>) {
        use rmp::encode::{write_array_len, write_map_len, write_nil, write_uint};
        let map = form == EventForm::Map;
        // Each field: in map form its name first; in array form its position says it.
        let field = |out: &mut Vec<u8>, name: &str| {
            if map {
                put_str(out, name);
            }
        };
        let head = |out: &mut Vec<u8>, n: u32, ty: &str| {
            if map {
                let _ = write_map_len(out, n);
                put_str(out, "type");
            } else {
                let _ = write_array_len(out, n);
            }
            put_str(out, ty);
        };
        match self {
            Event::Stored {
                hashes,
                parent,
                tokens,
                block_size,
                medium,
                lora,
            } => {
                head(out, 10, "BlockStored");
                field(out, "block_hashes");
                put_u64s(out, hashes.iter().copied());
                field(out, "parent_block_hash");
                match parent {
                    Some(p) => {
                        let _ = write_uint(out, *p);
                    }
                    None => {
                        let _ = write_nil(out);
                    }
                }
                field(out, "token_ids");
                put_u64s(out, tokens.iter().map(|&t| u64::from(t)));
                field(out, "block_size");
                let _ = write_uint(out, u64::from(*block_size));
                field(out, "lora_id");
                let _ = write_nil(out);
                field(out, "medium");
                put_str(out, medium);
                field(out, "lora_name");
                put_opt_str(out, lora.as_deref());
                field(out, "extra_keys");
                let _ = write_nil(out);
                field(out, "group_idx");
                let _ = write_uint(out, 0);
            }
            Event::Removed { hashes, medium } => {
                head(out, 4, "BlockRemoved");
                field(out, "block_hashes");
                put_u64s(out, hashes.iter().copied());
                field(out, "medium");
                put_str(out, medium);
                field(out, "group_idx");
                let _ = write_uint(out, 0);
            }
            Event::Cleared => head(out, 1, "AllBlocksCleared"),
        }
    }
}

/// Encodes one batch: `[ts, [events…], dp_rank]`.
pub fn encode_batch(form: EventForm, ts: f64, events: &[Event], dp_rank: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + events.len() * 64);
    let _ = rmp::encode::write_array_len(&mut out, 3);
    let _ = rmp::encode::write_f64(&mut out, ts);
    let _ = rmp::encode::write_array_len(&mut out, events.len() as u32);
    for e in events {
        e.encode(form, &mut out);
    }
    let _ = rmp::encode::write_uint(&mut out, u64::from(dp_rank));
    out
}

/// Tier → `medium` names.
#[derive(Debug, Clone)]
pub struct Media([Arc<str>; 4]);

impl Media {
    /// From the configuration.
    pub fn new(cfg: &EventsConfig) -> Media {
        Media([
            cfg.medium_gpu.as_str().into(),
            cfg.medium_dram.as_str().into(),
            cfg.medium_disk.as_str().into(),
            cfg.medium_s3.as_str().into(),
        ])
    }

    fn of(&self, t: Tier) -> Arc<str> {
        self.0[t as usize].clone()
    }
}

/// Turns residency changes into events, grouped by namespace (each namespace's model is its
/// own topic). Consecutive stores in one tier whose parents chain become one `BlockStored`,
/// consecutive removals from one tier one `BlockRemoved`. Returns the events per namespace
/// and how many stored blocks were skipped for want of a lineage.
pub fn to_events(
    changes: &[Change],
    lineage: &Lineage,
    media: &Media,
) -> (Vec<(NamespaceId, Vec<Event>)>, u64) {
    let mut out: Vec<(NamespaceId, Vec<Event>)> = Vec::new();
    let mut skipped = 0u64;
    // (namespace, tier, last key) of the event being extended.
    let mut open: Option<(NamespaceId, Tier, bool, BlockKey)> = None;
    for c in changes {
        let Some(space) = lineage.space(&c.ns) else {
            // No engine ever described this namespace: nothing of it was announced.
            skipped += u64::from(c.stored);
            continue;
        };
        if out.last().is_none_or(|(ns, _)| *ns != c.ns) {
            out.push((c.ns, Vec::new()));
            open = None;
        }
        let Some((_, events)) = out.last_mut() else {
            continue;
        };
        if c.stored {
            let Some(entry) = lineage.get(&c.ns, &c.key) else {
                skipped += 1;
                continue;
            };
            let extends = matches!(open, Some((ns, t, true, last))
                if ns == c.ns && t == c.tier && entry.parent == Some(last));
            if let (true, Some(Event::Stored { hashes, tokens, .. })) = (extends, events.last_mut())
            {
                if hashes.len() < BLOCKS_PER_EVENT {
                    hashes.push(block_hash(&c.key));
                    tokens.extend_from_slice(&entry.tokens);
                    open = Some((c.ns, c.tier, true, c.key));
                    continue;
                }
            }
            events.push(Event::Stored {
                hashes: vec![block_hash(&c.key)],
                parent: entry.parent.as_ref().map(block_hash),
                tokens: entry.tokens.to_vec(),
                block_size: space.block_tokens,
                medium: media.of(c.tier),
                lora: space.lora.clone(),
            });
            open = Some((c.ns, c.tier, true, c.key));
        } else {
            let extends = matches!(open, Some((ns, t, false, _)) if ns == c.ns && t == c.tier);
            if let (true, Some(Event::Removed { hashes, .. })) = (extends, events.last_mut()) {
                if hashes.len() < BLOCKS_PER_EVENT {
                    hashes.push(block_hash(&c.key));
                    continue;
                }
            }
            events.push(Event::Removed {
                hashes: vec![block_hash(&c.key)],
                medium: media.of(c.tier),
            });
            open = Some((c.ns, c.tier, false, c.key));
        }
    }
    out.retain(|(_, e)| !e.is_empty());
    (out, skipped)
}

/// Counters of the publisher, for `kvd-ctl status`.
#[derive(Debug, Default)]
pub struct EventsStatus {
    batches: AtomicU64,
    events: AtomicU64,
    skipped: AtomicU64,
    resyncs: AtomicU64,
    next_seq: AtomicU64,
    last_error: Mutex<String>,
}

/// The daemon's side of KV events: the engine's lineages and the publisher's counters.
#[derive(Debug)]
pub struct Events {
    /// What the engine said about its blocks.
    pub lineage: Mutex<Lineage>,
    status: EventsStatus,
    cfg: EventsConfig,
    topic_prefix: String,
}

impl Events {
    /// Present when `events.endpoint` is set.
    pub fn new(cfg: &EventsConfig) -> Option<Events> {
        if !cfg.enabled() {
            return None;
        }
        let pod = if cfg.pod.is_empty() {
            crate::index::host_name()
        } else {
            cfg.pod.clone()
        };
        Some(Events {
            lineage: Mutex::new(Lineage::new(cfg.lineage_blocks as usize)),
            status: EventsStatus::default(),
            topic_prefix: format!("kv@{pod}@"),
            cfg: cfg.clone(),
        })
    }

    /// The state for `kvd-ctl status`.
    pub fn report(&self) -> EventsReport {
        let s = &self.status;
        EventsReport {
            endpoint: self.cfg.endpoint.clone(),
            replay_endpoint: self.cfg.replay_endpoint.clone(),
            topic_prefix: self.topic_prefix.clone(),
            form: match self.cfg.form {
                EventForm::Map => "map",
                EventForm::Array => "array",
            }
            .into(),
            batches: s.batches.load(Ordering::Relaxed),
            events: s.events.load(Ordering::Relaxed),
            skipped: s.skipped.load(Ordering::Relaxed),
            resyncs: s.resyncs.load(Ordering::Relaxed),
            next_seq: s.next_seq.load(Ordering::Relaxed),
            lineage_blocks: self.lineage.lock().len() as u64,
            last_error: s.last_error.lock().clone(),
        }
    }

    fn topic(&self, model: &str) -> Bytes {
        Bytes::from(format!("{}{model}", self.topic_prefix))
    }

    fn error(&self, what: String) {
        *self.status.last_error.lock() = what;
    }
}

/// Whether vLLM would bind this endpoint rather than connect to it.
pub fn binds(endpoint: &str) -> bool {
    endpoint.contains('*') || endpoint.contains("::") || endpoint.starts_with("ipc://")
}

fn unix_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Batches kept for replay: `(seq, topic, payload)`, oldest first.
type Kept = Arc<Mutex<VecDeque<(u64, Bytes, Bytes)>>>;

/// How long a replay requester may leave its answer unread before it is cut off.
const REPLAY_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The sockets and the replay buffer.
struct Publisher {
    events: Arc<Events>,
    pub_sock: PubSocket,
    replay: Option<RouterSocket>,
    kept: Kept,
    media: Media,
    seq: u64,
}

impl Publisher {
    /// Sends `events` on `topic` in batches of at most [`EVENTS_PER_BATCH`].
    async fn send(&mut self, topic: &Bytes, events: &[Event]) {
        let cfg = &self.events.cfg;
        for chunk in events.chunks(EVENTS_PER_BATCH) {
            let payload = Bytes::from(encode_batch(cfg.form, unix_secs(), chunk, cfg.dp_rank));
            let seq = self.seq;
            self.seq += 1;
            let frames = [
                topic.clone(),
                Bytes::copy_from_slice(&seq.to_be_bytes()),
                payload.clone(),
            ];
            // PUB drops what a slow or absent subscriber cannot take, as ZMQ does.
            self.pub_sock.send(&frames);
            if self.replay.is_some() {
                let mut kept = self.kept.lock();
                if kept.len() >= cfg.replay_batches as usize {
                    kept.pop_front();
                }
                kept.push_back((seq, topic.clone(), payload));
            }
            let s = &self.events.status;
            s.batches.fetch_add(1, Ordering::Relaxed);
            s.events.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            s.next_seq.store(self.seq, Ordering::Relaxed);
        }
    }

    /// Publishes a batch of residency changes.
    async fn publish(&mut self, changes: &[Change]) {
        let (per_ns, skipped) = {
            let l = self.events.lineage.lock();
            let (per_ns, skipped) = to_events(changes, &l, &self.media);
            let per_ns: Vec<(Bytes, Vec<Event>)> = per_ns
                .into_iter()
                .filter_map(|(ns, ev)| l.space(&ns).map(|s| (self.events.topic(&s.model), ev)))
                .collect();
            (per_ns, skipped)
        };
        self.events
            .status
            .skipped
            .fetch_add(skipped, Ordering::Relaxed);
        for (topic, ev) in per_ns {
            self.send(&topic, &ev).await;
        }
    }

    /// At shutdown: publishes what is still queued, then a `BlockRemoved` (DRAM medium) for
    /// every block DRAM holds, since the DRAM tier goes away with the process. Disk copies
    /// outlive it and are not withdrawn.
    async fn announce_shutdown(&mut self, daemon: &Daemon, rx: &mut mpsc::Receiver<Batch>) {
        if !self.pub_sock.is_connected() {
            return;
        }
        let (pending, lost) = residency::drain(rx);
        if !lost {
            self.publish(&pending).await;
        }
        let mut gone = Vec::new();
        for ns in daemon.namespaces() {
            let keys = ns.store.lock().live_keys();
            gone.extend(
                keys.into_iter()
                    .map(|k| Change::removed(ns.id, k, Tier::Dram)),
            );
        }
        let n = gone.len();
        self.publish(&gone).await;
        // Linger (as a ZMQ socket's LINGER would) so the last batches leave before the
        // runtime stops.
        self.pub_sock.flush(SHUTDOWN_LINGER).await;
        tracing::info!(blocks = n, "KV events: DRAM copies withdrawn at shutdown");
    }

    /// Clears every known model's topic and announces what the node holds again.
    async fn resync(&mut self, daemon: &Daemon, rx: &mut mpsc::Receiver<Batch>) {
        drop(residency::drain(rx));
        self.events.status.resyncs.fetch_add(1, Ordering::Relaxed);
        let spaces: Vec<(NamespaceId, Arc<str>)> = self
            .events
            .lineage
            .lock()
            .spaces()
            .map(|(ns, s)| (*ns, s.model.clone()))
            .collect();
        let mut models: Vec<&Arc<str>> = spaces.iter().map(|(_, m)| m).collect();
        models.sort();
        models.dedup();
        for m in models {
            let topic = self.events.topic(m);
            self.send(&topic, &[Event::Cleared]).await;
        }
        let mut snapshot = Vec::new();
        for ns in daemon.namespaces() {
            if spaces.iter().any(|(id, _)| *id == ns.id) {
                let keys = ns.store.lock().live_keys();
                snapshot.extend(
                    keys.into_iter()
                        .map(|k| Change::stored(ns.id, k, Tier::Dram)),
                );
            }
        }
        if let Some(disk) = &daemon.disk {
            let mut after = None;
            loop {
                let page = match disk.block_keys(after, 1 << 16) {
                    Ok(p) => p,
                    Err(e) => {
                        self.events.error(format!("listing the disk tier: {e}"));
                        break;
                    }
                };
                let Some(&last) = page.last() else { break };
                snapshot.extend(
                    page.into_iter()
                        .filter(|(ns, _)| spaces.iter().any(|(id, _)| id == ns))
                        .map(|(ns, k)| Change::stored(ns, k, Tier::Disk)),
                );
                after = Some(last);
            }
        }
        // Blocks without a lineage are skipped (and counted) as in any round.
        self.publish(&snapshot).await;
        tracing::info!(
            blocks = snapshot.len(),
            "KV events: cleared and re-announced what this node holds"
        );
    }
}

/// The replay socket's answer to a request `[start_seq]`: every kept batch from `start_seq`
/// on, then the end marker. A malformed request is named in the status and not answered.
fn replay_answer(events: Arc<Events>, kept: Kept) -> zmtp::Answer {
    Box::new(move |req: &[Bytes]| {
        let start = match req {
            [seq] => <[u8; 8]>::try_from(seq.as_ref()).ok(),
            _ => None,
        };
        let Some(start) = start.map(u64::from_be_bytes) else {
            events.error(format!(
                "replay request of {} frames ignored (want one 8-byte sequence number)",
                req.len()
            ));
            return Vec::new();
        };
        let mut out: Vec<Vec<Bytes>> = kept
            .lock()
            .iter()
            .filter(|(s, _, _)| *s >= start)
            .map(|(seq, topic, payload)| {
                vec![
                    topic.clone(),
                    Bytes::copy_from_slice(&seq.to_be_bytes()),
                    payload.clone(),
                ]
            })
            .collect();
        out.push(vec![
            Bytes::new(),
            Bytes::from_static(&END_SEQ),
            Bytes::new(),
        ]);
        out
    })
}

/// Why the publisher could not start.
#[derive(Debug, thiserror::Error)]
#[error("KV events: cannot bind {endpoint}: {source}")]
pub struct BindError {
    endpoint: String,
    #[source]
    source: ZmtpError,
}

/// Binds what must be bound (so a bad endpoint fails the start), then publishes the
/// changes arriving on `rx` until `stop` fires.
pub async fn start(
    daemon: Arc<Daemon>,
    events: Arc<Events>,
    rx: mpsc::Receiver<Batch>,
    stop: Arc<tokio::sync::Notify>,
) -> Result<tokio::task::JoinHandle<()>, BindError> {
    let cfg = events.cfg.clone();
    let limits = zmtp::Limits::default();
    let bind_err = |endpoint: &str| {
        let endpoint = endpoint.to_owned();
        move |source| BindError { endpoint, source }
    };
    let pub_sock = if binds(&cfg.endpoint) {
        PubSocket::bind(&cfg.endpoint, limits).await
    } else {
        PubSocket::connect(&cfg.endpoint, limits)
    }
    .map_err(bind_err(&cfg.endpoint))?;
    let kept = Kept::default();
    let replay = if cfg.replay_endpoint.is_empty() {
        None
    } else {
        let answer = replay_answer(events.clone(), kept.clone());
        let r = RouterSocket::bind(&cfg.replay_endpoint, limits, REPLAY_WRITE_TIMEOUT, answer)
            .await
            .map_err(bind_err(&cfg.replay_endpoint))?;
        Some(r)
    };
    tracing::info!(endpoint = %cfg.endpoint, replay = %cfg.replay_endpoint,
        topic = %events.topic_prefix, "publishing KV events");
    let p = Publisher {
        media: Media::new(&cfg),
        events,
        pub_sock,
        replay,
        kept,
        seq: 0,
    };
    Ok(tokio::spawn(run(daemon, p, rx, stop)))
}

async fn run(
    daemon: Arc<Daemon>,
    mut p: Publisher,
    mut rx: mpsc::Receiver<Batch>,
    stop: Arc<tokio::sync::Notify>,
) {
    loop {
        if !p.pub_sock.is_connected() {
            // Changes wait in the feed meanwhile; if it overflows, a resync follows.
            tokio::select! {
                _ = stop.notified() => break,
                _ = p.pub_sock.wait_connected(true) => {}
            }
        }
        tokio::select! {
            _ = stop.notified() => {
                p.announce_shutdown(&daemon, &mut rx).await;
                break;
            }
            b = rx.recv() => {
                // The feed ends only at shutdown, after its last round.
                let Some(b) = b else {
                    p.announce_shutdown(&daemon, &mut rx).await;
                    break;
                };
                if b.lost {
                    tracing::warn!("KV events: changes were lost (publisher behind); \
                        clearing and re-announcing");
                    p.resync(&daemon, &mut rx).await;
                } else {
                    p.publish(&b.changes).await;
                }
            }
            _ = p.pub_sock.wait_connected(false) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lineage::Space;

    fn k(i: u8) -> BlockKey {
        let mut b = [0u8; 32];
        b[31] = i;
        b[0] = 0xee;
        BlockKey(b)
    }

    fn media() -> Media {
        Media::new(&EventsConfig::default())
    }

    fn lineage(ns: NamespaceId) -> Lineage {
        let mut l = Lineage::new(1024);
        let space = Space {
            model: "tiny".into(),
            lora: Some("ad".into()),
            block_tokens: 2,
        };
        l.record(ns, space, None, &[k(1), k(2), k(3)], &[1, 2, 3, 4, 5, 6]);
        l
    }

    #[test]
    fn hashes_are_the_last_eight_bytes_big_endian() {
        let mut key = [0u8; 32];
        key[24..].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(block_hash(&BlockKey(key)), 0x0102_0304_0506_0708);
    }

    #[test]
    fn chained_stores_merge_and_removals_group_per_tier() {
        let ns = NamespaceId([1; 16]);
        let l = lineage(ns);
        let changes = [
            Change::stored(ns, k(1), Tier::Dram),
            Change::stored(ns, k(2), Tier::Dram),
            Change::stored(ns, k(3), Tier::Disk),
            Change::stored(ns, k(9), Tier::Dram),
            Change::removed(ns, k(1), Tier::Dram),
            Change::removed(ns, k(2), Tier::Dram),
            Change::removed(ns, k(3), Tier::Disk),
            Change::stored(NamespaceId([2; 16]), k(1), Tier::Dram),
        ];
        let (out, skipped) = to_events(&changes, &l, &media());
        assert_eq!(skipped, 2, "k(9) has no lineage, namespace 2 none at all");
        assert_eq!(out.len(), 1);
        let ev = &out[0].1;
        assert_eq!(
            ev[0],
            Event::Stored {
                hashes: vec![1, 2],
                parent: None,
                tokens: vec![1, 2, 3, 4],
                block_size: 2,
                medium: "CPU".into(),
                lora: Some("ad".into()),
            }
        );
        let Event::Stored {
            hashes,
            parent,
            medium,
            ..
        } = &ev[1]
        else {
            panic!("{ev:?}")
        };
        assert_eq!(
            (hashes.as_slice(), *parent, &**medium),
            (&[3][..], Some(2), "DISK")
        );
        assert_eq!(
            ev[2],
            Event::Removed {
                hashes: vec![1, 2],
                medium: "CPU".into()
            }
        );
        assert_eq!(
            ev[3],
            Event::Removed {
                hashes: vec![3],
                medium: "DISK".into()
            }
        );
        assert_eq!(ev.len(), 4);
    }

    fn decode(bytes: &[u8]) -> rmpv_lite::Value {
        rmpv_lite::read(&mut &bytes[..])
    }

    #[test]
    fn map_and_array_forms_carry_every_field() {
        let stored = Event::Stored {
            hashes: vec![u64::MAX, 7],
            parent: Some(5),
            tokens: vec![10, 70_000],
            block_size: 1,
            medium: "CPU".into(),
            lora: None,
        };
        let removed = Event::Removed {
            hashes: vec![7],
            medium: "DISK".into(),
        };
        let evs = [stored, removed, Event::Cleared];
        use rmpv_lite::Value as V;
        let s = |x: &str| V::Str(x.into());
        let m = decode(&encode_batch(EventForm::Map, 1.5, &evs, 3));
        let V::Array(top) = m else { panic!() };
        assert_eq!(top[0], V::F64(1.5));
        assert_eq!(top[2], V::UInt(3));
        let V::Array(ev) = &top[1] else { panic!() };
        assert_eq!(
            ev[0],
            V::Map(vec![
                (s("type"), s("BlockStored")),
                (
                    s("block_hashes"),
                    V::Array(vec![V::UInt(u64::MAX), V::UInt(7)])
                ),
                (s("parent_block_hash"), V::UInt(5)),
                (s("token_ids"), V::Array(vec![V::UInt(10), V::UInt(70_000)])),
                (s("block_size"), V::UInt(1)),
                (s("lora_id"), V::Nil),
                (s("medium"), s("CPU")),
                (s("lora_name"), V::Nil),
                (s("extra_keys"), V::Nil),
                (s("group_idx"), V::UInt(0)),
            ])
        );
        assert_eq!(
            ev[1],
            V::Map(vec![
                (s("type"), s("BlockRemoved")),
                (s("block_hashes"), V::Array(vec![V::UInt(7)])),
                (s("medium"), s("DISK")),
                (s("group_idx"), V::UInt(0)),
            ])
        );
        assert_eq!(ev[2], V::Map(vec![(s("type"), s("AllBlocksCleared"))]));
        let a = decode(&encode_batch(EventForm::Array, 1.5, &evs, 0));
        let V::Array(top) = a else { panic!() };
        let V::Array(ev) = &top[1] else { panic!() };
        assert_eq!(
            ev[0],
            V::Array(vec![
                s("BlockStored"),
                V::Array(vec![V::UInt(u64::MAX), V::UInt(7)]),
                V::UInt(5),
                V::Array(vec![V::UInt(10), V::UInt(70_000)]),
                V::UInt(1),
                V::Nil,
                s("CPU"),
                V::Nil,
                V::Nil,
                V::UInt(0),
            ])
        );
        assert_eq!(
            ev[1],
            V::Array(vec![
                s("BlockRemoved"),
                V::Array(vec![V::UInt(7)]),
                s("DISK"),
                V::UInt(0)
            ])
        );
        assert_eq!(ev[2], V::Array(vec![s("AllBlocksCleared")]));
    }

    /// A minimal msgpack reader for the tests (only what the encoder writes), built on rmp's
    /// decoding primitives so the check does not reuse the encoder's own code.
    mod rmpv_lite {
        use rmp::decode::{read_marker, RmpRead};
        use rmp::Marker;

        #[derive(Debug, PartialEq)]
        pub enum Value {
            Nil,
            UInt(u64),
            F64(f64),
            Str(String),
            Array(Vec<Value>),
            Map(Vec<(Value, Value)>),
        }

        fn be(r: &mut &[u8], n: usize) -> u64 {
            let mut v = 0u64;
            for _ in 0..n {
                v = v << 8 | u64::from(r.read_u8().expect("byte"));
            }
            v
        }

        pub fn read(r: &mut &[u8]) -> Value {
            match read_marker(r).expect("marker") {
                Marker::Null => Value::Nil,
                Marker::FixPos(v) => Value::UInt(u64::from(v)),
                Marker::U8 => Value::UInt(be(r, 1)),
                Marker::U16 => Value::UInt(be(r, 2)),
                Marker::U32 => Value::UInt(be(r, 4)),
                Marker::U64 => Value::UInt(be(r, 8)),
                Marker::F64 => Value::F64(f64::from_bits(be(r, 8))),
                Marker::FixStr(n) => str(r, usize::from(n)),
                Marker::Str8 => {
                    let n = be(r, 1) as usize;
                    str(r, n)
                }
                Marker::FixArray(n) => Value::Array((0..n).map(|_| read(r)).collect()),
                Marker::Array16 => {
                    let n = be(r, 2);
                    Value::Array((0..n).map(|_| read(r)).collect())
                }
                Marker::FixMap(n) => Value::Map((0..n).map(|_| (read(r), read(r))).collect()),
                m => panic!("unexpected marker {m:?}"),
            }
        }

        fn str(r: &mut &[u8], n: usize) -> Value {
            let (s, rest) = r.split_at(n);
            *r = rest;
            Value::Str(String::from_utf8(s.to_vec()).expect("utf-8"))
        }
    }
}
