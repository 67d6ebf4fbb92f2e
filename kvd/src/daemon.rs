//! Daemon-wide state shared by the control server and the ring threads.
//!
//! [`Daemon`] owns the namespace registry (each [`Namespace`] binds one arena from the pool
//! created at start, plus its [`NsStore`] behind a mutex) and the table of connected clients.
//! Control-plane operations that touch blocks are methods here so the socket server stays a
//! thin codec layer; authorisation (is this namespace open on the connection, is the peer an
//! admin) is decided here too, in one place.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kvd_proto::frame::{
    BlockInfo, ClientInfo, ErrorCode, NamespaceStats, StatsReport, TierCounts, TierStats,
};
use std::thread::JoinHandle;

use crate::demoter::DrainSet;
use crate::disk::engine::RegisterError;
use crate::disk::{DiskError, DiskTier, ReadOutcome};
use crate::store::ReserveError;
use kvd_proto::{BlockKey, NamespaceDesc, NamespaceId, Tier};
use kvd_shm::ring::RingWaker;
use parking_lot::{Mutex, RwLock};
use twox_hash::XxHash3_64;

use crate::alloc::SlabAllocator;
use crate::arena::{Arena, ArenaError};
use crate::config::Config;
use crate::store::NsStore;

/// Version string reported to clients.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A failed control operation, sent back as [`kvd_proto::Response::Error`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct OpError {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// What went wrong and what to do.
    pub message: String,
}

impl OpError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// An open namespace: its arena and catalog.
#[derive(Debug)]
pub struct Namespace {
    /// Id.
    pub id: NamespaceId,
    /// Descriptor.
    pub desc: NamespaceDesc,
    /// Shared memory.
    pub arena: Arena,
    /// Catalog.
    pub store: Mutex<NsStore>,
    /// Connections that have it open.
    pub open: AtomicU32,
    /// The uid that bound it to an arena.
    pub owner_uid: u32,
}

/// A reserved DRAM slot that is given back unless committed (a block being fetched from a
/// peer or read from S3: dropping the transfer mid-way frees the slot).
#[derive(Debug)]
pub struct Reservation {
    ns: Arc<Namespace>,
    slot: Option<crate::alloc::Slot>,
}

impl Reservation {
    /// Guards `slot`, reserved in `ns`.
    pub fn new(ns: Arc<Namespace>, slot: crate::alloc::Slot) -> Self {
        Self {
            ns,
            slot: Some(slot),
        }
    }

    /// Publishes the slot as `key`, verified against `checksum` by the caller. False when
    /// the key was stored meanwhile (the slot is freed).
    pub fn commit_verified(self, key: &BlockKey, len: u64, checksum: u64, now_ms: u64) -> bool {
        self.commit_with(|st, s| st.commit_verified(key, s, len, checksum, now_ms))
    }

    /// As [`commit_verified`](Self::commit_verified), for bytes read from S3 (the block is
    /// known to be there).
    pub fn commit_from_s3(self, key: &BlockKey, len: u64, checksum: u64, now_ms: u64) -> bool {
        self.commit_with(|st, s| st.commit_from_s3(key, s, len, checksum, now_ms))
    }

    fn commit_with(mut self, f: impl FnOnce(&mut NsStore, crate::alloc::Slot) -> bool) -> bool {
        match self.slot.take() {
            Some(s) => f(&mut self.ns.store.lock(), s),
            None => false,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(s) = self.slot.take() {
            self.ns.store.lock().abort(s);
        }
    }
}

/// One client connection's shared state.
#[derive(Debug)]
pub struct Conn {
    /// Connection id.
    pub id: u64,
    /// Name from `Hello`.
    pub name: Mutex<String>,
    /// Peer pid.
    pub pid: u32,
    /// Peer uid.
    pub uid: u32,
    /// Peer (primary) gid.
    pub gid: u32,
    /// Admin rights granted.
    pub admin: AtomicBool,
    /// Namespaces opened, indexed by handle.
    pub handles: RwLock<Vec<Arc<Namespace>>>,
    /// Set when the connection is going away; the ring thread stops.
    pub closed: AtomicBool,
    /// Fired by the ring thread to make the control task drop a misbehaving client.
    pub kick: tokio::sync::Notify,
    /// Ring operations completed.
    pub ops: AtomicU64,
    /// Wakes the ring thread.
    pub waker: Mutex<Option<RingWaker>>,
}

impl Conn {
    /// Marks the connection closed and wakes everything waiting on it.
    pub fn shut(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.kick.notify_one();
        if let Some(w) = self.waker.lock().as_ref() {
            w.wake();
        }
    }
}

/// Opens the GPU backend (if configured) and pins every arena for DMA, each in parallel
/// pieces on allocator chunk boundaries; logs what it took.
fn pin_arenas(cfg: &Config, arenas: &mut [Arena]) -> Result<Option<crate::gpu::Gpu>, StartError> {
    let Some(backend) = crate::gpu::open(&cfg.gpu)? else {
        return Ok(None);
    };
    let mut gpu = crate::gpu::Gpu {
        backend: backend.clone(),
        pinned_bytes: 0,
        pin_time: std::time::Duration::ZERO,
        counters: Default::default(),
        pool: None,
    };
    if cfg.gpu.pool_bytes.0 > 0 {
        let p = crate::gpu::pool::Pool::new(
            backend.clone(),
            cfg.gpu.pool_bytes.0,
            cfg.dram.max_block_bytes.0,
        )
        .map_err(StartError::GpuPool)?;
        tracing::info!(
            backend = %backend.name(),
            bytes = cfg.gpu.pool_bytes.0,
            "GPU block pool (T0) allocated"
        );
        gpu.pool = Some(Arc::new(p));
    }
    if cfg.gpu.pin_arenas {
        let chunk = pin_chunk(cfg);
        let t = Instant::now();
        let mut pieces = 0;
        for a in arenas.iter_mut() {
            let r = a.pin_for_gpu(backend.clone(), chunk, cfg.gpu.pin_threads as usize)?;
            gpu.pinned_bytes += r.bytes as u64;
            pieces += r.chunks;
        }
        gpu.pin_time = t.elapsed();
        tracing::info!(
            backend = %backend.name(),
            arenas = arenas.len(),
            bytes = gpu.pinned_bytes,
            pieces,
            threads = cfg.gpu.pin_threads,
            elapsed_ms = gpu.pin_time.as_millis() as u64,
            "DRAM arenas pinned for GPU DMA"
        );
    } else {
        tracing::info!(backend = %backend.name(), "GPU backend open; arenas not pinned (gpu.pin_arenas)");
    }
    Ok(Some(gpu))
}

/// Bytes of one pinning call for this configuration's arenas.
fn pin_chunk(cfg: &Config) -> u64 {
    crate::gpu::pin_chunk(
        cfg.gpu.pin_chunk_bytes.0,
        crate::alloc::chunk_bytes_for(cfg.dram.max_block_bytes.0),
    )
}

/// Registers arenas with the disk tier's IO engine (pinned once, so disk IOs skip pinning
/// pages each time). Only pre-faulted arenas: registering faults every page in. Where the
/// engine cannot, IOs take the plain path; that is logged once per process.
fn register_arenas(cfg: &Config, disk: &DiskTier, arenas: &mut [Arena]) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !cfg.dram.prefault || arenas.is_empty() {
        return;
    }
    let t = Instant::now();
    for a in arenas.iter_mut() {
        if let Err(e) = a.register_io(disk.engine()) {
            if !WARNED.swap(true, Ordering::Relaxed) {
                match e {
                    RegisterError::Unsupported(_) => tracing::info!("{e}"),
                    RegisterError::Refused { .. } => tracing::warn!(
                        error = %e,
                        "disk IOs pin arena pages on every IO (slower); allow registration \
                         with CAP_IPC_LOCK or a larger RLIMIT_MEMLOCK (ulimit -l)"
                    ),
                    _ => tracing::warn!(error = %e, "disk IOs pin arena pages on every IO"),
                }
            }
            return;
        }
    }
    tracing::info!(
        arenas = arenas.len(),
        elapsed_ms = t.elapsed().as_millis() as u64,
        "arenas registered with the disk IO engine"
    );
}

#[derive(Debug, Default)]
struct Registry {
    by_id: HashMap<NamespaceId, Arc<Namespace>>,
    pool: Vec<Arena>,
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The DRAM arenas could not be created.
    #[error("cannot create the DRAM arenas")]
    Arena(#[from] ArenaError),
    /// The disk tier could not be opened.
    #[error("cannot open the disk tier")]
    Disk(#[from] DiskError),
    /// The GPU backend could not be opened or the arenas not pinned.
    #[error("cannot start the GPU tier (gpu.backend)")]
    Gpu(#[from] kvd_gpu::GpuError),
    /// The GPU block pool could not be allocated.
    #[error("cannot allocate the GPU block pool (gpu.pool_bytes)")]
    GpuPool(#[source] kvd_gpu::GpuError),
    /// The peer data port's TLS identity could not be loaded.
    #[error(
        "cannot set up mutual TLS on the peer data port (peer.tls_cert, peer.tls_key, \
         peer.tls_ca; see docs/security.md; peer.tls = \"off\" only on a network nobody else \
         can reach)"
    )]
    PeerTls(#[from] crate::peer::tls::TlsError),
    /// The S3 tier could not be set up.
    #[error("cannot start the S3 tier")]
    S3(#[from] crate::s3::S3StartError),
    /// A background thread could not be started.
    #[error("cannot start the {what} thread")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The daemon.
#[derive(Debug)]
pub struct Daemon {
    /// Validated configuration.
    pub cfg: Config,
    /// The disk tier, when configured.
    pub disk: Option<Arc<DiskTier>>,
    /// Lookups in the cluster index, when one is configured.
    pub index: Option<Arc<crate::index::IndexReader>>,
    /// KV events (lineages and publisher state), when configured.
    pub events: Option<Arc<crate::events::Events>>,
    /// Peer fetch (data port and fetcher), when configured.
    pub peer: Option<Arc<crate::peer::Peer>>,
    /// The GPU backend and the arenas' pinning, when configured.
    pub gpu: Option<crate::gpu::Gpu>,
    /// The S3 tier, when configured.
    pub s3: Option<Arc<crate::s3::S3Tier>>,
    /// Latency histograms of the operations served (for `/metrics`).
    pub latency: crate::metrics::OpLatency,
    drains: Arc<Mutex<DrainSet>>,
    /// Whether a warm thread runs (one at a time).
    warming: AtomicBool,
    demoter: Mutex<Option<JoinHandle<()>>>,
    uploader: Mutex<Option<JoinHandle<()>>>,
    start: Instant,
    registry: Mutex<Registry>,
    clients: Mutex<HashMap<u64, Arc<Conn>>>,
    next_client: AtomicU64,
    shutting_down: AtomicBool,
    /// The background threads stop (set after the shutdown drain).
    stopping: AtomicBool,
    euid: u32,
    tenancy: crate::tenancy::Tenancy,
    /// Residency changes of namespaces retired before they were published.
    orphans: Mutex<Vec<crate::residency::Change>>,
}

impl Daemon {
    /// Creates the arena pool and an empty registry, opens the disk tier (if configured) and
    /// starts its demotion thread.
    pub fn new(cfg: Config) -> Result<Arc<Daemon>, StartError> {
        let mut pool = Arena::create_pool(&cfg.dram, cfg.dram.max_namespaces)?;
        let gpu = pin_arenas(&cfg, &mut pool)?;
        let disk = if cfg.disk.capacity_bytes.0 > 0 {
            Some(Arc::new(DiskTier::open(&cfg.disk)?))
        } else {
            None
        };
        if let Some(disk) = &disk {
            register_arenas(&cfg, disk, &mut pool);
            if cfg.publishes_residency() {
                disk.record_changes(cfg.index.journal_changes as usize);
            }
        }
        let drains = Arc::new(Mutex::new(DrainSet::default()));
        let cfg_tenants = cfg.server.tenants.clone();
        let index = crate::index::IndexReader::new(&cfg.index).map(Arc::new);
        let events = crate::events::Events::new(&cfg.events).map(Arc::new);
        let peer =
            crate::peer::Peer::new(&cfg.peer, &crate::index::node_id(&cfg.index))?.map(Arc::new);
        let s3 = if cfg.s3.enabled() {
            Some(crate::s3::S3Tier::open(&cfg, disk.clone())?)
        } else {
            None
        };
        let d = Arc::new(Daemon {
            cfg,
            disk: disk.clone(),
            index,
            events,
            peer,
            gpu,
            s3: s3.clone(),
            latency: Default::default(),
            drains: drains.clone(),
            warming: AtomicBool::new(false),
            demoter: Mutex::new(None),
            uploader: Mutex::new(None),
            start: Instant::now(),
            registry: Mutex::new(Registry {
                by_id: HashMap::new(),
                pool,
            }),
            clients: Mutex::new(HashMap::new()),
            next_client: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            euid: nix::unistd::geteuid().as_raw(),
            tenancy: crate::tenancy::Tenancy::new(cfg_tenants),
            orphans: Mutex::new(Vec::new()),
        });
        if let Some(disk) = disk {
            let weak = Arc::downgrade(&d);
            let t = std::thread::Builder::new()
                .name("kvd-demote".into())
                .spawn(move || crate::demoter::run(weak, disk, drains))
                .map_err(|source| StartError::Thread {
                    what: "demotion",
                    source,
                })?;
            *d.demoter.lock() = Some(t);
        }
        if let Some(s3) = s3 {
            let weak = Arc::downgrade(&d);
            let t = std::thread::Builder::new()
                .name("kvd-s3-upload".into())
                .spawn(move || s3.run_uploader(weak))
                .map_err(|source| StartError::Thread {
                    what: "S3 upload",
                    source,
                })?;
            *d.uploader.lock() = Some(t);
        }
        Ok(d)
    }

    /// Records a sighting of a block for the admission filters of the disk and S3 tiers.
    pub fn record_sighting(&self, ns: &NamespaceId, key: &BlockKey) {
        if let Some(d) = &self.disk {
            d.record_sighting(ns, key);
        }
        if let Some(s) = &self.s3 {
            s.record_sighting(ns, key);
        }
    }

    /// Stops the background threads (after [`begin_shutdown`](Self::begin_shutdown)) and
    /// flushes the disk catalog.
    pub fn stop_background(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(t) = self.demoter.lock().take() {
            let _ = t.join();
        }
        if let Some(t) = self.uploader.lock().take() {
            let _ = t.join();
        }
        if let Some(disk) = &self.disk {
            disk.flush();
        }
    }

    /// Queues a drain of one namespace (or all) to disk; returns how many DRAM blocks have no
    /// disk copy yet.
    pub fn drain(&self, only: Option<NamespaceId>) -> Result<u64, OpError> {
        if self.disk.is_none() && self.s3.is_none() {
            return Err(OpError::new(
                ErrorCode::BadRequest,
                "no disk or S3 tier is configured (disk.capacity_bytes = 0, s3.bucket empty): \
                 nothing to drain to",
            ));
        }
        let namespaces: Vec<Arc<Namespace>> = self
            .namespaces()
            .into_iter()
            .filter(|ns| only.is_none_or(|o| o == ns.id))
            .collect();
        let mut n = 0;
        if let Some(disk) = &self.disk {
            let d: u64 = namespaces
                .iter()
                .map(|ns| ns.store.lock().without_disk_copy())
                .sum();
            disk.drain_pending().store(d, Ordering::Relaxed);
            self.drains.lock().add(only);
            // The demoter starts at once instead of at its next pass.
            if let Some(t) = self.demoter.lock().as_ref() {
                t.thread().unpark();
            }
            n += d;
        }
        if let Some(s3) = &self.s3 {
            n += s3.drain(&namespaces);
        }
        Ok(n)
    }

    /// Reads a disk-only block into DRAM (verified, as a local GET would) and leases it
    /// (release the lease with the store's `release`). Blocking: a pread of the block. With
    /// `may_evict` false, only free DRAM is used.
    pub fn read_into_dram(
        &self,
        ns: &Arc<Namespace>,
        key: &BlockKey,
        may_evict: bool,
    ) -> Option<crate::store::Hit> {
        use std::os::unix::fs::FileExt;
        let disk = self.disk.as_ref()?;
        let ticket = disk.begin_read(&ns.id, key)?;
        let reserved = if may_evict {
            ns.store.lock().reserve(key, ticket.len)
        } else {
            ns.store.lock().reserve_without_evicting(key, ticket.len)
        };
        let slot = match reserved {
            Ok(s) => s,
            Err(e) => {
                disk.end_read(&ns.id, key, &ticket, ReadOutcome::Abandoned);
                return match e {
                    ReserveError::Exists => ns.store.lock().get(key, self.now_ms()),
                    _ => None,
                };
            }
        };
        // Whole 4 KiB units, as O_DIRECT wants (slots are 4 KiB-aligned multiples of 4 KiB).
        let len = crate::disk::format::align_up(ticket.len);
        // SAFETY: the slot is reserved by this thread and not committed, so nobody else touches
        // it until it is promoted or aborted below; `ns` keeps the arena mapped.
        let buf = (len <= slot.cap)
            .then(|| unsafe { ns.arena.slot_mut(slot.offset, len) })
            .flatten();
        let Some(buf) = buf else {
            ns.store.lock().abort(slot);
            disk.end_read(&ns.id, key, &ticket, ReadOutcome::Abandoned);
            return None;
        };
        let outcome = match ticket.file.read_exact_at(buf, ticket.offset) {
            Err(e) => {
                tracing::warn!(error = %e, "disk read into DRAM failed");
                ReadOutcome::Failed
            }
            Ok(()) => {
                let mut h = XxHash3_64::new();
                if ns.arena.hash_range(&mut h, slot.offset, ticket.len)
                    && std::hash::Hasher::finish(&h) == ticket.checksum
                {
                    ReadOutcome::Verified
                } else {
                    ReadOutcome::Corrupt
                }
            }
        };
        let current = disk.end_read(&ns.id, key, &ticket, outcome);
        if outcome != ReadOutcome::Verified || !current {
            ns.store.lock().abort(slot);
            return None;
        }
        ns.store
            .lock()
            .promote(key, slot, ticket.len, ticket.checksum, self.now_ms())
    }

    /// Queues a warm: blocks of the open namespaces (or one) held only on disk are read back
    /// into DRAM on a background thread, most recently used first, as many as fit below each
    /// namespace's eviction low watermark (a warm never evicts to make room). Returns how
    /// many blocks were queued.
    pub fn warm(self: &Arc<Self>, only: Option<NamespaceId>) -> Result<u64, OpError> {
        if self.disk.is_none() && self.s3.is_none() {
            return Err(OpError::new(
                ErrorCode::BadRequest,
                "no disk or S3 tier is configured (disk.capacity_bytes = 0, s3.bucket empty): \
                 nothing to warm from",
            ));
        }
        let namespaces: Vec<Arc<Namespace>> = self
            .namespaces()
            .into_iter()
            .filter(|ns| only.is_none_or(|o| o == ns.id))
            .collect();
        if let (Some(o), true) = (only, namespaces.is_empty()) {
            return Err(OpError::new(
                ErrorCode::UnknownNamespace,
                format!(
                    "namespace {o} is not open in DRAM: it gets an arena when an engine opens \
                    it; warm it after that"
                ),
            ));
        }
        // Disk first (its blocks are cheaper to read); S3 then skips what the disk holds.
        let from_disk = match &self.disk {
            Some(disk) => self.warm_disk(disk, namespaces.clone())?,
            None => 0,
        };
        let from_s3 = match &self.s3 {
            Some(s3) => s3
                .warm(self, namespaces)
                .map_err(|e| OpError::new(ErrorCode::BadRequest, e))?,
            None => 0,
        };
        Ok(from_disk + from_s3)
    }

    fn warm_disk(
        self: &Arc<Self>,
        disk: &Arc<DiskTier>,
        namespaces: Vec<Arc<Namespace>>,
    ) -> Result<u64, OpError> {
        if self
            .warming
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            let left = disk.warm_counters().0.load(Ordering::Relaxed);
            return Err(OpError::new(
                ErrorCode::BadRequest,
                format!("a warm is already running ({left} blocks left); wait for it"),
            ));
        }
        let low = self.cfg.dram.low_watermark;
        let mut plan: Vec<(Arc<Namespace>, Vec<BlockKey>)> = Vec::new();
        for ns in namespaces {
            let on_disk = disk.blocks_by_recency(&ns.id);
            let keys = ns.store.lock().fit_below(low, on_disk);
            if !keys.is_empty() {
                plan.push((ns, keys));
            }
        }
        let total: u64 = plan.iter().map(|(_, k)| k.len() as u64).sum();
        let (pending, _) = disk.warm_counters();
        pending.store(total, Ordering::Relaxed);
        if total == 0 {
            self.warming.store(false, Ordering::SeqCst);
            return Ok(0);
        }
        let d = self.clone();
        let spawned = std::thread::Builder::new()
            .name("kvd-warm".into())
            .spawn(move || d.run_warm(plan));
        if let Err(e) = spawned {
            pending.store(0, Ordering::Relaxed);
            self.warming.store(false, Ordering::SeqCst);
            return Err(OpError::new(
                ErrorCode::Internal,
                format!("could not start the warm thread: {e}"),
            ));
        }
        Ok(total)
    }

    /// The warm thread: reads each planned block into DRAM (verified) and lets it go at once,
    /// so it stays as an ordinary cached block. Stops early when kvd shuts down.
    fn run_warm(&self, plan: Vec<(Arc<Namespace>, Vec<BlockKey>)>) {
        let Some(disk) = &self.disk else {
            return;
        };
        let (pending, warmed) = disk.warm_counters();
        let t = Instant::now();
        let (mut done, mut missed) = (0u64, 0u64);
        'all: for (ns, keys) in plan {
            for key in keys {
                if self.is_shutting_down() {
                    break 'all;
                }
                match self.read_into_dram(&ns, &key, false) {
                    Some(hit) => {
                        ns.store.lock().release(hit.entry);
                        warmed.fetch_add(1, Ordering::Relaxed);
                        done += 1;
                    }
                    // Reclaimed, deleted or corrupt meanwhile (counted by the disk tier), or
                    // DRAM full of pinned or leased blocks.
                    None => missed += 1,
                }
                pending.fetch_sub(1, Ordering::Relaxed);
            }
        }
        pending.store(0, Ordering::Relaxed);
        self.warming.store(false, Ordering::SeqCst);
        tracing::info!(
            warmed = done,
            missed,
            ms = t.elapsed().as_millis() as u64,
            "warm finished"
        );
    }

    /// Deletes blocks from every tier; returns how many keys any tier held.
    pub fn delete(&self, ns: &Namespace, keys: &[BlockKey]) -> u32 {
        if let Some(p) = self.gpu.as_ref().and_then(|g| g.pool.as_ref()) {
            p.remove(ns.id, keys);
        }
        let on_disk = self
            .disk
            .as_ref()
            .map(|d| d.delete(&ns.id, keys))
            .unwrap_or_default();
        // The S3 index forgets them (other nodes' indexes may still name them until their
        // segments go: content-addressed keys name the same bytes everywhere).
        let in_s3: Vec<bool> = match &self.s3 {
            Some(s) => keys
                .iter()
                .map(|k| s.delete(&ns.id, std::slice::from_ref(k)) > 0)
                .collect(),
            None => Vec::new(),
        };
        let mut st = ns.store.lock();
        let mut n = 0;
        for (i, k) in keys.iter().enumerate() {
            let dram = st.delete(std::slice::from_ref(k)) > 0;
            if dram
                || on_disk.get(i).copied().unwrap_or(false)
                || in_s3.get(i).copied().unwrap_or(false)
            {
                n += 1;
            }
        }
        n
    }

    /// Milliseconds since start (the store's clock).
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether shutdown began.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Whether the background threads must stop (after the shutdown drain).
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The shutdown drain: every DRAM block without a disk copy is written to the disk
    /// tier, and every one without an S3 copy uploaded (open segments included), waiting at
    /// most `deadline`. Returns (queued, left unwritten); nothing without a disk or S3 tier.
    pub async fn drain_for_shutdown(&self, deadline: std::time::Duration) -> (u64, u64) {
        if deadline.is_zero() {
            return (0, 0);
        }
        let Ok(n) = self.drain(None) else {
            return (0, 0);
        };
        let t = Instant::now();
        // The demoter clears the drain set once every block has a disk copy, the S3 uploader
        // its drain flag once every block is uploaded, and both keep their pending counts up
        // to date meanwhile (no scan of the stores here).
        let busy = || {
            (self.disk.is_some() && !self.drains.lock().is_empty())
                || self.s3.as_ref().is_some_and(|s| s.is_draining())
        };
        while n > 0 && t.elapsed() < deadline && busy() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let mut left = 0;
        if let (Some(disk), false) = (&self.disk, self.drains.lock().is_empty()) {
            left += disk.drain_pending().load(Ordering::Relaxed);
        }
        if let Some(s3) = self.s3.as_ref().filter(|s| s.is_draining()) {
            left += s3.counters.drain_pending.load(Ordering::Relaxed);
        }
        (n, left)
    }

    /// Begins shutdown: every connection is closed.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        for c in self.clients.lock().values() {
            c.shut();
        }
    }

    /// Whether a peer may connect at all.
    pub fn peer_allowed(&self, uid: u32, gid: u32) -> bool {
        (uid == 0 && self.cfg.server.root_is_admin)
            || uid == self.euid
            || self.cfg.server.allowed_uids.contains(&uid)
            || self.cfg.server.allowed_gids.contains(&gid)
    }

    /// Whether a peer may use admin operations.
    pub fn peer_is_admin(&self, uid: u32) -> bool {
        (uid == 0 && self.cfg.server.root_is_admin)
            || uid == self.euid
            || self.cfg.server.admin_uids.contains(&uid)
    }

    /// Registers a new connection, or refuses it when `server.max_clients` are connected.
    pub fn register(&self, pid: u32, uid: u32, gid: u32) -> Result<Arc<Conn>, OpError> {
        let mut clients = self.clients.lock();
        if clients.len() >= self.cfg.server.max_clients as usize {
            return Err(OpError::new(
                ErrorCode::BadRequest,
                format!(
                    "too many clients ({} connected, server.max_clients = {})",
                    clients.len(),
                    self.cfg.server.max_clients
                ),
            ));
        }
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            name: Mutex::new(String::new()),
            pid,
            uid,
            gid,
            admin: AtomicBool::new(false),
            handles: RwLock::new(Vec::new()),
            closed: AtomicBool::new(false),
            kick: tokio::sync::Notify::new(),
            ops: AtomicU64::new(0),
            waker: Mutex::new(None),
        });
        clients.insert(id, conn.clone());
        Ok(conn)
    }

    /// Forgets a connection whose ring thread has finished.
    pub fn unregister(&self, conn: &Conn) {
        for ns in conn.handles.write().drain(..) {
            ns.open.fetch_sub(1, Ordering::SeqCst);
        }
        self.clients.lock().remove(&conn.id);
    }

    /// Remembers the tokens and parents of a chain of blocks for their KV events; without
    /// events configured it does nothing (the engine was told so when it opened the
    /// namespace) and answers 0.
    pub fn record_lineage(
        &self,
        ns: &Namespace,
        parent: Option<BlockKey>,
        keys: &[BlockKey],
        tokens: &[u32],
    ) -> Result<u32, OpError> {
        let Some(events) = &self.events else {
            return Ok(0);
        };
        let per = ns.desc.block_tokens as usize;
        if tokens.len() != keys.len().saturating_mul(per) {
            return Err(OpError::new(
                ErrorCode::BadRequest,
                format!(
                    "lineage of {} blocks carries {} tokens; the namespace has {per} per block",
                    keys.len(),
                    tokens.len()
                ),
            ));
        }
        let space = crate::lineage::Space {
            model: ns.desc.model.as_str().into(),
            lora: (!ns.desc.lora.is_empty()).then(|| ns.desc.lora.as_str().into()),
            block_tokens: ns.desc.block_tokens,
        };
        let n = events
            .lineage
            .lock()
            .record(ns.id, space, parent, keys, tokens);
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Opens `desc` on `conn`, binding an arena on first use. Returns the namespace and the
    /// handle for ring descriptors.
    pub fn open_namespace(
        &self,
        conn: &Conn,
        desc: NamespaceDesc,
    ) -> Result<(Arc<Namespace>, u32), OpError> {
        desc.validate()
            .map_err(|e| OpError::new(ErrorCode::BadRequest, e.to_string()))?;
        self.tenancy
            .check(conn.uid, conn.gid, &desc.tenant)
            .map_err(|why| OpError::new(ErrorCode::Unauthorized, why))?;
        let id = desc.id();
        {
            let handles = conn.handles.read();
            if let Some(h) = handles.iter().position(|n| n.id == id) {
                return Ok((handles[h].clone(), h as u32));
            }
            if handles.len() >= self.cfg.dram.max_namespaces as usize {
                return Err(OpError::new(
                    ErrorCode::NamespaceLimit,
                    "this connection already opened dram.max_namespaces namespaces",
                ));
            }
        }
        let ns = {
            let mut reg = self.registry.lock();
            match reg.by_id.get(&id) {
                Some(ns) => ns.clone(),
                None => {
                    self.check_quotas(&reg, conn.uid, &desc.tenant)?;
                    let arena = match reg.pool.pop() {
                        Some(a) => a,
                        None => self.recycle(&mut reg)?,
                    };
                    arena.bind(id);
                    let alloc = SlabAllocator::new(
                        arena.data_offset(),
                        arena.data_bytes(),
                        self.cfg.dram.max_block_bytes.0,
                    )
                    .ok_or_else(|| {
                        OpError::new(ErrorCode::Internal, "arena smaller than one chunk")
                    })?;
                    let mut store = NsStore::new(
                        id,
                        alloc,
                        self.cfg.dram.high_watermark,
                        self.cfg.dram.low_watermark,
                    );
                    if self.cfg.publishes_residency() {
                        store.record_changes(self.cfg.index.journal_changes as usize);
                    }
                    if self.s3.is_some() {
                        store.track_uploads();
                    }
                    // Tenants (salt digests among them) are not logged at info.
                    tracing::info!(ns = %id, model = %desc.model, "namespace opened");
                    tracing::debug!(ns = %id, tenant = %desc.tenant, "namespace tenant");
                    let ns = Arc::new(Namespace {
                        id,
                        desc,
                        arena,
                        store: Mutex::new(store),
                        open: AtomicU32::new(0),
                        owner_uid: conn.uid,
                    });
                    reg.by_id.insert(id, ns.clone());
                    ns
                }
            }
        };
        ns.open.fetch_add(1, Ordering::SeqCst);
        let mut handles = conn.handles.write();
        handles.push(ns.clone());
        Ok((ns, (handles.len() - 1) as u32))
    }

    /// Refuses a new namespace to `uid` when it has `server.max_namespaces_per_uid` bound,
    /// or to `tenant` (its base) when it has `server.max_namespaces_per_tenant`.
    fn check_quotas(&self, reg: &Registry, uid: u32, tenant: &str) -> Result<(), OpError> {
        let cap = self.cfg.server.max_namespaces_per_uid;
        let held = reg.by_id.values().filter(|n| n.owner_uid == uid).count();
        if cap > 0 && held >= cap as usize {
            return Err(OpError::new(
                ErrorCode::NamespaceLimit,
                format!(
                    "uid {uid} has {held} namespaces bound to arenas \
                     (server.max_namespaces_per_uid = {cap})"
                ),
            ));
        }
        let cap = self.cfg.server.max_namespaces_per_tenant;
        let base = crate::tenancy::base(tenant);
        let held = reg
            .by_id
            .values()
            .filter(|n| crate::tenancy::base(&n.desc.tenant) == base)
            .count();
        if cap > 0 && held >= cap as usize {
            return Err(OpError::new(
                ErrorCode::NamespaceLimit,
                format!(
                    "tenant {base:?} has {held} namespaces bound to arenas \
                     (server.max_namespaces_per_tenant = {cap})"
                ),
            ));
        }
        Ok(())
    }

    /// Retires a namespace nobody uses and nothing is held in, and returns a *fresh* arena in
    /// its place. The old memfd is dropped rather than reused: a client that once mapped it
    /// (and may still, after disconnecting) must never see another namespace's blocks.
    fn recycle(&self, reg: &mut Registry) -> Result<Arena, OpError> {
        let full = || {
            OpError::new(
                ErrorCode::NamespaceLimit,
                format!(
                    "all {} arenas are bound to namespaces in use; raise dram.max_namespaces or \
                     free a namespace",
                    self.cfg.dram.max_namespaces
                ),
            )
        };
        // A namespace nobody has open and nothing is held in: an empty one first, else the
        // one with the fewest blocks and no pins (so one-block namespaces left behind cannot
        // squat every arena). Its DRAM blocks go (lower tiers keep their copies).
        let victim = reg
            .by_id
            .iter()
            .filter_map(|(id, ns)| {
                let s = ns.store.lock();
                (ns.open.load(Ordering::SeqCst) == 0
                    && s.reserved() == 0
                    && s.leases() == 0
                    && s.pinned() == 0)
                    .then_some((s.blocks(), *id))
            })
            .min()
            .map(|(_, id)| id)
            .ok_or_else(full)?;
        let ns = reg.by_id.remove(&victim).ok_or_else(full)?;
        match Arc::try_unwrap(ns) {
            Ok(old) => {
                self.retire(old);
                let mut arena = Arena::create(&self.cfg.dram)
                    .map_err(|e| OpError::new(ErrorCode::Internal, e.to_string()))?;
                if let Some(disk) = &self.disk {
                    register_arenas(&self.cfg, disk, std::slice::from_mut(&mut arena));
                }
                // The fresh arena is pinned like the ones made at start.
                if let (Some(g), true) = (&self.gpu, self.cfg.gpu.pin_arenas) {
                    let r = arena
                        .pin_for_gpu(
                            g.backend.clone(),
                            pin_chunk(&self.cfg),
                            self.cfg.gpu.pin_threads as usize,
                        )
                        .map_err(|e| {
                            OpError::new(
                                ErrorCode::Internal,
                                format!("pinning a new arena for GPU DMA: {e}"),
                            )
                        })?;
                    tracing::info!(
                        bytes = r.bytes,
                        pieces = r.chunks,
                        "new arena pinned for GPU DMA"
                    );
                }
                tracing::info!(ns = %victim, "retired an unused namespace for a new one");
                Ok(arena)
            }
            Err(ns) => {
                reg.by_id.insert(victim, ns);
                Err(full())
            }
        }
    }

    /// Forgets a namespace whose arena is being recycled: its DRAM blocks are announced as
    /// removed (with the changes it had not published yet).
    fn retire(&self, old: Namespace) {
        let mut store = old.store.lock();
        let keys = store.live_keys();
        if keys.is_empty() {
            return;
        }
        tracing::info!(ns = %old.id, blocks = keys.len(),
            "dropped the DRAM blocks of an unused namespace to recycle its arena");
        if self.cfg.publishes_residency() {
            let mut orphans = self.orphans.lock();
            orphans.extend(store.take_changes().changes);
            orphans.extend(
                keys.into_iter()
                    .map(|k| crate::residency::Change::removed(old.id, k, Tier::Dram)),
            );
        }
    }

    /// Changes of retired namespaces not yet handed to the publishers.
    pub fn take_orphan_changes(&self) -> Vec<crate::residency::Change> {
        std::mem::take(&mut *self.orphans.lock())
    }

    /// The namespace `id` as seen by `conn`: open on it, or any namespace for admins.
    pub fn namespace_for(&self, conn: &Conn, id: &NamespaceId) -> Result<Arc<Namespace>, OpError> {
        if let Some(ns) = conn.handles.read().iter().find(|n| n.id == *id) {
            return Ok(ns.clone());
        }
        if conn.admin.load(Ordering::Relaxed) {
            if let Some(ns) = self.registry.lock().by_id.get(id) {
                return Ok(ns.clone());
            }
        }
        Err(OpError::new(
            ErrorCode::UnknownNamespace,
            format!("namespace {id} is not open on this connection (send OpenNamespace first)"),
        ))
    }

    /// All namespaces, sorted by id.
    pub fn namespaces(&self) -> Vec<Arc<Namespace>> {
        let mut v: Vec<_> = self.registry.lock().by_id.values().cloned().collect();
        v.sort_by_key(|n| n.id);
        v
    }

    /// Longest prefix of `keys` stored in any tier, and how many of its blocks each tier
    /// serves (DRAM first).
    pub fn lookup(&self, ns: &Namespace, keys: &[BlockKey]) -> (u32, TierCounts) {
        let mut tiers = TierCounts::default();
        let Some(disk) = &self.disk else {
            let n = ns.store.lock().lookup(keys);
            tiers.0[Tier::Dram as usize] = u32::try_from(n).unwrap_or(u32::MAX);
            return (tiers.0[Tier::Dram as usize], tiers);
        };
        let in_dram: Vec<bool> = {
            let st = ns.store.lock();
            keys.iter().map(|k| st.contains(k)).collect()
        };
        let first_gap = in_dram.iter().position(|&b| !b).unwrap_or(keys.len());
        let on_disk = disk.presence(&ns.id, &keys[first_gap..]);
        let mut n = 0u32;
        for (i, dram) in in_dram.iter().enumerate() {
            if *dram {
                tiers.add(Tier::Dram);
            } else if on_disk.get(i - first_gap).copied().unwrap_or(false) {
                tiers.add(Tier::Disk);
            } else {
                break;
            }
            n += 1;
        }
        (n, tiers)
    }

    /// Like [`lookup`](Self::lookup) for a namespace not open on this node: only the disk
    /// tier can hold its blocks.
    pub fn lookup_on_disk(&self, id: &NamespaceId, keys: &[BlockKey]) -> (u32, TierCounts) {
        let mut tiers = TierCounts::default();
        let on_disk = self.disk.as_ref().map_or(0, |d| {
            d.presence(id, keys).iter().take_while(|&&b| b).count()
        });
        for _ in 0..on_disk {
            tiers.add(Tier::Disk);
        }
        (u32::try_from(on_disk).unwrap_or(u32::MAX), tiers)
    }

    /// Requires admin rights on `conn`.
    pub fn require_admin(&self, conn: &Conn, what: &str) -> Result<(), OpError> {
        if conn.admin.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err(OpError::new(
                ErrorCode::Unauthorized,
                format!(
                    "{what} needs an admin connection (Hello with admin; uid {} is not in \
                     server.admin_uids)",
                    conn.uid
                ),
            ))
        }
    }

    /// Lists blocks across namespaces in (namespace, key) order.
    pub fn list(
        &self,
        only: Option<NamespaceId>,
        after: Option<(NamespaceId, BlockKey)>,
        limit: usize,
    ) -> (Vec<BlockInfo>, bool) {
        let now = self.now_ms();
        let mut out = Vec::new();
        for ns in self.namespaces() {
            if only.is_some_and(|o| o != ns.id) {
                continue;
            }
            let cursor = match after {
                Some((an, _)) if ns.id < an => continue,
                Some((an, ak)) if ns.id == an => Some(ak),
                _ => None,
            };
            let room = limit - out.len();
            let (page, more) = ns.store.lock().list(cursor.as_ref(), room, now);
            out.extend(page);
            if more || out.len() >= limit {
                return (out, true);
            }
        }
        (out, false)
    }

    /// Every copy of `key` in any namespace and tier.
    pub fn inspect(&self, key: &BlockKey) -> Vec<BlockInfo> {
        let now = self.now_ms();
        let mut out: Vec<BlockInfo> = self
            .namespaces()
            .iter()
            .filter_map(|ns| ns.store.lock().inspect(key, now))
            .collect();
        if let Some(disk) = &self.disk {
            for ns in disk.namespaces() {
                if let Some((len, checksum, hits, age_ms, idle_ms)) = disk.inspect(&ns, key) {
                    out.push(BlockInfo {
                        ns,
                        key: *key,
                        tier: Tier::Disk,
                        len,
                        checksum,
                        pins: 0,
                        readers: 0,
                        hits: u64::from(hits),
                        age_ms,
                        idle_ms,
                    });
                }
            }
        }
        out.sort_by_key(|b| (b.ns, b.tier));
        out
    }

    /// Daemon-wide statistics.
    /// [`stats`](Self::stats) as `conn` may see them: an admin everything, anyone else only
    /// the namespaces it has open and its own connection (no other tenant's descriptor).
    pub fn stats_for(&self, conn: &Conn) -> StatsReport {
        let mut r = self.stats();
        if !conn.admin.load(Ordering::Relaxed) {
            let own: Vec<NamespaceId> = conn.handles.read().iter().map(|n| n.id).collect();
            r.namespaces.retain(|n| own.contains(&n.ns));
            r.clients.retain(|c| c.id == conn.id);
        }
        r
    }

    /// Everything the node reports, for admins and `/metrics`.
    pub fn stats(&self) -> StatsReport {
        let mut dram = TierStats {
            tier: Tier::Dram,
            capacity_bytes: 0,
            used_bytes: 0,
            blocks: 0,
            hits: 0,
            misses: 0,
            evictions: 0,
            bytes_in: 0,
            bytes_out: 0,
        };
        let mut namespaces = Vec::new();
        for ns in self.namespaces() {
            let (disk_blocks, disk_bytes) =
                self.disk.as_ref().map_or((0, 0), |d| d.ns_usage(&ns.id));
            let s = ns.store.lock();
            let st = NamespaceStats {
                ns: ns.id,
                desc: ns.desc.clone(),
                arena_bytes: ns.arena.total_bytes(),
                used_bytes: s.used_bytes(),
                blocks: s.blocks(),
                pinned: s.pinned(),
                leases: s.leases(),
                reserved: s.reserved(),
                hits: s.counters.hits,
                misses: s.counters.misses,
                evictions: s.counters.evictions,
                full_rejections: s.counters.full_rejections,
                owner_uid: ns.owner_uid,
                disk_blocks,
                disk_bytes,
            };
            dram.used_bytes += st.used_bytes;
            dram.blocks += st.blocks;
            dram.hits += st.hits;
            dram.misses += st.misses;
            dram.evictions += st.evictions;
            dram.bytes_in += s.counters.bytes_in;
            dram.bytes_out += s.counters.bytes_out;
            namespaces.push(st);
        }
        dram.capacity_bytes = self.cfg.dram.arena_bytes.0 * u64::from(self.cfg.dram.max_namespaces);
        let mut clients: Vec<ClientInfo> = self
            .clients
            .lock()
            .values()
            .map(|c| {
                let (sq_depth, cq_depth) = c
                    .waker
                    .lock()
                    .as_ref()
                    .map(|w| w.depths())
                    .unwrap_or_default();
                ClientInfo {
                    id: c.id,
                    name: c.name.lock().clone(),
                    pid: c.pid,
                    uid: c.uid,
                    admin: c.admin.load(Ordering::Relaxed),
                    ops: c.ops.load(Ordering::Relaxed),
                    sq_depth,
                    cq_depth,
                }
            })
            .collect();
        clients.sort_by_key(|c| c.id);
        let mut tiers: Vec<TierStats> = self
            .gpu
            .as_ref()
            .and_then(|g| g.pool.as_ref())
            .map(|p| p.stats())
            .into_iter()
            .collect();
        tiers.push(dram);
        let disk = self.disk.as_ref().map(|d| d.report());
        if let Some(r) = &disk {
            tiers.push(TierStats {
                tier: Tier::Disk,
                capacity_bytes: r.capacity_bytes,
                used_bytes: r.used_bytes,
                blocks: r.blocks,
                hits: r.hits,
                misses: r.misses,
                evictions: r.reclaimed_blocks,
                bytes_in: r.write_bytes,
                bytes_out: r.read_bytes,
            });
        }
        let s3 = self.s3.as_ref().map(|s| s.report());
        if let Some(r) = &s3 {
            tiers.push(TierStats {
                tier: Tier::S3,
                capacity_bytes: self.cfg.s3.capacity_bytes.0,
                used_bytes: r.bytes,
                blocks: r.blocks,
                hits: r.read_blocks,
                misses: r.read_failures,
                evictions: r.deleted_segments,
                bytes_in: r.uploaded_bytes,
                bytes_out: r.read_bytes,
            });
        }
        StatsReport {
            daemon_version: VERSION.into(),
            uptime_ms: self.now_ms(),
            tiers,
            namespaces,
            clients,
            disk,
            index: self.index.as_ref().map(|r| r.report()),
            events: self.events.as_ref().map(|e| e.report()),
            peer: self.peer.as_ref().map(|p| p.report()),
            gpu: self.gpu.as_ref().map(|g| g.report()),
            s3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn small() -> Config {
        let mut c = Config::default();
        c.dram.arena_bytes = crate::config::ByteSize(16 << 20);
        c.dram.max_block_bytes = crate::config::ByteSize(1 << 20);
        c.dram.max_namespaces = 1;
        c
    }

    fn inode(fd: &std::os::fd::OwnedFd) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap_or(0)
    }

    /// Root in an engine container is uid 0 on the node: it is an ordinary uid unless
    /// `server.root_is_admin` says otherwise.
    #[test]
    fn root_is_neither_allowed_nor_admin_unless_configured() {
        let mut d = Daemon::new(small()).unwrap();
        Arc::get_mut(&mut d).unwrap().euid = 10_001;
        assert!(!d.peer_allowed(0, 0) && !d.peer_is_admin(0));
        assert!(d.peer_allowed(10_001, 10_001) && d.peer_is_admin(10_001));
        let mut cfg = small();
        cfg.server.root_is_admin = true;
        cfg.server.allowed_uids = vec![1000];
        let mut d = Daemon::new(cfg).unwrap();
        Arc::get_mut(&mut d).unwrap().euid = 10_001;
        assert!(d.peer_allowed(0, 0) && d.peer_is_admin(0));
        assert!(d.peer_allowed(1000, 1000) && !d.peer_is_admin(1000));
    }

    #[test]
    fn a_retired_namespace_never_hands_its_memory_to_another() {
        let d = Daemon::new(small()).unwrap();
        let a = d.register(1, 0, 0).unwrap();
        let (ns_a, _) = d
            .open_namespace(&a, NamespaceDesc::new("a", "bf16", "L", 16))
            .unwrap();
        let old = ns_a.arena.fd().try_clone().unwrap();
        drop(ns_a);
        let b = d.register(2, 0, 0).unwrap();
        // Namespace a is still open on connection a: no arena for b.
        let e = d
            .open_namespace(&b, NamespaceDesc::new("b", "bf16", "L", 16))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NamespaceLimit);
        d.unregister(&a);
        let (ns_b, _) = d
            .open_namespace(&b, NamespaceDesc::new("b", "bf16", "L", 16))
            .unwrap();
        assert_ne!(inode(&old), inode(ns_b.arena.fd()), "b got a fresh memfd");
        assert_ne!(inode(&old), 0);
    }

    fn put_one(ns: &Namespace, k: u8) {
        let mut st = ns.store.lock();
        let key = BlockKey([k; 32]);
        let slot = st.reserve(&key, 4096).unwrap();
        st.commit(&key, slot, 4096, 0);
    }

    /// One-block namespaces left behind by clients that went away do not hold every arena:
    /// the one with the fewest blocks is recycled, one with pinned blocks never.
    #[test]
    fn namespaces_left_behind_cannot_squat_the_arenas() {
        let mut cfg = small();
        cfg.dram.max_namespaces = 2;
        let d = Daemon::new(cfg).unwrap();
        let squatter = d.register(1, 1000, 1000).unwrap();
        for (name, k) in [("s1", 1), ("s2", 2)] {
            let (ns, _) = d
                .open_namespace(&squatter, NamespaceDesc::new(name, "bf16", "L", 16))
                .unwrap();
            put_one(&ns, k);
            if name == "s2" {
                put_one(&ns, 3);
                ns.store.lock().pin(&[BlockKey([2; 32])]);
            }
        }
        d.unregister(&squatter);
        let engine = d.register(2, 1001, 1001).unwrap();
        d.open_namespace(&engine, NamespaceDesc::new("e1", "bf16", "L", 16))
            .expect("s1's arena recycled");
        let e = d
            .open_namespace(&engine, NamespaceDesc::new("e2", "bf16", "L", 16))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NamespaceLimit, "s2 holds a pin");
    }

    #[test]
    fn one_uid_binds_at_most_its_quota_of_arenas() {
        let mut cfg = small();
        cfg.dram.max_namespaces = 3;
        cfg.server.max_namespaces_per_uid = 1;
        let d = Daemon::new(cfg).unwrap();
        let a = d.register(1, 1000, 1000).unwrap();
        d.open_namespace(&a, NamespaceDesc::new("a1", "bf16", "L", 16))
            .unwrap();
        let e = d
            .open_namespace(&a, NamespaceDesc::new("a2", "bf16", "L", 16))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NamespaceLimit);
        assert!(
            e.message.contains("server.max_namespaces_per_uid"),
            "{}",
            e.message
        );
        let b = d.register(2, 1001, 1001).unwrap();
        d.open_namespace(&b, NamespaceDesc::new("b1", "bf16", "L", 16))
            .expect("another uid has its own quota");
    }

    /// A tenant's quota counts its namespaces whoever opened them, salted or not.
    #[test]
    fn one_tenant_binds_at_most_its_quota_of_arenas() {
        let mut cfg = small();
        cfg.dram.max_namespaces = 4;
        cfg.server.max_namespaces_per_tenant = 2;
        cfg.server.tenants = vec![crate::config::TenantRule {
            uids: vec![1000, 1001],
            gids: vec![],
            tenants: vec!["*".into()],
        }];
        let d = Daemon::new(cfg).unwrap();
        let (a, b) = (
            d.register(1, 1000, 1000).unwrap(),
            d.register(2, 1001, 1001).unwrap(),
        );
        let desc = |model: &str, tenant: &str| {
            let mut n = NamespaceDesc::new(model, "bf16", "L", 16);
            n.tenant = tenant.into();
            n
        };
        d.open_namespace(&a, desc("m1", "team-a")).unwrap();
        d.open_namespace(&b, desc("m2", "team-a|salt=00ff"))
            .unwrap();
        let e = d.open_namespace(&b, desc("m3", "team-a")).unwrap_err();
        assert_eq!(e.code, ErrorCode::NamespaceLimit);
        assert!(
            e.message.contains("server.max_namespaces_per_tenant"),
            "{}",
            e.message
        );
        assert!(!e.message.contains("salt"), "{}", e.message);
        d.open_namespace(&b, desc("m3", "team-b"))
            .expect("another tenant");
        let s = d.stats_for(&a);
        assert!(s.namespaces.iter().all(|n| n.owner_uid == 1000), "{s:?}");
    }
}
