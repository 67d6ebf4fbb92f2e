//! Control frames spoken on the Unix socket.
//!
//! A frame is `u32le body_len ‖ body`, and a body is `u8 kind ‖ u32le request_id ‖ payload`.
//! Requests go client → daemon, responses daemon → client with the same `request_id`. The
//! first request on a connection must be [`Request::Hello`]; the daemon answers
//! [`Response::Welcome`] and passes the ring's memfd with `SCM_RIGHTS`, and
//! [`Response::NamespaceOpened`] likewise carries the arena memfd. Bulk data never travels
//! here: it moves through the shared-memory arena, announced on the ring.
//!
//! Every list is bounded ([`MAX_KEYS`], [`MAX_LIST`]) and every frame is bounded by
//! [`MAX_FRAME_BYTES`]; decoding never allocates more than the frame's own size.

use crate::codec::{DecodeError, Reader, Writer};
use crate::gpu::{self, BlockCode, GpuLayer, GpuReport, GpuShare};
use crate::key::{BlockKey, KEY_LEN};
use crate::namespace::{NamespaceDesc, NamespaceId};
use crate::Tier;

/// Largest frame body either side accepts (daemon config may lower it).
pub const MAX_FRAME_BYTES: usize = 4 << 20;
/// Most keys in one lookup/pin/unpin/delete/evict request.
pub const MAX_KEYS: usize = 65_536;
/// Most entries in one listing response.
pub const MAX_LIST: usize = 10_000;
/// Longest free-text field (names, messages).
pub const MAX_TEXT: usize = 4096;
/// Size of the frame length prefix.
pub const LEN_PREFIX: usize = 4;

/// Request kinds (wire tags).
mod tag {
    pub const HELLO: u8 = 1;
    pub const OPEN_NS: u8 = 2;
    pub const LOOKUP: u8 = 3;
    pub const PIN: u8 = 4;
    pub const UNPIN: u8 = 5;
    pub const DELETE: u8 = 6;
    pub const STATS: u8 = 7;
    pub const LIST: u8 = 8;
    pub const INSPECT: u8 = 9;
    pub const EVICT: u8 = 10;
    pub const DRAIN: u8 = 11;
    pub const CLUSTER_LOOKUP: u8 = 12;
    pub const LINEAGE: u8 = 13;
    pub const WARM: u8 = 14;
    pub const GPU_ATTACH: u8 = 15;
    pub const GPU_SAVE: u8 = 16;
    pub const GPU_LOAD: u8 = 17;
    pub const GPU_DETACH: u8 = 18;

    pub const WELCOME: u8 = 64;
    pub const NS_OPENED: u8 = 65;
    pub const LOOKUP_RESULT: u8 = 66;
    pub const COUNT: u8 = 67;
    pub const STATS_REPORT: u8 = 68;
    pub const BLOCKS: u8 = 69;
    pub const CLUSTER_RESULT: u8 = 70;
    pub const GPU_ATTACHED: u8 = 71;
    pub const BLOCK_CODES: u8 = 72;
    pub const ERROR: u8 = 127;
}

/// A client → daemon control request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// First frame of every connection.
    Hello {
        /// [`crate::PROTOCOL_VERSION`] of the client.
        protocol_version: u16,
        /// Free-text client name for `kvd-ctl status`.
        client_name: String,
        /// Wants admin operations (granted only to admin peers).
        admin: bool,
    },
    /// Opens (creating if needed) a namespace; the reply carries its arena.
    OpenNamespace(NamespaceDesc),
    /// Longest prefix of `keys` present in the cache.
    Lookup {
        /// Namespace.
        ns: NamespaceId,
        /// Chain of keys, first block first.
        keys: Vec<BlockKey>,
    },
    /// Pins blocks so eviction skips them.
    Pin {
        /// Namespace.
        ns: NamespaceId,
        /// Keys to pin.
        keys: Vec<BlockKey>,
    },
    /// Drops one pin from each block.
    Unpin {
        /// Namespace.
        ns: NamespaceId,
        /// Keys to unpin.
        keys: Vec<BlockKey>,
    },
    /// Removes blocks (freed once their readers finish).
    Delete {
        /// Namespace.
        ns: NamespaceId,
        /// Keys to delete.
        keys: Vec<BlockKey>,
    },
    /// Daemon-wide statistics.
    Stats,
    /// Lists resident blocks, ordered by (namespace, key), after a cursor (admin).
    List {
        /// Only this namespace.
        ns: Option<NamespaceId>,
        /// Start strictly after this position.
        after: Option<(NamespaceId, BlockKey)>,
        /// Most entries to return (≤ [`MAX_LIST`]).
        limit: u32,
    },
    /// Every resident copy of a key, in any namespace (admin).
    Inspect {
        /// Key to look for.
        key: BlockKey,
    },
    /// Evicts unpinned blocks (admin): the given keys, or every evictable block when empty.
    Evict {
        /// Only this namespace.
        ns: Option<NamespaceId>,
        /// Keys; empty means all evictable blocks.
        keys: Vec<BlockKey>,
    },
    /// Copies every DRAM block that has no disk copy yet to the disk tier, in the background
    /// (admin). Answers with the number of blocks queued; progress is
    /// [`DiskReport::drain_pending`] in the stats.
    Drain {
        /// Only this namespace.
        ns: Option<NamespaceId>,
    },
    /// Reads blocks held only on disk back into DRAM, most recently used first, as many as
    /// fit below each namespace's eviction low watermark, in the background (admin). Only
    /// namespaces open in DRAM can be warmed. Answers with the number of blocks queued;
    /// progress is [`DiskReport::warm_pending`] in the stats.
    Warm {
        /// Only this namespace.
        ns: Option<NamespaceId>,
    },
    /// Which nodes of the cluster hold the leading blocks of a key chain, and in which tier
    /// (the cluster index, with this node's own view folded in).
    ClusterLookup {
        /// Namespace.
        ns: NamespaceId,
        /// Chain of keys, first block first.
        keys: Vec<BlockKey>,
    },
    /// What a chain of blocks holds: their tokens and parent, for KV events (a consumer such
    /// as llm-d drops a `BlockStored` event without them). Sent by the engine's scheduler
    /// before the blocks are stored, when [`Response::NamespaceOpened::events`] says the
    /// daemon publishes events. Answered with [`Response::Count`] of blocks recorded.
    Lineage {
        /// Namespace.
        ns: NamespaceId,
        /// Key of the block before `keys[0]`; `None` when `keys[0]` starts the sequence.
        parent: Option<BlockKey>,
        /// Chain of keys, first block first: the parent of `keys[i]` is `keys[i - 1]`.
        keys: Vec<BlockKey>,
        /// Token ids of the chain, `block_tokens` per key, in order (≤ [`MAX_TOKENS`]).
        tokens: Vec<u32>,
    },
    /// Maps the engine's paged KV buffers into the daemon for daemon-driven transfers, bound
    /// to this connection and namespace (dropped when either goes). `Fd` shares ride along
    /// with `SCM_RIGHTS`, in order. Answered with [`Response::GpuAttached`].
    GpuAttach {
        /// Namespace the blocks belong to (open on this connection).
        ns: NamespaceId,
        /// The shared allocations.
        shares: Vec<GpuShare>,
        /// The layer buffers, in block layout order (a block is one page of each).
        layers: Vec<GpuLayer>,
    },
    /// The daemon copies page `pages[i]` of every layer into a new block `keys[i]`.
    /// Answered with [`Response::BlockCodes`] (`Done`, `Exists` or `NoRoom` per key).
    GpuSave {
        /// Attachment from [`Response::GpuAttached`].
        attachment: u32,
        /// Keys of the blocks.
        keys: Vec<BlockKey>,
        /// Engine page of each key.
        pages: Vec<u32>,
    },
    /// The daemon copies block `keys[i]` into page `pages[i]` of layers
    /// `first_layer .. first_layer + layers` (all layers when `layers` is 0). Answered with
    /// [`Response::BlockCodes`] (`Done`, `Missing`, `Corrupt` or `BadSize` per key); only
    /// `Done` pages were written.
    GpuLoad {
        /// Attachment from [`Response::GpuAttached`].
        attachment: u32,
        /// Keys of the blocks.
        keys: Vec<BlockKey>,
        /// Engine page of each key.
        pages: Vec<u32>,
        /// First layer to fill.
        first_layer: u32,
        /// Layers to fill; 0 for all.
        layers: u32,
        /// Verify each block's checksum before copying it.
        verify: bool,
    },
    /// Unmaps an attachment. Answered with [`Response::Count`] (1, or 0 if unknown).
    GpuDetach {
        /// Attachment from [`Response::GpuAttached`].
        attachment: u32,
    },
}

/// Most token ids in one [`Request::Lineage`].
pub const MAX_TOKENS: usize = 512 * 1024;

/// Most nodes one [`ClusterLookup`] names.
pub const MAX_NODES: usize = 4096;

/// One node's share of a key chain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeHolding {
    /// The node's name in the cluster index.
    pub node: String,
    /// Leading keys of the chain the node holds, in any tier.
    pub prefix_len: u32,
    /// Where those leading blocks are on the node (fastest tier per block).
    pub tiers: TierCounts,
    /// This is the node that answered (its figures come from its own catalogs).
    pub local: bool,
}

/// Answer to [`Request::ClusterLookup`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterLookup {
    /// Leading keys of the chain held somewhere (each block by at least one live node).
    pub prefix_len: u32,
    /// Nodes holding at least the first block, longest run first.
    pub nodes: Vec<NodeHolding>,
    /// Whether the cluster index answered; false: no index is configured or it is
    /// unreachable, and only this node's view is given.
    pub cluster: bool,
}

/// Per-tier block counts of a lookup's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TierCounts(pub [u32; 4]);

impl TierCounts {
    /// Count for one tier.
    pub fn get(&self, t: Tier) -> u32 {
        self.0[t as usize]
    }
    /// Adds one block in tier `t`.
    pub fn add(&mut self, t: Tier) {
        self.0[t as usize] = self.0[t as usize].saturating_add(1);
    }
}

/// Statistics of one tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierStats {
    /// Which tier.
    pub tier: Tier,
    /// Configured capacity in bytes.
    pub capacity_bytes: u64,
    /// Bytes held by blocks and reservations.
    pub used_bytes: u64,
    /// Committed blocks.
    pub blocks: u64,
    /// Reads served.
    pub hits: u64,
    /// Reads that found nothing.
    pub misses: u64,
    /// Blocks evicted.
    pub evictions: u64,
    /// Bytes written into the tier.
    pub bytes_in: u64,
    /// Bytes read out of the tier.
    pub bytes_out: u64,
}

/// Statistics of one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceStats {
    /// Namespace id.
    pub ns: NamespaceId,
    /// Its descriptor.
    pub desc: NamespaceDesc,
    /// Arena size in bytes.
    pub arena_bytes: u64,
    /// Bytes held by blocks and reservations.
    pub used_bytes: u64,
    /// Committed blocks.
    pub blocks: u64,
    /// Blocks with at least one pin.
    pub pinned: u64,
    /// Read leases outstanding.
    pub leases: u64,
    /// Slots reserved and not yet committed.
    pub reserved: u64,
    /// Reads served.
    pub hits: u64,
    /// Reads that found nothing.
    pub misses: u64,
    /// Blocks evicted.
    pub evictions: u64,
    /// Puts refused for lack of space.
    pub full_rejections: u64,
    /// The uid whose client created it (who holds its arena).
    pub owner_uid: u32,
    /// Its blocks on the disk tier.
    pub disk_blocks: u64,
    /// Space its blocks take on the disk tier (4 KiB-aligned).
    pub disk_bytes: u64,
}

/// The disk tier's state and counters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiskReport {
    /// Directory of the region files and the catalog.
    pub path: String,
    /// IO engine in use (`io_uring` or `psync`).
    pub engine: String,
    /// Whether IO bypasses the page cache.
    pub direct_io: bool,
    /// Bytes of region files.
    pub capacity_bytes: u64,
    /// Bytes held by blocks (4 KiB-aligned).
    pub used_bytes: u64,
    /// Region files.
    pub regions: u32,
    /// Regions holding nothing.
    pub free_regions: u32,
    /// Blocks stored.
    pub blocks: u64,
    /// Reads served from disk.
    pub hits: u64,
    /// Reads that found nothing on disk (after a DRAM miss).
    pub misses: u64,
    /// Bytes read (verified).
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Recent read rate.
    pub read_bytes_per_s: u64,
    /// Recent write rate.
    pub write_bytes_per_s: u64,
    /// Blocks written.
    pub writes: u64,
    /// Demotions refused by the admission filter.
    pub admission_rejections: u64,
    /// Regions reclaimed.
    pub reclaims: u64,
    /// Blocks dropped by reclaims.
    pub reclaimed_blocks: u64,
    /// Blocks dropped to keep a tenant within `disk.max_bytes_per_tenant`.
    pub quota_evictions: u64,
    /// Reads whose checksum did not match (served as misses).
    pub checksum_failures: u64,
    /// Failed reads and writes.
    pub io_errors: u64,
    /// Catalog entries dropped at start (torn or stale).
    pub dropped_at_start: u64,
    /// Blocks queued by a drain and not yet written.
    pub drain_pending: u64,
    /// Blocks queued by a warm and not yet read into DRAM.
    pub warm_pending: u64,
    /// Blocks read into DRAM by warms since start.
    pub warmed: u64,
    /// Why the tier is degraded; empty when healthy.
    pub degraded: String,
}

/// One connected client as seen by the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// Connection id.
    pub id: u64,
    /// Name given in `Hello`.
    pub name: String,
    /// Peer process id.
    pub pid: u32,
    /// Peer user id.
    pub uid: u32,
    /// Admin connection.
    pub admin: bool,
    /// Ring operations completed.
    pub ops: u64,
    /// Descriptors waiting in the client's submission queue (not yet taken by kvd).
    pub sq_depth: u32,
    /// Completions waiting in its completion queue (not yet reaped by the client).
    pub cq_depth: u32,
}

/// Daemon-wide statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsReport {
    /// Daemon version string.
    pub daemon_version: String,
    /// Milliseconds since start.
    pub uptime_ms: u64,
    /// Tiers, fastest first.
    pub tiers: Vec<TierStats>,
    /// Open namespaces.
    pub namespaces: Vec<NamespaceStats>,
    /// Connected clients.
    pub clients: Vec<ClientInfo>,
    /// Disk tier, when configured.
    pub disk: Option<DiskReport>,
    /// Cluster index publisher, when one is configured.
    pub index: Option<IndexReport>,
    /// KV event publisher, when one is configured.
    pub events: Option<EventsReport>,
    /// Peer fetch data port, when one is configured.
    pub peer: Option<PeerReport>,
    /// GPU tier, when a backend is configured.
    pub gpu: Option<GpuReport>,
    /// S3 tier, when configured.
    pub s3: Option<S3Report>,
}

/// State of the S3 tier.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct S3Report {
    /// Endpoint (never with credentials).
    pub endpoint: String,
    /// Bucket.
    pub bucket: String,
    /// The circuit breaker is open or probing: S3 is being skipped.
    pub degraded: bool,
    /// The bucket was listed since start (the index knows what it held).
    pub scanned: bool,
    /// Blocks indexed.
    pub blocks: u64,
    /// Segments indexed.
    pub segments: u64,
    /// Bytes of the segments indexed.
    pub bytes: u64,
    /// Segments uploaded by this node.
    pub uploaded_segments: u64,
    /// Blocks uploaded.
    pub uploaded_blocks: u64,
    /// Bytes uploaded.
    pub uploaded_bytes: u64,
    /// Segment uploads that failed for good.
    pub upload_failures: u64,
    /// Blocks read into DRAM.
    pub read_blocks: u64,
    /// Bytes read into DRAM.
    pub read_bytes: u64,
    /// Block reads that failed.
    pub read_failures: u64,
    /// Blocks that did not match their checksum (never served).
    pub corrupt: u64,
    /// Segments deleted by this node.
    pub deleted_segments: u64,
    /// Requests sent (each attempt).
    pub requests: u64,
    /// Attempts retried.
    pub retries: u64,
    /// Requests that failed after their retries.
    pub failures: u64,
    /// Requests skipped because the breaker was open.
    pub short_circuited: u64,
    /// Times the breaker opened.
    pub breaker_opened: u64,
    /// Segments being uploaded now.
    pub uploading: u64,
    /// Blocks a drain still has to upload.
    pub drain_pending: u64,
    /// Blocks a warm still has to read.
    pub warm_pending: u64,
    /// Blocks warmed into DRAM.
    pub warmed: u64,
    /// The last failure, empty if none.
    pub last_error: String,
}

impl S3Report {
    fn numbers(&self) -> [u64; 21] {
        [
            self.blocks,
            self.segments,
            self.bytes,
            self.uploaded_segments,
            self.uploaded_blocks,
            self.uploaded_bytes,
            self.upload_failures,
            self.read_blocks,
            self.read_bytes,
            self.read_failures,
            self.corrupt,
            self.deleted_segments,
            self.requests,
            self.retries,
            self.failures,
            self.short_circuited,
            self.breaker_opened,
            self.uploading,
            self.drain_pending,
            self.warm_pending,
            self.warmed,
        ]
    }

    fn from_numbers(
        endpoint: String,
        bucket: String,
        degraded: bool,
        scanned: bool,
        n: [u64; 21],
        last_error: String,
    ) -> Self {
        S3Report {
            endpoint,
            bucket,
            degraded,
            scanned,
            blocks: n[0],
            segments: n[1],
            bytes: n[2],
            uploaded_segments: n[3],
            uploaded_blocks: n[4],
            uploaded_bytes: n[5],
            upload_failures: n[6],
            read_blocks: n[7],
            read_bytes: n[8],
            read_failures: n[9],
            corrupt: n[10],
            deleted_segments: n[11],
            requests: n[12],
            retries: n[13],
            failures: n[14],
            short_circuited: n[15],
            breaker_opened: n[16],
            uploading: n[17],
            drain_pending: n[18],
            warm_pending: n[19],
            warmed: n[20],
            last_error,
        }
    }
}

/// State of the peer fetch data port.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerReport {
    /// Address other nodes dial.
    pub advertise: String,
    /// Blocks sent to peers.
    pub served_blocks: u64,
    /// Bytes sent to peers.
    pub served_bytes: u64,
    /// Blocks fetched from peers into DRAM.
    pub fetched_blocks: u64,
    /// Bytes fetched from peers.
    pub fetched_bytes: u64,
    /// Fetches that failed (peer unreachable, missing, timed out, refused by DRAM).
    pub fetch_failures: u64,
    /// Fetched blocks whose checksum did not match (dropped).
    pub checksum_failures: u64,
    /// Peer connections dropped for a malformed or oversized request.
    pub bad_requests: u64,
    /// The last error, empty if none yet.
    pub last_error: String,
}

/// State of the KV event publisher.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventsReport {
    /// PUB endpoint (bound or connected to).
    pub endpoint: String,
    /// ROUTER replay endpoint; empty when none.
    pub replay_endpoint: String,
    /// Topic prefix, `kv@<pod>@` (the model follows).
    pub topic_prefix: String,
    /// `map` or `array`.
    pub form: String,
    /// Event batches sent (one ZMQ message each).
    pub batches: u64,
    /// Events sent.
    pub events: u64,
    /// Stored blocks not announced because the engine never sent their tokens and parent.
    pub skipped: u64,
    /// Times the publisher cleared and re-announced everything after losing changes.
    pub resyncs: u64,
    /// Sequence number of the next batch.
    pub next_seq: u64,
    /// Blocks whose lineage is remembered.
    pub lineage_blocks: u64,
    /// The last error, empty if none yet.
    pub last_error: String,
}

/// State of the cluster index publisher.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IndexReport {
    /// Redis endpoints (host and port only, never credentials).
    pub endpoint: String,
    /// This node's name in the index.
    pub node: String,
    /// The last publishing round reached Redis.
    pub connected: bool,
    /// Epoch the node publishes under (0 before the first publish).
    pub epoch: u64,
    /// Residency changes sent (republished blocks included).
    pub published: u64,
    /// Times the node republished everything under a new epoch.
    pub republishes: u64,
    /// Times Redis became unreachable.
    pub outages: u64,
    /// The last error, empty if none yet.
    pub last_error: String,
}

/// One resident block, as listed or inspected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockInfo {
    /// Namespace.
    pub ns: NamespaceId,
    /// Key.
    pub key: BlockKey,
    /// Tier holding it.
    pub tier: Tier,
    /// Length in bytes.
    pub len: u64,
    /// xxh3-64 of the content.
    pub checksum: u64,
    /// Pins held.
    pub pins: u32,
    /// Read leases held.
    pub readers: u32,
    /// Reads served.
    pub hits: u64,
    /// Milliseconds since committed.
    pub age_ms: u64,
    /// Milliseconds since last read or write.
    pub idle_ms: u64,
}

/// Error codes of [`Response::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The request was malformed or not allowed in this state.
    BadRequest = 1,
    /// The peer may not do this (uid/gid not allowed, or not admin).
    Unauthorized = 2,
    /// Protocol versions differ.
    VersionMismatch = 3,
    /// The namespace is not open on this connection or does not exist.
    UnknownNamespace = 4,
    /// No arena is free for another namespace.
    NamespaceLimit = 5,
    /// The block is larger than `dram.max_block_bytes`.
    TooLarge = 6,
    /// No space even after evicting everything evictable.
    CacheFull = 7,
    /// No such block.
    NotFound = 8,
    /// The daemon is shutting down.
    ShuttingDown = 9,
    /// A bug or an OS failure inside the daemon.
    Internal = 10,
    /// This daemon cannot do that (e.g. GPU transfers with `gpu.backend = off`).
    Unsupported = 11,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Option<Self> {
        use ErrorCode::*;
        Some(match v {
            1 => BadRequest,
            2 => Unauthorized,
            3 => VersionMismatch,
            4 => UnknownNamespace,
            5 => NamespaceLimit,
            6 => TooLarge,
            7 => CacheFull,
            8 => NotFound,
            9 => ShuttingDown,
            10 => Internal,
            11 => Unsupported,
            _ => return None,
        })
    }
}

/// A daemon → client control response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Handshake accepted; the ring memfd rides along.
    Welcome {
        /// Daemon's protocol version.
        protocol_version: u16,
        /// Daemon version string.
        daemon_version: String,
        /// Connection id.
        client_id: u64,
        /// Submission/completion ring entries.
        ring_entries: u32,
        /// Size of the ring mapping in bytes.
        ring_bytes: u64,
        /// Largest block accepted.
        max_block_bytes: u64,
        /// Read leases expire after this long.
        lease_timeout_ms: u32,
    },
    /// Namespace open; the arena memfd rides along.
    NamespaceOpened {
        /// Namespace id.
        ns: NamespaceId,
        /// Handle to put in ring descriptors.
        handle: u32,
        /// Size of the arena mapping in bytes.
        arena_bytes: u64,
        /// The daemon publishes KV events: the engine should send [`Request::Lineage`] for
        /// the blocks it is about to store.
        events: bool,
    },
    /// Result of a lookup.
    LookupResult {
        /// Number of leading keys present.
        prefix_len: u32,
        /// Where the prefix's blocks are.
        tiers: TierCounts,
    },
    /// Number of blocks affected by pin/unpin/delete/evict.
    Count(u32),
    /// Daemon statistics.
    Stats(Box<StatsReport>),
    /// Listing page.
    Blocks {
        /// Entries.
        blocks: Vec<BlockInfo>,
        /// More entries follow after the last one.
        more: bool,
    },
    /// Result of a cluster lookup.
    ClusterResult(ClusterLookup),
    /// The engine's KV buffers are mapped.
    GpuAttached {
        /// Handle for [`Request::GpuSave`] / [`Request::GpuLoad`].
        attachment: u32,
        /// Bytes of one block (one page of every layer).
        block_bytes: u64,
    },
    /// What a daemon-driven transfer did with each block, in request order.
    BlockCodes(Vec<BlockCode>),
    /// Request failed.
    Error {
        /// Machine-readable code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
    },
}

fn put_ns(w: &mut Writer, ns: &NamespaceId) {
    w.raw(&ns.0);
}

fn get_ns(r: &mut Reader<'_>) -> Result<NamespaceId, DecodeError> {
    let b = r.take("namespace id", 16)?;
    let mut id = [0u8; 16];
    id.copy_from_slice(b);
    Ok(NamespaceId(id))
}

fn put_keys(w: &mut Writer, keys: &[BlockKey]) {
    let keys = &keys[..keys.len().min(MAX_KEYS)];
    w.count(keys.len());
    for k in keys {
        w.key(k);
    }
}

fn get_keys(r: &mut Reader<'_>) -> Result<Vec<BlockKey>, DecodeError> {
    let n = r.count("keys", MAX_KEYS, KEY_LEN)?;
    (0..n).map(|_| r.key("key")).collect()
}

fn get_tier(r: &mut Reader<'_>) -> Result<Tier, DecodeError> {
    let t = r.u8("tier")?;
    Tier::from_u8(t).ok_or(DecodeError::UnknownTag {
        what: "tier",
        tag: u32::from(t),
    })
}

fn opt<T>(
    r: &mut Reader<'_>,
    what: &'static str,
    f: impl FnOnce(&mut Reader<'_>) -> Result<T, DecodeError>,
) -> Result<Option<T>, DecodeError> {
    if r.bool(what)? {
        f(r).map(Some)
    } else {
        Ok(None)
    }
}

/// Starts a frame: reserves the length prefix and writes kind and request id.
fn begin(kind: u8, request_id: u32) -> Writer {
    let mut w = Writer::from_vec(Vec::with_capacity(64));
    w.u32(0);
    w.u8(kind);
    w.u32(request_id);
    w
}

/// Patches the length prefix.
fn end(mut w: Writer) -> Vec<u8> {
    let body = u32::try_from(w.len() - LEN_PREFIX).unwrap_or(u32::MAX);
    w.as_mut_slice()[..LEN_PREFIX].copy_from_slice(&body.to_le_bytes());
    w.into_vec()
}

/// Reads a frame's length prefix, refusing bodies larger than `max`.
pub fn body_len(prefix: [u8; LEN_PREFIX], max: usize) -> Result<usize, DecodeError> {
    let n = usize::try_from(u32::from_le_bytes(prefix)).unwrap_or(usize::MAX);
    if n > max {
        return Err(DecodeError::TooLong {
            what: "frame",
            len: n,
            max,
        });
    }
    if n < 5 {
        return Err(DecodeError::Truncated {
            what: "frame header",
            need: 5,
            have: n,
        });
    }
    Ok(n)
}

impl Request {
    /// Encodes a complete frame (length prefix included).
    pub fn encode(&self, request_id: u32) -> Vec<u8> {
        let mut w;
        match self {
            Request::Hello {
                protocol_version,
                client_name,
                admin,
            } => {
                w = begin(tag::HELLO, request_id);
                w.u16(*protocol_version);
                w.str(client_name);
                w.u8(u8::from(*admin));
            }
            Request::OpenNamespace(d) => {
                w = begin(tag::OPEN_NS, request_id);
                d.encode(&mut w);
            }
            Request::Lookup { ns, keys }
            | Request::Pin { ns, keys }
            | Request::Unpin { ns, keys }
            | Request::Delete { ns, keys } => {
                let t = match self {
                    Request::Lookup { .. } => tag::LOOKUP,
                    Request::Pin { .. } => tag::PIN,
                    Request::Unpin { .. } => tag::UNPIN,
                    _ => tag::DELETE,
                };
                w = begin(t, request_id);
                put_ns(&mut w, ns);
                put_keys(&mut w, keys);
            }
            Request::Stats => w = begin(tag::STATS, request_id),
            Request::List { ns, after, limit } => {
                w = begin(tag::LIST, request_id);
                w.u8(u8::from(ns.is_some()));
                if let Some(ns) = ns {
                    put_ns(&mut w, ns);
                }
                w.u8(u8::from(after.is_some()));
                if let Some((ns, k)) = after {
                    put_ns(&mut w, ns);
                    w.key(k);
                }
                w.u32(*limit);
            }
            Request::Inspect { key } => {
                w = begin(tag::INSPECT, request_id);
                w.key(key);
            }
            Request::Evict { ns, keys } => {
                w = begin(tag::EVICT, request_id);
                w.u8(u8::from(ns.is_some()));
                if let Some(ns) = ns {
                    put_ns(&mut w, ns);
                }
                put_keys(&mut w, keys);
            }
            Request::Drain { ns } => {
                w = begin(tag::DRAIN, request_id);
                w.u8(u8::from(ns.is_some()));
                if let Some(ns) = ns {
                    put_ns(&mut w, ns);
                }
            }
            Request::Warm { ns } => {
                w = begin(tag::WARM, request_id);
                w.u8(u8::from(ns.is_some()));
                if let Some(ns) = ns {
                    put_ns(&mut w, ns);
                }
            }
            Request::ClusterLookup { ns, keys } => {
                w = begin(tag::CLUSTER_LOOKUP, request_id);
                put_ns(&mut w, ns);
                put_keys(&mut w, keys);
            }
            Request::Lineage {
                ns,
                parent,
                keys,
                tokens,
            } => {
                w = begin(tag::LINEAGE, request_id);
                put_ns(&mut w, ns);
                w.u8(u8::from(parent.is_some()));
                if let Some(p) = parent {
                    w.key(p);
                }
                put_keys(&mut w, keys);
                let tokens = &tokens[..tokens.len().min(MAX_TOKENS)];
                w.count(tokens.len());
                for t in tokens {
                    w.u32(*t);
                }
            }
            Request::GpuAttach { ns, shares, layers } => {
                w = begin(tag::GPU_ATTACH, request_id);
                put_ns(&mut w, ns);
                gpu::put_shares(&mut w, shares);
                gpu::put_layers(&mut w, layers);
            }
            Request::GpuSave {
                attachment,
                keys,
                pages,
            } => {
                w = begin(tag::GPU_SAVE, request_id);
                w.u32(*attachment);
                put_keys(&mut w, keys);
                gpu::put_pages(&mut w, pages, MAX_KEYS);
            }
            Request::GpuLoad {
                attachment,
                keys,
                pages,
                first_layer,
                layers,
                verify,
            } => {
                w = begin(tag::GPU_LOAD, request_id);
                w.u32(*attachment);
                put_keys(&mut w, keys);
                gpu::put_pages(&mut w, pages, MAX_KEYS);
                w.u32(*first_layer);
                w.u32(*layers);
                w.u8(u8::from(*verify));
            }
            Request::GpuDetach { attachment } => {
                w = begin(tag::GPU_DETACH, request_id);
                w.u32(*attachment);
            }
        }
        end(w)
    }

    /// Decodes a frame body (without the length prefix) into `(request_id, request)`.
    pub fn decode(body: &[u8]) -> Result<(u32, Request), DecodeError> {
        let mut r = Reader::new(body);
        let kind = r.u8("frame kind")?;
        let id = r.u32("request id")?;
        let req = match kind {
            tag::HELLO => Request::Hello {
                protocol_version: r.u16("protocol_version")?,
                client_name: r.str("client_name", MAX_TEXT)?,
                admin: r.bool("admin")?,
            },
            tag::OPEN_NS => Request::OpenNamespace(NamespaceDesc::decode(&mut r)?),
            tag::LOOKUP | tag::PIN | tag::UNPIN | tag::DELETE => {
                let ns = get_ns(&mut r)?;
                let keys = get_keys(&mut r)?;
                match kind {
                    tag::LOOKUP => Request::Lookup { ns, keys },
                    tag::PIN => Request::Pin { ns, keys },
                    tag::UNPIN => Request::Unpin { ns, keys },
                    _ => Request::Delete { ns, keys },
                }
            }
            tag::STATS => Request::Stats,
            tag::LIST => Request::List {
                ns: opt(&mut r, "list ns flag", get_ns)?,
                after: opt(&mut r, "list cursor flag", |r| {
                    Ok((get_ns(r)?, r.key("cursor")?))
                })?,
                limit: r.u32("limit")?,
            },
            tag::INSPECT => Request::Inspect { key: r.key("key")? },
            tag::EVICT => Request::Evict {
                ns: opt(&mut r, "evict ns flag", get_ns)?,
                keys: get_keys(&mut r)?,
            },
            tag::DRAIN => Request::Drain {
                ns: opt(&mut r, "drain ns flag", get_ns)?,
            },
            tag::WARM => Request::Warm {
                ns: opt(&mut r, "warm ns flag", get_ns)?,
            },
            tag::CLUSTER_LOOKUP => Request::ClusterLookup {
                ns: get_ns(&mut r)?,
                keys: get_keys(&mut r)?,
            },
            tag::LINEAGE => Request::Lineage {
                ns: get_ns(&mut r)?,
                parent: opt(&mut r, "lineage parent flag", |r| r.key("parent"))?,
                keys: get_keys(&mut r)?,
                tokens: {
                    let n = r.count("tokens", MAX_TOKENS, 4)?;
                    (0..n).map(|_| r.u32("token")).collect::<Result<_, _>>()?
                },
            },
            tag::GPU_ATTACH => Request::GpuAttach {
                ns: get_ns(&mut r)?,
                shares: gpu::get_shares(&mut r)?,
                layers: gpu::get_layers(&mut r)?,
            },
            tag::GPU_SAVE => Request::GpuSave {
                attachment: r.u32("attachment")?,
                keys: get_keys(&mut r)?,
                pages: gpu::get_pages(&mut r, MAX_KEYS)?,
            },
            tag::GPU_LOAD => Request::GpuLoad {
                attachment: r.u32("attachment")?,
                keys: get_keys(&mut r)?,
                pages: gpu::get_pages(&mut r, MAX_KEYS)?,
                first_layer: r.u32("first layer")?,
                layers: r.u32("layers")?,
                verify: r.bool("verify")?,
            },
            tag::GPU_DETACH => Request::GpuDetach {
                attachment: r.u32("attachment")?,
            },
            other => {
                return Err(DecodeError::UnknownTag {
                    what: "request kind",
                    tag: u32::from(other),
                })
            }
        };
        r.finish()?;
        Ok((id, req))
    }
}

fn put_desc_stats(w: &mut Writer, s: &NamespaceStats) {
    put_ns(w, &s.ns);
    s.desc.encode(w);
    for v in [
        s.arena_bytes,
        s.used_bytes,
        s.blocks,
        s.pinned,
        s.leases,
        s.reserved,
        s.hits,
        s.misses,
        s.evictions,
        s.full_rejections,
    ] {
        w.u64(v);
    }
    w.u32(s.owner_uid);
    w.u64(s.disk_blocks);
    w.u64(s.disk_bytes);
}

fn get_desc_stats(r: &mut Reader<'_>) -> Result<NamespaceStats, DecodeError> {
    Ok(NamespaceStats {
        ns: get_ns(r)?,
        desc: NamespaceDesc::decode(r)?,
        arena_bytes: r.u64("arena_bytes")?,
        used_bytes: r.u64("used_bytes")?,
        blocks: r.u64("blocks")?,
        pinned: r.u64("pinned")?,
        leases: r.u64("leases")?,
        reserved: r.u64("reserved")?,
        hits: r.u64("hits")?,
        misses: r.u64("misses")?,
        evictions: r.u64("evictions")?,
        full_rejections: r.u64("full_rejections")?,
        owner_uid: r.u32("owner_uid")?,
        disk_blocks: r.u64("disk_blocks")?,
        disk_bytes: r.u64("disk_bytes")?,
    })
}

fn disk_numbers(d: &DiskReport) -> [u64; 18] {
    [
        d.capacity_bytes,
        d.used_bytes,
        u64::from(d.regions),
        u64::from(d.free_regions),
        d.blocks,
        d.hits,
        d.misses,
        d.read_bytes,
        d.write_bytes,
        d.read_bytes_per_s,
        d.write_bytes_per_s,
        d.writes,
        d.admission_rejections,
        d.reclaims,
        d.reclaimed_blocks,
        d.checksum_failures,
        d.io_errors,
        d.dropped_at_start,
    ]
}

fn put_index(w: &mut Writer, x: &IndexReport) {
    w.str(&x.endpoint);
    w.str(&x.node);
    w.u8(u8::from(x.connected));
    for v in [x.epoch, x.published, x.republishes, x.outages] {
        w.u64(v);
    }
    w.str(&x.last_error);
}

fn put_events(w: &mut Writer, x: &EventsReport) {
    for t in [&x.endpoint, &x.replay_endpoint, &x.topic_prefix, &x.form] {
        w.str(t);
    }
    for v in [
        x.batches,
        x.events,
        x.skipped,
        x.resyncs,
        x.next_seq,
        x.lineage_blocks,
    ] {
        w.u64(v);
    }
    w.str(&x.last_error);
}

fn put_peer(w: &mut Writer, x: &PeerReport) {
    w.str(&x.advertise);
    for v in [
        x.served_blocks,
        x.served_bytes,
        x.fetched_blocks,
        x.fetched_bytes,
        x.fetch_failures,
        x.checksum_failures,
        x.bad_requests,
    ] {
        w.u64(v);
    }
    w.str(&x.last_error);
}

fn put_s3(w: &mut Writer, x: &S3Report) {
    w.str(&x.endpoint);
    w.str(&x.bucket);
    w.u8(u8::from(x.degraded));
    w.u8(u8::from(x.scanned));
    for v in x.numbers() {
        w.u64(v);
    }
    w.str(&x.last_error);
}

fn get_s3(r: &mut Reader<'_>) -> Result<S3Report, DecodeError> {
    let endpoint = r.str("s3 endpoint", MAX_TEXT)?;
    let bucket = r.str("s3 bucket", MAX_TEXT)?;
    let degraded = r.bool("s3 degraded")?;
    let scanned = r.bool("s3 scanned")?;
    let mut n = [0u64; 21];
    for v in &mut n {
        *v = r.u64("s3 counter")?;
    }
    let last_error = r.str("s3 last error", MAX_TEXT)?;
    Ok(S3Report::from_numbers(
        endpoint, bucket, degraded, scanned, n, last_error,
    ))
}

fn get_peer(r: &mut Reader<'_>) -> Result<PeerReport, DecodeError> {
    Ok(PeerReport {
        advertise: r.str("peer advertise", MAX_TEXT)?,
        served_blocks: r.u64("peer served")?,
        served_bytes: r.u64("peer served bytes")?,
        fetched_blocks: r.u64("peer fetched")?,
        fetched_bytes: r.u64("peer fetched bytes")?,
        fetch_failures: r.u64("peer failures")?,
        checksum_failures: r.u64("peer checksum failures")?,
        bad_requests: r.u64("peer bad requests")?,
        last_error: r.str("peer last error", MAX_TEXT)?,
    })
}

fn get_events(r: &mut Reader<'_>) -> Result<EventsReport, DecodeError> {
    Ok(EventsReport {
        endpoint: r.str("events endpoint", MAX_TEXT)?,
        replay_endpoint: r.str("events replay endpoint", MAX_TEXT)?,
        topic_prefix: r.str("events topic", MAX_TEXT)?,
        form: r.str("events form", MAX_TEXT)?,
        batches: r.u64("events batches")?,
        events: r.u64("events events")?,
        skipped: r.u64("events skipped")?,
        resyncs: r.u64("events resyncs")?,
        next_seq: r.u64("events seq")?,
        lineage_blocks: r.u64("events lineage")?,
        last_error: r.str("events last error", MAX_TEXT)?,
    })
}

fn get_index(r: &mut Reader<'_>) -> Result<IndexReport, DecodeError> {
    Ok(IndexReport {
        endpoint: r.str("index endpoint", MAX_TEXT)?,
        node: r.str("index node", MAX_TEXT)?,
        connected: r.bool("index connected")?,
        epoch: r.u64("index epoch")?,
        published: r.u64("index published")?,
        republishes: r.u64("index republishes")?,
        outages: r.u64("index outages")?,
        last_error: r.str("index last error", MAX_TEXT)?,
    })
}

fn put_disk(w: &mut Writer, d: &DiskReport) {
    w.str(&d.path);
    w.str(&d.engine);
    w.u8(u8::from(d.direct_io));
    for v in disk_numbers(d) {
        w.u64(v);
    }
    w.u64(d.drain_pending);
    w.u64(d.warm_pending);
    w.u64(d.warmed);
    w.u64(d.quota_evictions);
    w.str(&d.degraded);
}

fn get_disk(r: &mut Reader<'_>) -> Result<DiskReport, DecodeError> {
    let path = r.str("disk path", MAX_TEXT)?;
    let engine = r.str("disk engine", MAX_TEXT)?;
    let direct_io = r.bool("direct_io")?;
    let mut n = [0u64; 18];
    for v in n.iter_mut() {
        *v = r.u64("disk counter")?;
    }
    let regions = u32::try_from(n[2]).map_err(|_| DecodeError::Invalid {
        what: "disk regions",
        why: "out of range".into(),
    })?;
    let free_regions = u32::try_from(n[3]).map_err(|_| DecodeError::Invalid {
        what: "disk free regions",
        why: "out of range".into(),
    })?;
    Ok(DiskReport {
        path,
        engine,
        direct_io,
        capacity_bytes: n[0],
        used_bytes: n[1],
        regions,
        free_regions,
        blocks: n[4],
        hits: n[5],
        misses: n[6],
        read_bytes: n[7],
        write_bytes: n[8],
        read_bytes_per_s: n[9],
        write_bytes_per_s: n[10],
        writes: n[11],
        admission_rejections: n[12],
        reclaims: n[13],
        reclaimed_blocks: n[14],
        checksum_failures: n[15],
        io_errors: n[16],
        dropped_at_start: n[17],
        drain_pending: r.u64("drain_pending")?,
        warm_pending: r.u64("warm_pending")?,
        warmed: r.u64("warmed")?,
        quota_evictions: r.u64("quota_evictions")?,
        degraded: r.str("degraded", MAX_TEXT)?,
    })
}

/// Most tiers, namespaces or clients in one stats report.
const MAX_STATS_ITEMS: usize = 4096;

impl Response {
    /// Encodes a complete frame (length prefix included).
    pub fn encode(&self, request_id: u32) -> Vec<u8> {
        let mut w;
        match self {
            Response::Welcome {
                protocol_version,
                daemon_version,
                client_id,
                ring_entries,
                ring_bytes,
                max_block_bytes,
                lease_timeout_ms,
            } => {
                w = begin(tag::WELCOME, request_id);
                w.u16(*protocol_version);
                w.str(daemon_version);
                w.u64(*client_id);
                w.u32(*ring_entries);
                w.u64(*ring_bytes);
                w.u64(*max_block_bytes);
                w.u32(*lease_timeout_ms);
            }
            Response::NamespaceOpened {
                ns,
                handle,
                arena_bytes,
                events,
            } => {
                w = begin(tag::NS_OPENED, request_id);
                put_ns(&mut w, ns);
                w.u32(*handle);
                w.u64(*arena_bytes);
                w.u8(u8::from(*events));
            }
            Response::LookupResult { prefix_len, tiers } => {
                w = begin(tag::LOOKUP_RESULT, request_id);
                w.u32(*prefix_len);
                for c in tiers.0 {
                    w.u32(c);
                }
            }
            Response::Count(n) => {
                w = begin(tag::COUNT, request_id);
                w.u32(*n);
            }
            Response::Stats(s) => {
                w = begin(tag::STATS_REPORT, request_id);
                w.str(&s.daemon_version);
                w.u64(s.uptime_ms);
                let tiers = &s.tiers[..s.tiers.len().min(MAX_STATS_ITEMS)];
                w.count(tiers.len());
                for t in tiers {
                    w.u8(t.tier as u8);
                    for v in [
                        t.capacity_bytes,
                        t.used_bytes,
                        t.blocks,
                        t.hits,
                        t.misses,
                        t.evictions,
                        t.bytes_in,
                        t.bytes_out,
                    ] {
                        w.u64(v);
                    }
                }
                let nss = &s.namespaces[..s.namespaces.len().min(MAX_STATS_ITEMS)];
                w.count(nss.len());
                for n in nss {
                    put_desc_stats(&mut w, n);
                }
                let clients = &s.clients[..s.clients.len().min(MAX_STATS_ITEMS)];
                w.count(clients.len());
                for c in clients {
                    w.u64(c.id);
                    w.str(&c.name);
                    w.u32(c.pid);
                    w.u32(c.uid);
                    w.u8(u8::from(c.admin));
                    w.u64(c.ops);
                    w.u32(c.sq_depth);
                    w.u32(c.cq_depth);
                }
                w.u8(u8::from(s.disk.is_some()));
                if let Some(d) = &s.disk {
                    put_disk(&mut w, d);
                }
                w.u8(u8::from(s.index.is_some()));
                if let Some(x) = &s.index {
                    put_index(&mut w, x);
                }
                w.u8(u8::from(s.events.is_some()));
                if let Some(x) = &s.events {
                    put_events(&mut w, x);
                }
                w.u8(u8::from(s.peer.is_some()));
                if let Some(x) = &s.peer {
                    put_peer(&mut w, x);
                }
                w.u8(u8::from(s.gpu.is_some()));
                if let Some(x) = &s.gpu {
                    gpu::put_report(&mut w, x);
                }
                w.u8(u8::from(s.s3.is_some()));
                if let Some(x) = &s.s3 {
                    put_s3(&mut w, x);
                }
            }
            Response::ClusterResult(c) => {
                w = begin(tag::CLUSTER_RESULT, request_id);
                w.u32(c.prefix_len);
                w.u8(u8::from(c.cluster));
                let nodes = &c.nodes[..c.nodes.len().min(MAX_NODES)];
                w.count(nodes.len());
                for n in nodes {
                    w.str(&n.node);
                    w.u32(n.prefix_len);
                    for t in n.tiers.0 {
                        w.u32(t);
                    }
                    w.u8(u8::from(n.local));
                }
            }
            Response::Blocks { blocks, more } => {
                w = begin(tag::BLOCKS, request_id);
                let blocks = &blocks[..blocks.len().min(MAX_LIST)];
                w.count(blocks.len());
                for b in blocks {
                    put_ns(&mut w, &b.ns);
                    w.key(&b.key);
                    w.u8(b.tier as u8);
                    w.u64(b.len);
                    w.u64(b.checksum);
                    w.u32(b.pins);
                    w.u32(b.readers);
                    w.u64(b.hits);
                    w.u64(b.age_ms);
                    w.u64(b.idle_ms);
                }
                w.u8(u8::from(*more));
            }
            Response::GpuAttached {
                attachment,
                block_bytes,
            } => {
                w = begin(tag::GPU_ATTACHED, request_id);
                w.u32(*attachment);
                w.u64(*block_bytes);
            }
            Response::BlockCodes(codes) => {
                w = begin(tag::BLOCK_CODES, request_id);
                gpu::put_codes(&mut w, codes, MAX_KEYS);
            }
            Response::Error { code, message } => {
                w = begin(tag::ERROR, request_id);
                w.u16(*code as u16);
                w.str(message);
            }
        }
        end(w)
    }

    /// Decodes a frame body (without the length prefix) into `(request_id, response)`.
    pub fn decode(body: &[u8]) -> Result<(u32, Response), DecodeError> {
        let mut r = Reader::new(body);
        let kind = r.u8("frame kind")?;
        let id = r.u32("request id")?;
        let resp = match kind {
            tag::WELCOME => Response::Welcome {
                protocol_version: r.u16("protocol_version")?,
                daemon_version: r.str("daemon_version", MAX_TEXT)?,
                client_id: r.u64("client_id")?,
                ring_entries: r.u32("ring_entries")?,
                ring_bytes: r.u64("ring_bytes")?,
                max_block_bytes: r.u64("max_block_bytes")?,
                lease_timeout_ms: r.u32("lease_timeout_ms")?,
            },
            tag::NS_OPENED => Response::NamespaceOpened {
                ns: get_ns(&mut r)?,
                handle: r.u32("handle")?,
                arena_bytes: r.u64("arena_bytes")?,
                events: r.bool("events")?,
            },
            tag::LOOKUP_RESULT => {
                let prefix_len = r.u32("prefix_len")?;
                let mut tiers = TierCounts::default();
                for c in tiers.0.iter_mut() {
                    *c = r.u32("tier count")?;
                }
                Response::LookupResult { prefix_len, tiers }
            }
            tag::COUNT => Response::Count(r.u32("count")?),
            tag::CLUSTER_RESULT => {
                let prefix_len = r.u32("prefix_len")?;
                let cluster = r.bool("cluster flag")?;
                // Smallest node entry: empty name (2-byte length), prefix, 4 counts, flag.
                let n = r.count("nodes", MAX_NODES, 2 + 4 + 16 + 1)?;
                let mut nodes = Vec::with_capacity(n);
                for _ in 0..n {
                    let node = r.str("node", MAX_TEXT)?;
                    let prefix_len = r.u32("node prefix_len")?;
                    let mut tiers = TierCounts::default();
                    for c in tiers.0.iter_mut() {
                        *c = r.u32("node tier count")?;
                    }
                    nodes.push(NodeHolding {
                        node,
                        prefix_len,
                        tiers,
                        local: r.bool("local flag")?,
                    });
                }
                Response::ClusterResult(ClusterLookup {
                    prefix_len,
                    nodes,
                    cluster,
                })
            }
            tag::STATS_REPORT => {
                let daemon_version = r.str("daemon_version", MAX_TEXT)?;
                let uptime_ms = r.u64("uptime_ms")?;
                let n = r.count("tiers", MAX_STATS_ITEMS, 65)?;
                let mut tiers = Vec::with_capacity(n);
                for _ in 0..n {
                    tiers.push(TierStats {
                        tier: get_tier(&mut r)?,
                        capacity_bytes: r.u64("capacity_bytes")?,
                        used_bytes: r.u64("used_bytes")?,
                        blocks: r.u64("blocks")?,
                        hits: r.u64("hits")?,
                        misses: r.u64("misses")?,
                        evictions: r.u64("evictions")?,
                        bytes_in: r.u64("bytes_in")?,
                        bytes_out: r.u64("bytes_out")?,
                    });
                }
                let n = r.count("namespaces", MAX_STATS_ITEMS, 16 + 24 + 80)?;
                let mut namespaces = Vec::with_capacity(n);
                for _ in 0..n {
                    namespaces.push(get_desc_stats(&mut r)?);
                }
                let n = r.count("clients", MAX_STATS_ITEMS, 35)?;
                let mut clients = Vec::with_capacity(n);
                for _ in 0..n {
                    clients.push(ClientInfo {
                        id: r.u64("client id")?,
                        name: r.str("client name", MAX_TEXT)?,
                        pid: r.u32("pid")?,
                        uid: r.u32("uid")?,
                        admin: r.bool("admin")?,
                        ops: r.u64("ops")?,
                        sq_depth: r.u32("submission queue depth")?,
                        cq_depth: r.u32("completion queue depth")?,
                    });
                }
                let disk = opt(&mut r, "disk flag", get_disk)?;
                let index = opt(&mut r, "index flag", get_index)?;
                let events = opt(&mut r, "events flag", get_events)?;
                let peer = opt(&mut r, "peer flag", get_peer)?;
                let gpu = opt(&mut r, "gpu flag", |r| gpu::get_report(r, MAX_TEXT))?;
                let s3 = opt(&mut r, "s3 flag", get_s3)?;
                Response::Stats(Box::new(StatsReport {
                    daemon_version,
                    uptime_ms,
                    tiers,
                    namespaces,
                    clients,
                    disk,
                    index,
                    events,
                    peer,
                    gpu,
                    s3,
                }))
            }
            tag::BLOCKS => {
                let n = r.count("blocks", MAX_LIST, 16 + KEY_LEN + 49)?;
                let mut blocks = Vec::with_capacity(n);
                for _ in 0..n {
                    blocks.push(BlockInfo {
                        ns: get_ns(&mut r)?,
                        key: r.key("key")?,
                        tier: get_tier(&mut r)?,
                        len: r.u64("len")?,
                        checksum: r.u64("checksum")?,
                        pins: r.u32("pins")?,
                        readers: r.u32("readers")?,
                        hits: r.u64("hits")?,
                        age_ms: r.u64("age_ms")?,
                        idle_ms: r.u64("idle_ms")?,
                    });
                }
                Response::Blocks {
                    blocks,
                    more: r.bool("more")?,
                }
            }
            tag::GPU_ATTACHED => Response::GpuAttached {
                attachment: r.u32("attachment")?,
                block_bytes: r.u64("block bytes")?,
            },
            tag::BLOCK_CODES => Response::BlockCodes(gpu::get_codes(&mut r, MAX_KEYS)?),
            tag::ERROR => {
                let c = r.u16("error code")?;
                Response::Error {
                    code: ErrorCode::from_u16(c).ok_or(DecodeError::UnknownTag {
                        what: "error code",
                        tag: u32::from(c),
                    })?,
                    message: r.str("error message", MAX_TEXT)?,
                }
            }
            other => {
                return Err(DecodeError::UnknownTag {
                    what: "response kind",
                    tag: u32::from(other),
                })
            }
        };
        r.finish()?;
        Ok((id, resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn strip(frame: &[u8]) -> &[u8] {
        let n = body_len(frame[..4].try_into().unwrap(), MAX_FRAME_BYTES).unwrap();
        assert_eq!(n, frame.len() - 4);
        &frame[4..]
    }

    fn arb_key() -> impl Strategy<Value = BlockKey> {
        any::<[u8; 32]>().prop_map(BlockKey)
    }
    fn arb_ns() -> impl Strategy<Value = NamespaceId> {
        any::<[u8; 16]>().prop_map(NamespaceId)
    }
    fn arb_text() -> impl Strategy<Value = String> {
        ".{0,40}"
    }
    fn arb_desc() -> impl Strategy<Value = NamespaceDesc> {
        (
            arb_text(),
            arb_text(),
            arb_text(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            arb_text(),
            arb_text(),
            any::<u16>(),
        )
            .prop_map(|(m, d, l, b, r, s, lo, t, v)| NamespaceDesc {
                model: m,
                dtype: d,
                layout: l,
                block_tokens: b,
                tp_rank: r,
                tp_size: s,
                lora: lo,
                tenant: t,
                format_version: v,
            })
    }
    fn arb_keys() -> impl Strategy<Value = Vec<BlockKey>> {
        prop::collection::vec(arb_key(), 0..40)
    }
    fn arb_tier() -> impl Strategy<Value = Tier> {
        (0u8..4).prop_map(|t| Tier::from_u8(t).unwrap())
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (any::<u16>(), arb_text(), any::<bool>()).prop_map(|(v, n, a)| Request::Hello {
                protocol_version: v,
                client_name: n,
                admin: a
            }),
            arb_desc().prop_map(Request::OpenNamespace),
            (arb_ns(), arb_keys()).prop_map(|(ns, keys)| Request::Lookup { ns, keys }),
            (arb_ns(), arb_keys()).prop_map(|(ns, keys)| Request::Pin { ns, keys }),
            (arb_ns(), arb_keys()).prop_map(|(ns, keys)| Request::Unpin { ns, keys }),
            (arb_ns(), arb_keys()).prop_map(|(ns, keys)| Request::Delete { ns, keys }),
            Just(Request::Stats),
            (
                prop::option::of(arb_ns()),
                prop::option::of((arb_ns(), arb_key())),
                any::<u32>()
            )
                .prop_map(|(ns, after, limit)| Request::List { ns, after, limit }),
            arb_key().prop_map(|key| Request::Inspect { key }),
            (prop::option::of(arb_ns()), arb_keys())
                .prop_map(|(ns, keys)| Request::Evict { ns, keys }),
            prop::option::of(arb_ns()).prop_map(|ns| Request::Drain { ns }),
            prop::option::of(arb_ns()).prop_map(|ns| Request::Warm { ns }),
            (arb_ns(), arb_keys()).prop_map(|(ns, keys)| Request::ClusterLookup { ns, keys }),
            (
                arb_ns(),
                prop::option::of(arb_key()),
                arb_keys(),
                prop::collection::vec(any::<u32>(), 0..300)
            )
                .prop_map(|(ns, parent, keys, tokens)| Request::Lineage {
                    ns,
                    parent,
                    keys,
                    tokens
                }),
            (
                arb_ns(),
                prop::collection::vec(
                    prop_oneof![
                        any::<u64>().prop_map(|len| GpuShare::Fd { len }),
                        any::<[u8; 32]>().prop_map(|h| {
                            let mut b = [0u8; 64];
                            b[..32].copy_from_slice(&h);
                            b[40] = h[0];
                            GpuShare::CudaIpc(b)
                        }),
                    ],
                    0..5
                ),
                prop::collection::vec(any::<(u32, [u64; 4])>(), 0..5)
            )
                .prop_map(|(ns, shares, layers)| Request::GpuAttach {
                    ns,
                    shares,
                    layers: layers
                        .into_iter()
                        .map(|(share, [offset, stride, page, pages])| GpuLayer {
                            share,
                            offset,
                            stride,
                            page,
                            pages
                        })
                        .collect()
                }),
            (
                any::<u32>(),
                arb_keys(),
                prop::collection::vec(any::<u32>(), 0..40)
            )
                .prop_map(|(attachment, keys, pages)| Request::GpuSave {
                    attachment,
                    keys,
                    pages
                }),
            (
                any::<u32>(),
                arb_keys(),
                prop::collection::vec(any::<u32>(), 0..40),
                any::<(u32, u32, bool)>()
            )
                .prop_map(
                    |(attachment, keys, pages, (first_layer, layers, verify))| {
                        Request::GpuLoad {
                            attachment,
                            keys,
                            pages,
                            first_layer,
                            layers,
                            verify,
                        }
                    }
                ),
            any::<u32>().prop_map(|attachment| Request::GpuDetach { attachment }),
        ]
    }

    fn arb_response() -> impl Strategy<Value = Response> {
        let gpu =
            (arb_text(), any::<[u64; 8]>(), arb_text()).prop_map(|(backend, n, e)| GpuReport {
                backend,
                pinned_bytes: n[0],
                pin_ms: n[1],
                attachments: n[2],
                saved_blocks: n[3],
                loaded_blocks: n[4],
                d2h_bytes: n[5],
                h2d_bytes: n[6],
                copy_errors: n[7],
                last_error: e,
            });
        let s3 = (
            [arb_text(), arb_text(), arb_text()],
            any::<(bool, bool)>(),
            any::<[u64; 21]>(),
        )
            .prop_map(|([endpoint, bucket, e], (degraded, scanned), n)| {
                S3Report::from_numbers(endpoint, bucket, degraded, scanned, n, e)
            });
        let peer =
            (arb_text(), any::<[u64; 7]>(), arb_text()).prop_map(|(advertise, n, e)| PeerReport {
                advertise,
                served_blocks: n[0],
                served_bytes: n[1],
                fetched_blocks: n[2],
                fetched_bytes: n[3],
                fetch_failures: n[4],
                checksum_failures: n[5],
                bad_requests: n[6],
                last_error: e,
            });
        let events = (
            [arb_text(), arb_text(), arb_text(), arb_text(), arb_text()],
            any::<[u64; 6]>(),
        )
            .prop_map(
                |([endpoint, replay, topic, form, last_error], n)| EventsReport {
                    endpoint,
                    replay_endpoint: replay,
                    topic_prefix: topic,
                    form,
                    batches: n[0],
                    events: n[1],
                    skipped: n[2],
                    resyncs: n[3],
                    next_seq: n[4],
                    lineage_blocks: n[5],
                    last_error,
                },
            );
        let index = (
            arb_text(),
            arb_text(),
            any::<bool>(),
            any::<[u64; 4]>(),
            arb_text(),
        )
            .prop_map(|(endpoint, node, connected, n, last_error)| IndexReport {
                endpoint,
                node,
                connected,
                epoch: n[0],
                published: n[1],
                republishes: n[2],
                outages: n[3],
                last_error,
            });
        let disk = (
            arb_text(),
            arb_text(),
            any::<bool>(),
            any::<[u64; 18]>(),
            any::<(u32, u32)>(),
            arb_text(),
        )
            .prop_map(
                |(path, engine, direct_io, n, (regions, free_regions), degraded)| DiskReport {
                    path,
                    engine,
                    direct_io,
                    capacity_bytes: n[0],
                    used_bytes: n[1],
                    regions,
                    free_regions,
                    blocks: n[4],
                    hits: n[5],
                    misses: n[6],
                    read_bytes: n[7],
                    write_bytes: n[8],
                    read_bytes_per_s: n[9],
                    write_bytes_per_s: n[10],
                    writes: n[11],
                    admission_rejections: n[12],
                    reclaims: n[13],
                    reclaimed_blocks: n[14],
                    checksum_failures: n[15],
                    io_errors: n[16],
                    dropped_at_start: n[17],
                    drain_pending: n[2],
                    warm_pending: n[3],
                    warmed: n[4],
                    quota_evictions: n[5],
                    degraded,
                },
            );
        let tier_stats = (arb_tier(), any::<[u64; 8]>()).prop_map(|(tier, v)| TierStats {
            tier,
            capacity_bytes: v[0],
            used_bytes: v[1],
            blocks: v[2],
            hits: v[3],
            misses: v[4],
            evictions: v[5],
            bytes_in: v[6],
            bytes_out: v[7],
        });
        let ns_stats =
            (arb_ns(), arb_desc(), any::<[u64; 11]>()).prop_map(|(ns, desc, v)| NamespaceStats {
                owner_uid: v[10] as u32,
                disk_blocks: v[10] >> 7,
                disk_bytes: v[9] >> 3,
                ns,
                desc,
                arena_bytes: v[0],
                used_bytes: v[1],
                blocks: v[2],
                pinned: v[3],
                leases: v[4],
                reserved: v[5],
                hits: v[6],
                misses: v[7],
                evictions: v[8],
                full_rejections: v[9],
            });
        let client = (
            any::<u64>(),
            arb_text(),
            any::<u32>(),
            any::<u32>(),
            any::<bool>(),
        )
            .prop_map(|(id, name, pid, uid, admin)| ClientInfo {
                id,
                name,
                pid,
                uid,
                admin,
                ops: id ^ 7,
                sq_depth: pid % 257,
                cq_depth: uid % 257,
            });
        let block = (
            arb_ns(),
            arb_key(),
            arb_tier(),
            any::<[u64; 6]>(),
            any::<[u32; 2]>(),
        )
            .prop_map(|(ns, key, tier, v, p)| BlockInfo {
                ns,
                key,
                tier,
                len: v[0],
                checksum: v[1],
                pins: p[0],
                readers: p[1],
                hits: v[2],
                age_ms: v[3],
                idle_ms: v[4],
            });
        prop_oneof![
            (
                any::<u16>(),
                arb_text(),
                any::<u64>(),
                any::<u32>(),
                any::<u64>()
            )
                .prop_map(|(v, s, id, e, b)| Response::Welcome {
                    protocol_version: v,
                    daemon_version: s,
                    client_id: id,
                    ring_entries: e,
                    ring_bytes: b,
                    max_block_bytes: b / 3,
                    lease_timeout_ms: e / 2,
                }),
            (arb_ns(), any::<u32>(), any::<u64>(), any::<bool>()).prop_map(
                |(ns, handle, arena_bytes, events)| Response::NamespaceOpened {
                    ns,
                    handle,
                    arena_bytes,
                    events,
                }
            ),
            (any::<u32>(), any::<[u32; 4]>()).prop_map(|(p, t)| Response::LookupResult {
                prefix_len: p,
                tiers: TierCounts(t)
            }),
            any::<u32>().prop_map(Response::Count),
            any::<(u32, u64)>().prop_map(|(attachment, block_bytes)| Response::GpuAttached {
                attachment,
                block_bytes
            }),
            prop::collection::vec((0u8..6).prop_map(|v| BlockCode::from_u8(v).unwrap()), 0..40)
                .prop_map(Response::BlockCodes),
            (
                arb_text(),
                any::<u64>(),
                prop::collection::vec(tier_stats, 0..4),
                prop::collection::vec(ns_stats, 0..3),
                prop::collection::vec(client, 0..3),
                prop::option::of(disk),
                prop::option::of(index),
                prop::option::of(events),
                prop::option::of(peer),
                prop::option::of(gpu),
                prop::option::of(s3)
            )
                .prop_map(
                    |(v, up, tiers, namespaces, clients, disk, index, events, peer, gpu, s3)| {
                        Response::Stats(Box::new(StatsReport {
                            daemon_version: v,
                            uptime_ms: up,
                            tiers,
                            namespaces,
                            clients,
                            disk,
                            index,
                            events,
                            peer,
                            gpu,
                            s3,
                        }))
                    }
                ),
            (prop::collection::vec(block, 0..5), any::<bool>())
                .prop_map(|(blocks, more)| Response::Blocks { blocks, more }),
            (
                any::<u32>(),
                prop::collection::vec(
                    (arb_text(), any::<u32>(), any::<[u32; 4]>(), any::<bool>()),
                    0..4
                ),
                any::<bool>()
            )
                .prop_map(|(prefix_len, nodes, cluster)| {
                    Response::ClusterResult(ClusterLookup {
                        prefix_len,
                        nodes: nodes
                            .into_iter()
                            .map(|(node, prefix_len, t, local)| NodeHolding {
                                node,
                                prefix_len,
                                tiers: TierCounts(t),
                                local,
                            })
                            .collect(),
                        cluster,
                    })
                }),
            (1u16..=10, arb_text()).prop_map(|(c, message)| Response::Error {
                code: ErrorCode::from_u16(c).unwrap(),
                message
            }),
        ]
    }

    proptest! {
        #[test]
        fn request_round_trips(req in arb_request(), id in any::<u32>()) {
            let frame = req.encode(id);
            prop_assert_eq!(Request::decode(strip(&frame)).unwrap(), (id, req));
        }

        #[test]
        fn response_round_trips(resp in arb_response(), id in any::<u32>()) {
            let frame = resp.encode(id);
            prop_assert_eq!(Response::decode(strip(&frame)).unwrap(), (id, resp));
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = Request::decode(&bytes);
            let _ = Response::decode(&bytes);
        }

        #[test]
        fn every_truncation_is_an_error(req in arb_request(), resp in arb_response()) {
            let f = req.encode(1);
            let body = &f[4..];
            for cut in 0..body.len() {
                prop_assert!(Request::decode(&body[..cut]).is_err());
            }
            let f = resp.encode(1);
            let body = &f[4..];
            for cut in 0..body.len() {
                prop_assert!(Response::decode(&body[..cut]).is_err());
            }
        }

        #[test]
        fn mutated_frames_never_panic(req in arb_request(), pos in any::<usize>(), val in any::<u8>()) {
            let mut f = req.encode(9);
            let i = 4 + pos % (f.len() - 4);
            f[i] = val;
            let _ = Request::decode(&f[4..]);
        }
    }

    #[test]
    fn trailing_bytes_and_oversize_are_rejected() {
        let mut f = Request::Stats.encode(3);
        f.push(0);
        assert_eq!(Request::decode(&f[4..]), Err(DecodeError::Trailing(1)));
        assert!(matches!(
            body_len(u32::MAX.to_le_bytes(), MAX_FRAME_BYTES),
            Err(DecodeError::TooLong { .. })
        ));
        assert!(body_len(1u32.to_le_bytes(), MAX_FRAME_BYTES).is_err());
    }

    #[test]
    fn forged_key_count_is_refused_without_allocating() {
        let mut w = Writer::new();
        w.u8(tag::LOOKUP);
        w.u32(1);
        w.raw(&[0; 16]);
        w.u32(u32::MAX);
        assert!(matches!(
            Request::decode(&w.into_vec()),
            Err(DecodeError::TooLong { .. })
        ));
    }
}
