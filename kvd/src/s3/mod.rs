//! The S3 tier (T3): blocks packed into segment objects in a bucket shared by every node.
//!
//! It is the tier that outlives the node: a node that restarts with an empty disk, or a new
//! node of a scaled-up deployment, finds there what the others computed. Blocks the admission
//! filter lets in (every block in write-through mode) are copied from their DRAM slot into the
//! namespace's open [`segment`] by the `kvd-s3-upload` thread (checked against their checksum
//! on the way); a segment is uploaded — multipart when larger than one part — when it reaches
//! `s3.segment_bytes`, when `s3.flush_interval_ms` passed since its first block, or at once
//! in write-through mode. Only after the upload succeeded do its blocks appear in the S3 index
//! (and the disk catalog, when there is a disk tier), so the index never names bytes that are
//! not in the bucket.
//!
//! The index maps each (namespace, key) to (segment, offset, length, checksum); about 80 bytes
//! per block. It is rebuilt from the catalog at start, then reconciled with a listing of the
//! bucket (at start, every `s3.rescan_interval_ms` and on `kvd-ctl warm`): segments other nodes
//! wrote are learnt from their own index (one suffix-ranged GET each), segments gone from the
//! bucket are forgotten. A lookup that misses in DRAM, on disk and at peers reads the blocks
//! S3 holds with ranged GETs into DRAM slots, verifies each against its checksum (a mismatch
//! is a miss, a metric and a log line) and answers from DRAM.
//!
//! S3 failing never blocks the hot path: every request goes through [`client::Bucket`]'s retry
//! policy and circuit breaker; with the breaker open lookups skip S3 at once and uploads wait,
//! their blocks staying queued in DRAM. A node deletes only segments it wrote (the node name
//! is part of the object key), by age (`s3.max_age_secs`), over its budget
//! (`s3.capacity_bytes`) or over a tenant's share of it (`s3.max_bytes_per_tenant`, the
//! tenant's oldest segments), and never one with a read in flight: the segment leaves the index
//! first, the object goes when its last reader is done.

pub mod breaker;
pub mod client;

pub use kvd_proto::segment;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hashbrown::HashMap;
use kvd_proto::frame::{S3Report, TierCounts};
use kvd_proto::{BlockKey, NamespaceId, Tier};
use parking_lot::Mutex;
use tokio::runtime::Handle;
use twox_hash::XxHash3_64;

use crate::config::{Config, S3Config, S3WriteMode};
use crate::daemon::{Daemon, Namespace, Reservation};
use crate::disk::admission::Admission;
use crate::disk::DiskTier;
use client::{Bucket, S3Error};
use segment::{Builder, Entry, SegmentError, Trailer};

/// Suffix read first from a segment to find its trailer and (usually) its whole index.
const TAIL_READ: u64 = 256 << 10;
/// A segment sealed less than this before a listing started is not forgotten for being
/// absent from it (its upload may have completed during the listing).
const LISTING_SLACK_MS: u64 = 60_000;
/// How often a drain recounts the blocks it still has to upload.
const DRAIN_COUNT_EVERY: Duration = Duration::from_millis(20);
/// Namespaces whose tenant the tier remembers before it forgets those without segments.
const MAX_OWNERS: usize = 1 << 16;
/// Sealed segments kept ready beyond those uploading.
const SEALED_AHEAD: usize = 2;
/// Blocks taken from a namespace's upload queue at once.
const UPLOAD_BATCH: usize = 64;

/// Why the S3 tier could not start.
#[derive(Debug, thiserror::Error)]
pub enum S3StartError {
    /// The client could not be built (a secret file that cannot be read).
    #[error("{0}")]
    Client(String),
    /// S3 needs the multi-threaded async runtime the daemon runs on.
    #[error("the S3 tier needs kvd's multi-threaded async runtime")]
    Runtime,
}

/// Counters of the tier (all monotonic except the gauges named so).
#[derive(Debug, Default)]
pub struct S3Counters {
    /// Segments uploaded.
    pub uploaded_segments: AtomicU64,
    /// Blocks uploaded.
    pub uploaded_blocks: AtomicU64,
    /// Bytes uploaded (segment objects, index included).
    pub uploaded_bytes: AtomicU64,
    /// Segment uploads that failed for good (their blocks queued again).
    pub upload_failures: AtomicU64,
    /// Blocks the admission filter kept out.
    pub rejected: AtomicU64,
    /// Blocks read from S3 into DRAM.
    pub read_blocks: AtomicU64,
    /// Bytes read from S3 into DRAM.
    pub read_bytes: AtomicU64,
    /// Block reads that failed (request errors, missing objects, no room).
    pub read_failures: AtomicU64,
    /// Blocks whose bytes did not match their checksum (never served).
    pub corrupt: AtomicU64,
    /// Segments this node deleted (age, budget, or no live block left).
    pub deleted_segments: AtomicU64,
    /// Segments being uploaded now (gauge).
    pub uploading: AtomicU64,
    /// Blocks in segments being uploaded now (gauge).
    pub uploading_blocks: AtomicU64,
    /// Blocks a drain still has to upload (gauge).
    pub drain_pending: AtomicU64,
    /// Blocks a warm still has to read (gauge).
    pub warm_pending: AtomicU64,
    /// Blocks warmed into DRAM.
    pub warmed: AtomicU64,
}

#[derive(Debug)]
struct Seg {
    name: Arc<str>,
    /// Namespace of its blocks.
    ns: NamespaceId,
    size: u64,
    created_ms: u64,
    /// Index entries pointing here.
    live: u32,
    /// Reads in flight.
    readers: u32,
    /// Written by this node (only those are ever deleted by it).
    ours: bool,
    /// Out of the index; deleted from the bucket when `readers` reaches 0 (if ours).
    doomed: bool,
}

#[derive(Debug, Clone, Copy)]
struct Loc {
    seg: u32,
    offset: u64,
    len: u64,
    checksum: u64,
}

#[derive(Debug, Default)]
struct State {
    index: HashMap<(NamespaceId, BlockKey), Loc>,
    segs: HashMap<u32, Seg>,
    by_name: HashMap<Arc<str>, u32>,
    next: u32,
    /// Bytes of live segments this node wrote.
    ours_bytes: u64,
    /// The tenant (base) each namespace this node uploads counts against
    /// (`s3.max_bytes_per_tenant`); learnt from uploads since start.
    owners: HashMap<NamespaceId, Arc<str>>,
}

/// One block to read from S3; its segment counts it as a reader until it is dropped.
struct ReadPlan {
    key: BlockKey,
    seg: SegRef,
    name: Arc<str>,
    offset: u64,
    len: u64,
    checksum: u64,
}

/// A reader of a segment: a doomed segment is deleted only after its last reader drops.
struct SegRef {
    tier: Arc<S3Tier>,
    id: u32,
}

impl Drop for SegRef {
    fn drop(&mut self) {
        self.tier.end_read(self.id);
    }
}

/// The S3 tier.
#[derive(Debug)]
pub struct S3Tier {
    /// Its configuration.
    pub cfg: S3Config,
    /// The bucket.
    pub bucket: Bucket,
    rt: Handle,
    node: String,
    root: String,
    state: Mutex<State>,
    admission: Mutex<Admission>,
    /// Counters.
    pub counters: S3Counters,
    disk: Option<Arc<DiskTier>>,
    /// Segments whose upload may start (`s3.upload_concurrency` permits).
    slots: Arc<tokio::sync::Semaphore>,
    /// Sealed segments held in memory, waiting or uploading (`upload_concurrency +
    /// SEALED_AHEAD` permits).
    sealed: Arc<tokio::sync::Semaphore>,
    /// Segment buffers given back after their upload, for the next segments.
    buffers: Mutex<Vec<Vec<u8>>>,
    draining: AtomicBool,
    warming: AtomicBool,
    /// The first listing of the bucket completed (the index knows what S3 held at start).
    scanned: AtomicBool,
}

impl S3Tier {
    /// Builds the client and loads the segment records of the disk catalog (no request to S3
    /// yet: the daemon starts even when S3 is down; [`maintain`](Self::maintain) checks the
    /// bucket and lists it).
    pub fn open(cfg: &Config, disk: Option<Arc<DiskTier>>) -> Result<Arc<S3Tier>, S3StartError> {
        let rt = Handle::try_current().map_err(|_| S3StartError::Runtime)?;
        if rt.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            return Err(S3StartError::Runtime);
        }
        let s3 = &cfg.s3;
        let bucket = tokio::task::block_in_place(|| rt.block_on(Bucket::new(s3)))
            .map_err(S3StartError::Client)?;
        let prefix = s3.prefix.trim_end_matches('/');
        let root = if prefix.is_empty() {
            "segments/".to_owned()
        } else {
            format!("{prefix}/segments/")
        };
        let tier = S3Tier {
            cfg: s3.clone(),
            bucket,
            rt,
            node: crate::index::node_id(&cfg.index),
            root,
            state: Mutex::new(State::default()),
            admission: Mutex::new(Admission::new(
                s3.admission,
                s3.admission_min_frequency,
                1 << 20,
            )),
            counters: S3Counters::default(),
            disk,
            slots: Arc::new(tokio::sync::Semaphore::new(s3.upload_concurrency as usize)),
            sealed: Arc::new(tokio::sync::Semaphore::new(
                s3.upload_concurrency as usize + SEALED_AHEAD,
            )),
            buffers: Mutex::new(Vec::new()),
            draining: AtomicBool::new(false),
            warming: AtomicBool::new(false),
            scanned: AtomicBool::new(false),
        };
        tier.load_catalog();
        Ok(Arc::new(tier))
    }

    /// Object-key prefix of a namespace's segments.
    fn ns_prefix(&self, ns: &NamespaceId) -> String {
        format!("{}{}/", self.root, ns.to_hex())
    }

    /// A new segment's object key: `<root><ns>/<created ms>-<node>-<nonce>.kseg`.
    fn segment_name(&self, ns: &NamespaceId, created_ms: u64) -> String {
        format!(
            "{}{created_ms:013}-{}-{:016x}.kseg",
            self.ns_prefix(ns),
            self.node,
            rand::random::<u64>()
        )
    }

    /// The namespace and writer of a segment key under this tier's root.
    fn parse_name<'a>(&self, name: &'a str) -> Option<(NamespaceId, &'a str)> {
        let rest = name.strip_prefix(&self.root)?;
        let (ns, file) = rest.split_once('/')?;
        let ns = NamespaceId::from_hex(ns)?;
        let stem = file.strip_suffix(".kseg")?;
        let (_, rest) = stem.split_once('-')?;
        let (node, _) = rest.rsplit_once('-')?;
        Some((ns, node))
    }

    fn load_catalog(&self) {
        let Some(disk) = &self.disk else { return };
        let mut found = Vec::new();
        let r = disk.catalog().scan_segments(|name, size, blob| {
            found.push((name.to_owned(), size, blob.to_vec()));
        });
        if let Err(e) = r {
            tracing::warn!(error = %e, "S3 tier: segment records unreadable; the bucket listing rebuilds them");
            return;
        }
        let mut bad = Vec::new();
        for (name, size, blob) in found {
            match decode_blob(&blob, size) {
                Ok((tr, entries)) if self.parse_name(&name).is_some_and(|(ns, _)| ns == tr.ns) => {
                    self.register(&name, size, &tr, &entries);
                }
                _ => bad.push(name),
            }
        }
        if !bad.is_empty() {
            tracing::warn!(
                segments = bad.len(),
                "S3 tier: dropped unreadable segment records"
            );
            let names: Vec<&str> = bad.iter().map(String::as_str).collect();
            let _ = disk.catalog().delete_segments(&names);
        }
        let st = self.state.lock();
        if !st.segs.is_empty() {
            tracing::info!(
                segments = st.segs.len(),
                blocks = st.index.len(),
                "S3 tier: segment index loaded from the catalog"
            );
        }
    }

    /// Adds a segment and its blocks to the index (a key already indexed keeps its place).
    fn register(&self, name: &str, size: u64, tr: &Trailer, entries: &[Entry]) {
        let ours = self.parse_name(name).is_some_and(|(_, n)| n == self.node);
        let mut st = self.state.lock();
        if st.by_name.contains_key(name) {
            return;
        }
        let id = st.next;
        st.next = st.next.wrapping_add(1);
        let name: Arc<str> = name.into();
        let mut live = 0u32;
        for e in entries {
            let loc = Loc {
                seg: id,
                offset: e.offset,
                len: e.len,
                checksum: e.checksum,
            };
            if let hashbrown::hash_map::Entry::Vacant(v) = st.index.entry((tr.ns, e.key)) {
                v.insert(loc);
                live += 1;
            }
        }
        if ours {
            st.ours_bytes += size;
        }
        st.by_name.insert(name.clone(), id);
        st.segs.insert(
            id,
            Seg {
                name,
                ns: tr.ns,
                size,
                created_ms: tr.created_ms,
                live,
                readers: 0,
                ours,
                doomed: false,
            },
        );
    }

    /// Of `kept` (this node's segments, oldest first: id, size, namespace), the oldest of
    /// each tenant beyond `cap` bytes (0: no cap). Past [`MAX_OWNERS`] namespaces, forgets
    /// the owners of those without a segment here.
    fn over_tenant_quota(st: &mut State, kept: &[(u32, u64, NamespaceId)], cap: u64) -> Vec<u32> {
        if st.owners.len() > MAX_OWNERS {
            let with_segments: hashbrown::HashSet<NamespaceId> =
                kept.iter().map(|(_, _, n)| *n).collect();
            st.owners.retain(|ns, _| with_segments.contains(ns));
        }
        if cap == 0 {
            return Vec::new();
        }
        let mut held: HashMap<Arc<str>, u64> = HashMap::new();
        for (_, size, ns) in kept {
            if let Some(t) = st.owners.get(ns) {
                *held.entry(t.clone()).or_default() += size;
            }
        }
        let mut out = Vec::new();
        for (id, size, ns) in kept {
            let Some(t) = st.owners.get(ns) else { continue };
            let Some(h) = held.get_mut(t).filter(|h| **h > cap) else {
                continue;
            };
            *h -= size;
            out.push(*id);
        }
        out
    }

    /// Takes segments out of the index (their blocks stop being found), in one pass over it.
    /// Returns the name of each segment doomed now, with whether its object can be deleted
    /// now (ours, no reader; otherwise its last reader deletes it, see `end_read`).
    fn doom(st: &mut State, ids: &[u32]) -> Vec<(Arc<str>, bool)> {
        let mut doomed = hashbrown::HashSet::new();
        let mut out = Vec::new();
        for id in ids {
            let Some(seg) = st.segs.get_mut(id).filter(|s| !s.doomed) else {
                continue;
            };
            seg.doomed = true;
            doomed.insert(*id);
            let (ours, size, readers, name) = (seg.ours, seg.size, seg.readers, seg.name.clone());
            if ours {
                st.ours_bytes = st.ours_bytes.saturating_sub(size);
            }
            if readers == 0 {
                st.segs.remove(id);
                st.by_name.remove(&name);
            }
            out.push((name, ours && readers == 0));
        }
        if !doomed.is_empty() {
            st.index.retain(|_, l| !doomed.contains(&l.seg));
        }
        out
    }

    /// Whether S3 holds `key` of `ns` (per the index).
    pub fn contains(&self, ns: &NamespaceId, key: &BlockKey) -> bool {
        self.state.lock().index.contains_key(&(*ns, *key))
    }

    /// How many of `keys`, from the first, S3 holds.
    pub fn prefix_len(&self, ns: &NamespaceId, keys: &[BlockKey]) -> usize {
        let st = self.state.lock();
        keys.iter()
            .take_while(|k| st.index.contains_key(&(*ns, **k)))
            .count()
    }

    /// Forgets deleted keys (their bytes stay in their segments until those go). Returns
    /// how many were indexed.
    pub fn delete(&self, ns: &NamespaceId, keys: &[BlockKey]) -> u32 {
        let mut st = self.state.lock();
        let mut n = 0;
        for k in keys {
            if let Some(l) = st.index.remove(&(*ns, *k)) {
                n += 1;
                if let Some(s) = st.segs.get_mut(&l.seg) {
                    s.live = s.live.saturating_sub(1);
                }
            }
        }
        n
    }

    /// Blocks, segments and segment bytes indexed (not counting doomed segments whose last
    /// read is still in flight).
    pub fn sizes(&self) -> (u64, u64, u64) {
        let st = self.state.lock();
        let live = st.segs.values().filter(|s| !s.doomed);
        let (n, bytes) = live.fold((0, 0), |(n, b), s| (n + 1, b + s.size));
        (st.index.len() as u64, n, bytes)
    }

    /// Keys S3 holds in `ns`, newest segment first (what a warm reads).
    fn keys_by_recency(&self, ns: &NamespaceId) -> Vec<(BlockKey, u64)> {
        let st = self.state.lock();
        let mut v: Vec<(u64, u64, BlockKey, u64)> = st
            .index
            .iter()
            .filter(|((n, _), _)| n == ns)
            .map(|((_, k), l)| {
                let created = st.segs.get(&l.seg).map_or(0, |s| s.created_ms);
                (created, l.offset, *k, l.len)
            })
            .collect();
        v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        v.into_iter().map(|(_, _, k, len)| (k, len)).collect()
    }

    fn plan(
        self: &Arc<Self>,
        ns: &NamespaceId,
        keys: &[BlockKey],
        stop_at_gap: bool,
    ) -> Vec<ReadPlan> {
        let mut st = self.state.lock();
        let mut out = Vec::new();
        for k in keys {
            let Some(l) = st.index.get(&(*ns, *k)).copied() else {
                if stop_at_gap {
                    break;
                }
                continue;
            };
            let Some(seg) = st.segs.get_mut(&l.seg) else {
                continue;
            };
            seg.readers += 1;
            out.push(ReadPlan {
                key: *k,
                seg: SegRef {
                    tier: self.clone(),
                    id: l.seg,
                },
                name: seg.name.clone(),
                offset: l.offset,
                len: l.len,
                checksum: l.checksum,
            });
        }
        out
    }

    /// A read of segment `seg` ended; deletes the object if it was doomed meanwhile.
    fn end_read(self: &Arc<Self>, seg: u32) {
        let mut st = self.state.lock();
        let Some(s) = st.segs.get_mut(&seg) else {
            return;
        };
        s.readers = s.readers.saturating_sub(1);
        if !(s.doomed && s.readers == 0) {
            return;
        }
        let (ours, name) = (s.ours, s.name.clone());
        st.segs.remove(&seg);
        st.by_name.remove(&name);
        drop(st);
        if ours {
            let me = self.clone();
            self.rt.spawn(async move { me.delete_object(&name).await });
        }
    }

    async fn delete_object(&self, name: &str) {
        match self.bucket.delete(name).await {
            Ok(()) => {
                self.counters
                    .deleted_segments
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(d) = &self.disk {
                    let _ = d.catalog().delete_segments(&[name]);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, segment = name, "S3 tier: segment delete failed; the next listing finds it again and reclaim retries")
            }
        }
    }

    /// Reads one planned block into a DRAM slot of `ns`, verified. Ok(false): stored
    /// meanwhile by someone else.
    async fn read_block(
        &self,
        ns: &Arc<Namespace>,
        p: &ReadPlan,
        now_ms: u64,
        may_evict: bool,
    ) -> Result<bool, ReadError> {
        let reserved = if may_evict {
            ns.store.lock().reserve(&p.key, p.len)
        } else {
            ns.store.lock().reserve_without_evicting(&p.key, p.len)
        };
        let slot = match reserved {
            Ok(s) => s,
            Err(crate::store::ReserveError::Exists) => return Ok(false),
            Err(_) => return Err(ReadError::NoRoom),
        };
        let guard = Reservation::new(ns.clone(), slot);
        // SAFETY: the slot is reserved by this task and not committed, so nobody else reads
        // or writes it until `guard` commits or aborts it (also when this future is dropped
        // mid-transfer); `ns` keeps the arena mapped.
        let Some(buf) = (unsafe { ns.arena.slot_mut(slot.offset, p.len) }) else {
            return Err(ReadError::NoRoom);
        };
        self.bucket
            .get_into(&p.name, p.offset, buf)
            .await
            .map_err(ReadError::S3)?;
        if XxHash3_64::oneshot(buf) != p.checksum {
            return Err(ReadError::Corrupt);
        }
        guard.commit_from_s3(&p.key, p.len, p.checksum, now_ms);
        Ok(true)
    }

    /// Reads `plan` into DRAM, `s3.read_concurrency` at once. Returns how many blocks are now
    /// in DRAM because of it.
    async fn read_plan(
        self: &Arc<Self>,
        ns: &Arc<Namespace>,
        plan: Vec<ReadPlan>,
        now_ms: u64,
        fill: Fill<'_>,
    ) -> u64 {
        use futures_util::StreamExt;
        let conc = self.cfg.read_concurrency as usize;
        let may_evict = !matches!(fill, Fill::Warm);
        let results = futures_util::stream::iter(plan.into_iter().map(|p| async move {
            let r = self.read_block(ns, &p, now_ms, may_evict).await;
            self.account(ns, &p, &r);
            if let (Fill::Lookup(a), Ok(true)) = (fill, &r) {
                a.fetch_add(1, Ordering::Relaxed);
            }
            r
        }))
        .buffer_unordered(conc)
        .collect::<Vec<_>>()
        .await;
        results.iter().filter(|r| matches!(r, Ok(true))).count() as u64
    }

    fn account(&self, ns: &Namespace, p: &ReadPlan, r: &Result<bool, ReadError>) {
        let c = &self.counters;
        match r {
            Ok(true) => {
                c.read_blocks.fetch_add(1, Ordering::Relaxed);
                c.read_bytes.fetch_add(p.len, Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(ReadError::Corrupt) => {
                c.corrupt.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(key = %p.key, segment = %p.name, "S3 tier: block does not match its checksum; dropped, not served");
                self.delete(&ns.id, &[p.key]);
            }
            Err(ReadError::S3(S3Error::NotFound(_))) => {
                c.read_failures.fetch_add(1, Ordering::Relaxed);
                tracing::info!(segment = %p.name, "S3 tier: segment gone from the bucket; forgotten");
                Self::doom(&mut self.state.lock(), &[p.seg.id]);
            }
            Err(e) => {
                c.read_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, key = %p.key, "S3 tier: block read failed");
            }
        }
    }

    /// For a lookup: reads into DRAM the blocks of `keys` (from the first) that S3 holds,
    /// within `s3.lookup_timeout_ms`; returns how many arrived. Skipped at once while the
    /// breaker is open.
    pub async fn fetch_prefix(
        self: &Arc<Self>,
        ns: &Arc<Namespace>,
        keys: &[BlockKey],
        now_ms: u64,
    ) -> u64 {
        if keys.is_empty() || !self.bucket.available() {
            return 0;
        }
        let plan = self.plan(&ns.id, keys, true);
        if plan.is_empty() {
            return 0;
        }
        let timeout = Duration::from_millis(u64::from(self.cfg.lookup_timeout_ms));
        let arrived = AtomicU64::new(0);
        // On timeout the reads still in flight are dropped: their slots are given back and
        // their segments' reader counts released (both guards).
        if tokio::time::timeout(
            timeout,
            self.read_plan(ns, plan, now_ms, Fill::Lookup(&arrived)),
        )
        .await
        .is_err()
        {
            tracing::debug!("S3 tier: lookup read timed out; answering with what arrived");
        }
        arrived.load(Ordering::Relaxed)
    }

    // --- uploads ---------------------------------------------------------------------------

    /// Records a sighting of a block for the admission filter.
    pub fn record_sighting(&self, ns: &NamespaceId, key: &BlockKey) {
        if self.cfg.write_mode == S3WriteMode::WriteBehind {
            self.admission.lock().record(ns, key);
        }
    }

    fn admit(&self, ns: &NamespaceId, key: &BlockKey) -> bool {
        self.cfg.write_mode == S3WriteMode::WriteThrough
            || self.draining.load(Ordering::Relaxed)
            || self.admission.lock().admit(ns, key)
    }

    /// Queues every DRAM block of the given namespaces without an S3 copy and uploads them
    /// regardless of admission (`kvd-ctl drain`). Returns how many blocks that is.
    pub fn drain(&self, namespaces: &[Arc<Namespace>]) -> u64 {
        let n: u64 = namespaces
            .iter()
            .map(|ns| ns.store.lock().queue_all_uploads())
            .sum();
        self.counters.drain_pending.store(n, Ordering::Relaxed);
        self.draining.store(true, Ordering::SeqCst);
        n
    }

    /// Whether a drain is still uploading.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The size at which the open segment is sealed: with `k` of `n` upload slots busy,
    /// `(k + 1) / n` of the segment size (the full size once `n - 1` are busy). A burst (a
    /// drain, a cold start) then has its first upload going after a fraction of a segment is
    /// packed, the second after two, ..., instead of every slot waiting for a whole segment
    /// to be packed before it starts; in steady state segments are full.
    fn seal_at(&self, seg_bytes: u64) -> u64 {
        let slots = u64::from(self.cfg.upload_concurrency);
        let busy = self
            .counters
            .uploading
            .load(Ordering::Relaxed)
            .min(slots - 1);
        (seg_bytes / slots * (busy + 1)).max(1)
    }

    /// A buffer for a new segment: a used one if any (its pages already mapped), else a
    /// fresh one of the segment size.
    fn buffer(&self) -> Vec<u8> {
        self.buffers.lock().pop().unwrap_or_else(|| {
            Vec::with_capacity(
                self.cfg.segment_bytes.0 as usize + self.cfg.segment_bytes.0 as usize / 8,
            )
        })
    }

    /// Keeps an uploaded segment's buffer for reuse (at most as many as sealed segments may
    /// wait or upload at once).
    fn give_back(&self, body: Bytes) {
        let Ok(m) = body.try_into_mut() else {
            return;
        };
        let mut pool = self.buffers.lock();
        if pool.len() < self.cfg.upload_concurrency as usize + SEALED_AHEAD {
            pool.push(Vec::from(m));
        }
    }

    fn seal_and_upload(self: &Arc<Self>, d: &Weak<Daemon>, b: Builder) {
        let ns = b.ns();
        let created = crate::disk::unix_ms();
        let name = self.segment_name(&ns, created);
        let (object, entries) = b.seal(created);
        // At most `upload_concurrency + SEALED_AHEAD` sealed segments in memory beyond the
        // open ones: the packer runs ahead of the uploads, so a slot that frees finds the next
        // segment ready instead of waiting for it to be packed.
        let Ok(in_memory) = self.rt.block_on(self.sealed.clone().acquire_owned()) else {
            return;
        };
        let blocks = entries.len() as u64;
        self.counters
            .uploading_blocks
            .fetch_add(blocks, Ordering::Relaxed);
        let (me, d) = (self.clone(), d.clone());
        self.rt.spawn(async move {
            let Ok(permit) = me.slots.clone().acquire_owned().await else {
                return;
            };
            me.counters.uploading.fetch_add(1, Ordering::Relaxed);
            let size = object.len() as u64;
            let body = Bytes::from(object);
            let index_offset =
                size - segment::TRAILER_BYTES - entries.len() as u64 * segment::ENTRY_BYTES;
            let index = body[index_offset as usize..].to_vec();
            let part = me.cfg.part_bytes.0 as usize;
            let r = if body.len() > part {
                me.bucket
                    .put_multipart(&name, &body, part, me.cfg.upload_concurrency as usize)
                    .await
            } else {
                me.bucket.put(&name, &body).await
            };
            drop(permit);
            me.counters.uploading.fetch_sub(1, Ordering::Relaxed);
            me.give_back(body);
            me.uploaded(&d, &ns, &name, size, &index, &entries, created, r);
            me.counters
                .uploading_blocks
                .fetch_sub(blocks, Ordering::Relaxed);
            drop(in_memory);
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn uploaded(
        &self,
        d: &Weak<Daemon>,
        ns: &NamespaceId,
        name: &str,
        size: u64,
        index: &[u8],
        entries: &[Entry],
        created: u64,
        r: Result<(), S3Error>,
    ) {
        let keys: Vec<BlockKey> = entries.iter().map(|e| e.key).collect();
        let ok = r.is_ok();
        match r {
            Ok(()) => {
                let tr = Trailer {
                    count: entries.len() as u32,
                    ns: *ns,
                    index_offset: size - index.len() as u64,
                    created_ms: created,
                    index_checksum: 0,
                };
                self.register(name, size, &tr, entries);
                if let Some(disk) = &self.disk {
                    if let Err(e) = disk.catalog().put_segment(name, size, index) {
                        tracing::warn!(error = %e, "S3 tier: segment record not written; the next listing finds it");
                    }
                }
                let c = &self.counters;
                c.uploaded_segments.fetch_add(1, Ordering::Relaxed);
                c.uploaded_blocks
                    .fetch_add(keys.len() as u64, Ordering::Relaxed);
                c.uploaded_bytes.fetch_add(size, Ordering::Relaxed);
                tracing::debug!(
                    segment = name,
                    blocks = keys.len(),
                    bytes = size,
                    "S3 tier: segment uploaded"
                );
            }
            Err(e) => {
                self.counters
                    .upload_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, blocks = keys.len(), "S3 tier: segment upload failed; its blocks still in DRAM are queued again");
            }
        }
        if let Some(d) = d.upgrade() {
            if let Some(n) = d.namespaces().into_iter().find(|n| n.id == *ns) {
                n.store.lock().uploaded(&keys, ok);
            }
        }
    }

    /// The upload loop (`kvd-s3-upload` thread): packs queued blocks into per-namespace
    /// segments and hands full or due segments to the async runtime for upload.
    pub fn run_uploader(self: Arc<Self>, d: Weak<Daemon>) {
        let mut open: HashMap<NamespaceId, Builder> = HashMap::new();
        let seg_bytes = self.cfg.segment_bytes.0;
        let flush_after = u64::from(self.cfg.flush_interval_ms);
        let mut last_count = Instant::now();
        loop {
            let Some(daemon) = d.upgrade() else { return };
            if daemon.is_stopping() {
                return;
            }
            let namespaces = daemon.namespaces();
            drop(daemon);
            let mut packed = 0usize;
            if self.bucket.available() {
                for ns in &namespaces {
                    let cands = ns.store.lock().upload_candidates(UPLOAD_BATCH);
                    for c in cands {
                        if !self.admit(&ns.id, &c.key) {
                            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                            ns.store.lock().finish_upload(c.entry, false);
                            continue;
                        }
                        // SAFETY: the block is committed and held (upload_candidates took a
                        // read lease), so it is neither written by a client nor freed while
                        // the slice is read; `ns` keeps the arena mapped.
                        let bytes = unsafe { ns.arena.block(c.offset, c.len) };
                        let b = open.entry(ns.id).or_insert_with(|| {
                            self.own(ns.id, crate::tenancy::base(&ns.desc.tenant));
                            Builder::with_buffer(ns.id, self.buffer(), crate::disk::unix_ms())
                        });
                        let ok =
                            bytes.is_some_and(|bytes| b.push_checked(c.key, bytes, c.checksum));
                        if ok {
                            packed += 1;
                        } else {
                            self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(key = %c.key, "S3 tier: DRAM block no longer matches its checksum (a client wrote into it after its commit); deleted, not uploaded");
                        }
                        let mut st = ns.store.lock();
                        st.finish_upload(c.entry, ok);
                        if !ok {
                            // Nobody is served bytes that changed after their commit.
                            st.delete(std::slice::from_ref(&c.key));
                        }
                        drop(st);
                        if let Some(b) = open.get(&ns.id) {
                            if b.data_len() >= self.seal_at(seg_bytes) {
                                if let Some(b) = open.remove(&ns.id) {
                                    self.seal_and_upload(&d, b);
                                }
                            }
                        }
                    }
                }
            }
            // Due segments: old enough, or nothing more to wait for (write-through, drain).
            // None while the breaker is open: the upload would fail at once.
            let now = crate::disk::unix_ms();
            let can_upload = self.bucket.available();
            let idle = packed == 0;
            let eager = self.cfg.write_mode == S3WriteMode::WriteThrough
                || self.draining.load(Ordering::Relaxed);
            // A segment whose only candidate failed its check is empty: nothing to upload.
            open.retain(|_, b| !b.is_empty());
            let due: Vec<NamespaceId> = open
                .iter()
                .filter(|(_, b)| {
                    can_upload
                        && ((idle && eager) || now.saturating_sub(b.first_ms()) >= flush_after)
                })
                .map(|(k, _)| *k)
                .collect();
            for ns in due {
                if let Some(b) = open.remove(&ns) {
                    self.seal_and_upload(&d, b);
                }
            }
            if self.draining.load(Ordering::Relaxed) && last_count.elapsed() >= DRAIN_COUNT_EVERY {
                last_count = Instant::now();
                // Every DRAM block without an S3 copy: queued, not yet checksummed (queued
                // once it is), packed in an open segment, or being uploaded. A scan of every
                // store, so not on every pass.
                let left: u64 = namespaces
                    .iter()
                    .map(|n| n.store.lock().without_s3_copy())
                    .sum();
                self.counters.drain_pending.store(left, Ordering::Relaxed);
                if left == 0 {
                    self.draining.store(false, Ordering::SeqCst);
                }
            }
            drop(namespaces);
            if idle {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    // --- listing, warm, reclaim --------------------------------------------------------------

    /// Reads a segment's trailer and index from the bucket.
    async fn fetch_index(
        &self,
        name: &str,
        size: u64,
    ) -> Result<(Trailer, Vec<Entry>, Vec<u8>), FetchIndexError> {
        let tail_len = size.min(TAIL_READ);
        let tail = self
            .bucket
            .get_range(name, size - tail_len, tail_len)
            .await?;
        let tr = segment::decode_trailer(&tail, size)?;
        let need = tr.index_len() + segment::TRAILER_BYTES;
        let blob = if need <= tail_len {
            tail[(tail_len - need) as usize..].to_vec()
        } else {
            let mut v = self
                .bucket
                .get_range(name, tr.index_offset, tr.index_len())
                .await?;
            v.extend_from_slice(&tail[(tail_len - segment::TRAILER_BYTES) as usize..]);
            v
        };
        let entries = segment::decode_index(&tr, &blob[..tr.index_len() as usize])?;
        Ok((tr, entries, blob))
    }

    /// Lists the bucket (or one namespace's prefix): learns segments not yet known, forgets
    /// known ones that are gone. Returns how many segments were learnt.
    pub async fn rescan(&self, only: Option<NamespaceId>) -> Result<u64, S3Error> {
        let prefix = only.map_or_else(|| self.root.clone(), |ns| self.ns_prefix(&ns));
        let started = crate::disk::unix_ms();
        let listed = self.bucket.list(&prefix).await?;
        let names: hashbrown::HashSet<&str> = listed.iter().map(|l| l.key.as_str()).collect();
        // Forget what is gone (deleted by its writer or a bucket lifecycle rule). Not segments
        // sealed shortly before the listing: an upload finishing while the listing ran may be
        // missing from it.
        {
            let mut st = self.state.lock();
            let gone: Vec<u32> = st
                .segs
                .iter()
                .filter(|(_, s)| {
                    s.name.starts_with(&prefix)
                        && !s.doomed
                        && s.created_ms + LISTING_SLACK_MS < started
                        && !names.contains(&*s.name)
                })
                .map(|(id, _)| *id)
                .collect();
            let forgotten = Self::doom(&mut st, &gone);
            drop(st);
            if let (Some(d), false) = (&self.disk, forgotten.is_empty()) {
                let refs: Vec<&str> = forgotten.iter().map(|(n, _)| &**n).collect();
                let _ = d.catalog().delete_segments(&refs);
            }
        }
        let unknown: Vec<&client::Listed> = {
            let st = self.state.lock();
            listed
                .iter()
                .filter(|l| {
                    !st.by_name.contains_key(l.key.as_str()) && self.parse_name(&l.key).is_some()
                })
                .collect()
        };
        let mut learnt = 0;
        for l in unknown {
            match self.fetch_index(&l.key, l.size).await {
                Ok((tr, entries, blob)) => {
                    if self.parse_name(&l.key).is_some_and(|(ns, _)| ns != tr.ns) {
                        tracing::warn!(segment = %l.key, "S3 tier: segment under another namespace's prefix; ignored");
                        continue;
                    }
                    self.register(&l.key, l.size, &tr, &entries);
                    if let Some(d) = &self.disk {
                        let _ = d.catalog().put_segment(&l.key, l.size, &blob);
                    }
                    learnt += 1;
                }
                Err(FetchIndexError::S3(e)) if !matches!(e, S3Error::NotFound(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, segment = %l.key, "S3 tier: segment index unreadable; ignored");
                }
            }
        }
        if only.is_none() {
            self.scanned.store(true, Ordering::SeqCst);
        }
        Ok(learnt)
    }

    /// Notes which tenant (a base) `ns` counts against.
    fn own(&self, ns: NamespaceId, tenant: &str) {
        let mut st = self.state.lock();
        if !st.owners.contains_key(&ns) {
            st.owners.insert(ns, Arc::from(tenant));
        }
    }

    /// Takes out of the index the segments this node wrote that are past
    /// `s3.max_age_secs`, beyond `s3.capacity_bytes` (oldest first), beyond their tenant's
    /// `s3.max_bytes_per_tenant` (its oldest first), or without a live block, and deletes
    /// those no read is using (the others go with their last reader). Returns how many
    /// objects it deleted now.
    pub async fn reclaim(self: &Arc<Self>) -> u64 {
        let now = crate::disk::unix_ms();
        let max_age_ms = self.cfg.max_age_secs.saturating_mul(1000);
        let budget = self.cfg.capacity_bytes.0;
        let deletable: Vec<Arc<str>> = {
            let mut st = self.state.lock();
            let mut ours: Vec<(u64, u32, u64, u32, NamespaceId)> = st
                .segs
                .iter()
                .filter(|(_, s)| s.ours && !s.doomed)
                .map(|(id, s)| (s.created_ms, *id, s.size, s.live, s.ns))
                .collect();
            ours.sort();
            let mut total = st.ours_bytes;
            let mut victims = Vec::new();
            let mut kept = Vec::new();
            for (created, id, size, live, ns) in ours {
                let old = max_age_ms > 0 && now.saturating_sub(created) > max_age_ms;
                let over = budget > 0 && total > budget;
                if old || over || live == 0 {
                    victims.push(id);
                    total = total.saturating_sub(size);
                } else {
                    kept.push((id, size, ns));
                }
            }
            victims.extend(Self::over_tenant_quota(
                &mut st,
                &kept,
                self.cfg.max_bytes_per_tenant.0,
            ));
            Self::doom(&mut st, &victims)
                .into_iter()
                .filter_map(|(name, now)| now.then_some(name))
                .collect()
        };
        let n = deletable.len() as u64;
        for name in deletable {
            self.delete_object(&name).await;
        }
        n
    }

    /// Background upkeep on the async runtime: checks the bucket (a clear log line when it
    /// is missing or the credentials are refused), lists it, then rescans and reclaims on
    /// their intervals, until `stop` fires.
    pub async fn maintain(self: Arc<Self>, stop: Arc<tokio::sync::Notify>) {
        let rescan_every = Duration::from_millis(u64::from(self.cfg.rescan_interval_ms));
        let mut last_scan: Option<Instant> = None;
        let mut checked = false;
        // The start check's error is logged when it first appears or changes, then at most
        // once a minute (it is in `kvd-ctl status` meanwhile).
        let mut logged: Option<(String, Instant)> = None;
        loop {
            if !checked && self.bucket.available() {
                match self.bucket.check().await {
                    Ok(()) => {
                        checked = true;
                        tracing::info!(
                            endpoint = self.bucket.endpoint(),
                            bucket = self.bucket.name(),
                            "S3 tier ready"
                        );
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        let again = logged.as_ref().is_some_and(|(m, t)| {
                            *m == msg && t.elapsed() < Duration::from_secs(60)
                        });
                        if !again {
                            tracing::error!(error = %msg, "S3 tier unavailable; DRAM and disk keep serving, S3 is retried");
                            logged = Some((msg, Instant::now()));
                        }
                    }
                }
            }
            let due =
                last_scan.is_none_or(|t| !rescan_every.is_zero() && t.elapsed() >= rescan_every);
            if checked && due && self.bucket.available() {
                match self.rescan(None).await {
                    Ok(n) => {
                        last_scan = Some(Instant::now());
                        if n > 0 {
                            tracing::info!(
                                segments = n,
                                "S3 tier: segments learnt from the bucket"
                            );
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "S3 tier: listing the bucket failed; retried")
                    }
                }
            }
            if checked && self.bucket.available() {
                self.reclaim().await;
            }
            tokio::select! {
                _ = stop.notified() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Starts a warm (`kvd-ctl warm`): lists the namespaces' prefixes for segments other
    /// nodes wrote, then reads into DRAM, newest segment first, blocks S3 holds that neither
    /// DRAM nor the disk does, as many as fit below the eviction low watermark (a warm never
    /// evicts). Returns how many blocks were queued.
    pub fn warm(
        self: &Arc<Self>,
        d: &Arc<Daemon>,
        namespaces: Vec<Arc<Namespace>>,
    ) -> Result<u64, String> {
        if self
            .warming
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(format!(
                "an S3 warm is already running ({} blocks left); wait for it",
                self.counters.warm_pending.load(Ordering::Relaxed)
            ));
        }
        let only = match namespaces.as_slice() {
            [one] => Some(one.id),
            _ => None,
        };
        let listed = tokio::task::block_in_place(|| self.rt.block_on(self.rescan(only)));
        if let Err(e) = listed {
            self.warming.store(false, Ordering::SeqCst);
            return Err(format!("cannot list the segments in S3: {e}"));
        }
        let low = d.cfg.dram.low_watermark;
        let mut plan: Vec<(Arc<Namespace>, Vec<BlockKey>)> = Vec::new();
        for ns in namespaces {
            let candidates = self.keys_by_recency(&ns.id);
            let ks: Vec<BlockKey> = candidates.iter().map(|(k, _)| *k).collect();
            let on_disk = d
                .disk
                .as_ref()
                .map(|disk| disk.presence(&ns.id, &ks))
                .unwrap_or_default();
            let only_in_s3 = candidates
                .into_iter()
                .enumerate()
                .filter(|(i, _)| !on_disk.get(*i).copied().unwrap_or(false))
                .map(|(_, c)| c);
            let keys = ns.store.lock().fit_below(low, only_in_s3);
            if !keys.is_empty() {
                plan.push((ns, keys));
            }
        }
        let total: u64 = plan.iter().map(|(_, k)| k.len() as u64).sum();
        self.counters.warm_pending.store(total, Ordering::Relaxed);
        let (me, d) = (self.clone(), Arc::downgrade(d));
        self.rt.spawn(async move {
            let t = Instant::now();
            let mut warmed = 0;
            'all: for (ns, keys) in plan {
                for chunk in keys.chunks(256) {
                    let Some(now) = d
                        .upgrade()
                        .filter(|d| !d.is_shutting_down())
                        .map(|d| d.now_ms())
                    else {
                        break 'all;
                    };
                    let reads = me.plan(&ns.id, chunk, false);
                    let n = me.read_plan(&ns, reads, now, Fill::Warm).await;
                    warmed += n;
                    me.counters.warmed.fetch_add(n, Ordering::Relaxed);
                    me.counters
                        .warm_pending
                        .fetch_sub(chunk.len() as u64, Ordering::Relaxed);
                }
            }
            me.counters.warm_pending.store(0, Ordering::Relaxed);
            me.warming.store(false, Ordering::SeqCst);
            tracing::info!(
                warmed,
                asked = total,
                ms = t.elapsed().as_millis() as u64,
                "S3 warm finished"
            );
        });
        Ok(total)
    }

    /// Whether a warm is running.
    pub fn is_warming(&self) -> bool {
        self.warming.load(Ordering::SeqCst)
    }

    /// The tier's state for `stats`.
    pub fn report(&self) -> S3Report {
        let (blocks, segments, bytes) = self.sizes();
        let (state, opened) = self.bucket.breaker();
        let c = &self.counters;
        let r = &self.bucket.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        S3Report {
            endpoint: self.bucket.endpoint().to_owned(),
            bucket: self.bucket.name().to_owned(),
            degraded: state != breaker::BreakerState::Closed,
            scanned: self.scanned.load(Ordering::SeqCst),
            blocks,
            segments,
            bytes,
            uploaded_segments: load(&c.uploaded_segments),
            uploaded_blocks: load(&c.uploaded_blocks),
            uploaded_bytes: load(&c.uploaded_bytes),
            upload_failures: load(&c.upload_failures),
            read_blocks: load(&c.read_blocks),
            read_bytes: load(&c.read_bytes),
            read_failures: load(&c.read_failures),
            corrupt: load(&c.corrupt),
            deleted_segments: load(&c.deleted_segments),
            requests: load(&r.requests),
            retries: load(&r.retries),
            failures: load(&r.failures),
            short_circuited: load(&r.short_circuited),
            breaker_opened: opened,
            uploading: load(&c.uploading),
            drain_pending: load(&c.drain_pending),
            warm_pending: load(&c.warm_pending),
            warmed: load(&c.warmed),
            last_error: self
                .bucket
                .last_error()
                .map(|(ago, e)| format!("{e} ({}s ago)", ago.as_secs()))
                .unwrap_or_default(),
        }
    }
}

/// A lookup through every tier: DRAM and disk, then peers (when peer fetch is on), then S3
/// for what is still missing from the prefix. Blocks read from S3 are counted in its tier.
pub async fn lookup(
    daemon: &Arc<Daemon>,
    ns: &Arc<Namespace>,
    keys: &[BlockKey],
) -> (u32, TierCounts) {
    let (prefix, tiers) = crate::peer::lookup(daemon, ns, keys).await;
    let Some(s3) = &daemon.s3 else {
        return (prefix, tiers);
    };
    let rest = &keys[(prefix as usize).min(keys.len())..];
    let read = s3.fetch_prefix(ns, rest, daemon.now_ms()).await;
    if read == 0 {
        return (prefix, tiers);
    }
    let (after, mut t) = daemon.lookup(ns, keys);
    let from_s3 = u32::try_from(read)
        .unwrap_or(u32::MAX)
        .min(after.saturating_sub(prefix));
    t.0[Tier::Dram as usize] = t.0[Tier::Dram as usize].saturating_sub(from_s3);
    t.0[Tier::S3 as usize] = t.0[Tier::S3 as usize].saturating_add(from_s3);
    (after, t)
}

/// What blocks read from S3 are for.
#[derive(Debug, Clone, Copy)]
enum Fill<'a> {
    /// A lookup waits for them (counted in the given counter); DRAM may evict for them.
    Lookup(&'a AtomicU64),
    /// A warm: only free DRAM is used.
    Warm,
}

/// Why a block read from S3 did not produce a block.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    S3(S3Error),
    #[error("bytes do not match the block's checksum")]
    Corrupt,
    #[error("no room in DRAM")]
    NoRoom,
}

/// Why a segment's index could not be read.
#[derive(Debug, thiserror::Error)]
enum FetchIndexError {
    #[error(transparent)]
    S3(#[from] S3Error),
    #[error(transparent)]
    Segment(#[from] SegmentError),
}

/// Decodes a catalog record's trailer-and-index bytes of an object of `size` bytes.
fn decode_blob(blob: &[u8], size: u64) -> Result<(Trailer, Vec<Entry>), SegmentError> {
    let tr = segment::decode_trailer(blob, size)?;
    let n = tr.index_len() as usize;
    if blob.len() != n + segment::TRAILER_BYTES as usize {
        return Err(SegmentError::Truncated {
            need: n as u64 + segment::TRAILER_BYTES,
            have: blob.len() as u64,
        });
    }
    let entries = segment::decode_index(&tr, &blob[..n])?;
    Ok((tr, entries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ByteSize;

    /// The tier needs a multi-threaded runtime (as kvd's own).
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    fn tier(rt: &tokio::runtime::Runtime) -> Arc<S3Tier> {
        tier_with(rt, |_| {})
    }

    /// [`tier`], its configuration changed by `f` first.
    fn tier_with(rt: &tokio::runtime::Runtime, f: impl FnOnce(&mut Config)) -> Arc<S3Tier> {
        let mut cfg = Config::default();
        cfg.s3.bucket = "unit".into();
        // Nothing listens there: requests fail at once (none is needed by these tests).
        cfg.s3.endpoint = "http://127.0.0.1:9".into();
        cfg.s3.access_key_id = "id".into();
        cfg.s3.secret_access_key = crate::config::Secret::new("secret");
        cfg.s3.max_age_secs = 1;
        cfg.s3.capacity_bytes = ByteSize(0);
        cfg.index.node_id = "me".into();
        f(&mut cfg);
        rt.block_on(async { S3Tier::open(&cfg, None) })
            .expect("open")
    }

    fn add(t: &S3Tier, node: &str, created_ms: u64, keys: &[u8]) -> String {
        add_to(t, NamespaceId([3; 16]), node, created_ms, keys)
    }

    /// [`add`] for a segment of `ns`.
    fn add_to(t: &S3Tier, ns: NamespaceId, node: &str, created_ms: u64, keys: &[u8]) -> String {
        let name = format!(
            "{}{created_ms:013}-{node}-{:016x}.kseg",
            t.ns_prefix(&ns),
            7
        );
        let entries: Vec<Entry> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| Entry {
                key: BlockKey([*k; 32]),
                offset: i as u64 * 100,
                len: 100,
                checksum: 0,
            })
            .collect();
        let tr = Trailer {
            count: entries.len() as u32,
            ns,
            index_offset: 100 * entries.len() as u64,
            created_ms,
            index_checksum: 0,
        };
        t.register(&name, tr.object_len(), &tr, &entries);
        name
    }

    #[test]
    fn a_segment_being_read_is_deleted_only_after_its_last_reader() {
        let rt = runtime();
        let t = tier(&rt);
        let ns = NamespaceId([3; 16]);
        let old = add(&t, "me", 1, &[1, 2]);
        let theirs = add(&t, "other-node", 1, &[3]);
        assert!(t
            .parse_name(&old)
            .is_some_and(|(n, w)| n == ns && w == "me"));
        assert_eq!(
            t.prefix_len(&ns, &[BlockKey([1; 32]), BlockKey([2; 32])]),
            2
        );
        // A read in flight on the old segment.
        let reading = t.plan(&ns, &[BlockKey([1; 32])], true);
        assert_eq!(reading.len(), 1);
        let doomed = rt.block_on(t.reclaim());
        assert_eq!(doomed, 0, "no object deleted while a read is in flight");
        // Out of the index at once: no new reader finds it.
        assert!(!t.contains(&ns, &BlockKey([2; 32])));
        assert!(t.state.lock().by_name.contains_key(old.as_str()));
        // Another node's segment is never reclaimed here, however old.
        assert!(t.contains(&ns, &BlockKey([3; 32])));
        assert!(t.state.lock().by_name.contains_key(theirs.as_str()));
        drop(reading);
        assert!(
            !t.state.lock().by_name.contains_key(old.as_str()),
            "the last reader gone, the segment goes"
        );
    }

    /// A tenant beyond `s3.max_bytes_per_tenant` loses its oldest segments; another tenant
    /// and namespaces of unknown tenant keep theirs.
    #[test]
    fn a_tenant_over_its_share_loses_its_oldest_segments_only() {
        let rt = runtime();
        // Every segment below holds one 100-byte block: room for two per tenant.
        let one = Trailer {
            count: 1,
            ns: NamespaceId([0; 16]),
            index_offset: 100,
            created_ms: 0,
            index_checksum: 0,
        }
        .object_len();
        let t = tier_with(&rt, |c| c.s3.max_bytes_per_tenant = ByteSize(2 * one));
        let (a, a2, b, c) = (
            NamespaceId([1; 16]),
            NamespaceId([2; 16]),
            NamespaceId([4; 16]),
            NamespaceId([5; 16]),
        );
        let now = crate::disk::unix_ms();
        let seg = add_to(&t, a, "me", now, &[1]);
        t.own(a, "acme");
        t.own(a2, "acme");
        t.own(b, "beta");
        add_to(&t, a2, "me", now + 1, &[2]);
        add_to(&t, a, "me", now + 2, &[3]);
        for i in 0..3 {
            add_to(&t, b, "me", now + i, &[10 + i as u8]);
            add_to(&t, c, "me", now + i, &[20 + i as u8]);
        }
        add_to(&t, a, "other-node", now, &[30]);
        assert_eq!(rt.block_on(t.reclaim()), 2, "acme's oldest, beta's oldest");
        assert!(!t.state.lock().by_name.contains_key(seg.as_str()));
        for (ns, k, kept) in [
            (a, 1, false),
            (a2, 2, true),
            (a, 3, true),
            (b, 10, false),
            (b, 11, true),
            (c, 20, true),
            (a, 30, true),
        ] {
            assert_eq!(t.contains(&ns, &BlockKey([k; 32])), kept, "block {k}");
        }
    }

    #[test]
    fn a_key_in_two_segments_keeps_its_first_place_and_deletes_count() {
        let rt = runtime();
        let t = tier(&rt);
        let ns = NamespaceId([3; 16]);
        let now = crate::disk::unix_ms();
        add(&t, "me", now, &[5, 6]);
        add(&t, "me", now + 1, &[6, 7]);
        {
            let st = t.state.lock();
            let live: Vec<u32> = {
                let mut v: Vec<(u64, u32)> =
                    st.segs.values().map(|s| (s.created_ms, s.live)).collect();
                v.sort();
                v.into_iter().map(|(_, l)| l).collect()
            };
            assert_eq!(live, vec![2, 1]);
        }
        assert_eq!(t.delete(&ns, &[BlockKey([7; 32]), BlockKey([9; 32])]), 1);
        // The second segment has no live block left: reclaimed although young.
        assert_eq!(rt.block_on(t.reclaim()), 1);
        assert_eq!(t.sizes().1, 1);
        assert!(t.contains(&ns, &BlockKey([6; 32])));
    }
}
