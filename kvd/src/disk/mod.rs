//! The disk (NVMe) tier: a log of fixed-size region files plus a RocksDB catalog.
//!
//! Blocks are appended to the active region at 4 KiB-aligned offsets, straight from their
//! arena slot (O_DIRECT, no bounce copy), by the [`engine`] thread. When the active region is
//! full the next free one is started; when none is free a whole region is reclaimed (FIFO or
//! LRU by region, like CacheLib's Navy and foyer's block engine): its catalog entries go in one
//! write batch, then its header is rewritten with a new generation number (`seq`), then it
//! takes writes again. A block becomes visible — in the index and the catalog — only after its
//! data write completed, so whatever instant the process dies at, the catalog names only
//! complete data. At start the catalog is checked against the region headers (magic, version,
//! owner, generation) and anything that does not match is dropped; every read is verified
//! against the block's checksum, so torn or corrupted bytes are a miss, never served.
//!
//! [`DiskTier`] is the bookkeeping (index, regions, counters) behind one mutex; IO happens on
//! the engine thread, and the callers (the demoter for writes, ring threads for reads) wait
//! for completions without holding the lock. An in-memory index (about 100 bytes per block)
//! answers lookups; the catalog is only read at start.

pub mod admission;
pub mod catalog;
pub mod engine;
pub mod format;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hashbrown::HashMap;
use kvd_proto::frame::DiskReport;
use kvd_proto::{BlockKey, NamespaceId, Tier};
use parking_lot::{Condvar, Mutex};

use crate::config::{DiskConfig, DiskEngine, ReclaimPolicy};
use crate::residency::{Journal, Taken};
use admission::Admission;
use catalog::{Catalog, CatalogError};
use engine::{run_sync, IoBuf, IoEngine, IoKind, IoOp, PsyncEngine, UringEngine};
use format::{
    align_up, header_offset, BlockRecord, CatalogMeta, RegionHeader, FORMAT_VERSION, HEADER_BYTES,
};

/// Most disk hits whose access statistics wait to be persisted (beyond, they are dropped).
const MAX_TOUCHED: usize = 65_536;

/// How long writes pause after an IO error before the tier tries again.
const WRITE_BACKOFF: Duration = Duration::from_secs(5);

/// Why the disk tier could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A directory or region file could not be created or opened.
    #[error("cannot {what} {path}: {source}")]
    Setup {
        /// What was being done (a verb phrase).
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// The catalog is unusable.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy)]
struct Loc {
    region: u32,
    hits: u32,
    offset: u64,
    len: u64,
    checksum: u64,
    stored_unix_ms: u64,
    last_unix_ms: u64,
}

impl From<&BlockRecord> for Loc {
    fn from(r: &BlockRecord) -> Loc {
        Loc {
            region: r.region,
            hits: r.hits,
            offset: r.offset,
            len: r.len,
            checksum: r.checksum,
            stored_unix_ms: r.stored_unix_ms,
            last_unix_ms: r.last_unix_ms,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RegionState {
    Free,
    /// Its header is being written; it becomes active when the active region fills.
    Preparing,
    Active,
    Sealed,
    Failed,
}

/// Outcome of a region header write, filled in by the IO callback.
type HeaderDone = Arc<(Mutex<Option<io::Result<()>>>, Condvar)>;

/// A region started ahead of need.
struct Prepared {
    region: usize,
    seq: u64,
    created_unix_ms: u64,
    done: HeaderDone,
}

#[derive(Debug)]
struct Region {
    file: Arc<File>,
    seq: u64,
    state: RegionState,
    head: u64,
    live_blocks: u64,
    last_access_ms: u64,
    reads: u32,
    writes: u32,
    /// Header write of this generation, until its outcome has been checked: no block of the
    /// region is cataloged before its header is known to be on disk.
    header: Option<HeaderDone>,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    writes: AtomicU64,
    admission_rejections: AtomicU64,
    reclaims: AtomicU64,
    reclaimed_blocks: AtomicU64,
    quota_evictions: AtomicU64,
    checksum_failures: AtomicU64,
    io_errors: AtomicU64,
    dropped_at_start: AtomicU64,
    drain_pending: AtomicU64,
    warm_pending: AtomicU64,
    warmed: AtomicU64,
}

#[derive(Debug)]
struct Rates {
    at: Instant,
    read: u64,
    write: u64,
    read_bps: u64,
    write_bps: u64,
}

/// What one namespace holds on disk.
#[derive(Debug, Default, Clone, Copy)]
struct NsUse {
    blocks: u64,
    /// Aligned bytes (the space its blocks take).
    bytes: u64,
}

struct State {
    index: HashMap<(NamespaceId, BlockKey), Loc, foldhash::fast::RandomState>,
    per_ns: HashMap<NamespaceId, NsUse, foldhash::fast::RandomState>,
    /// The tenant (base) each namespace with blocks here counts against.
    owners: HashMap<NamespaceId, Arc<str>, foldhash::fast::RandomState>,
    /// Aligned bytes each tenant holds here (`disk.max_bytes_per_tenant`).
    tenant_bytes: HashMap<Arc<str>, u64, foldhash::fast::RandomState>,
    /// Aligned bytes of each tenant's writes granted and not yet ended.
    tenant_pending: HashMap<Arc<str>, u64, foldhash::fast::RandomState>,
    regions: Vec<Region>,
    active: Option<u32>,
    next_seq: u64,
    used_bytes: u64,
    degraded: Option<String>,
    retry_at: Option<Instant>,
    /// Why the tier started with less than its configured capacity (stays reported).
    reduced: Option<String>,
    next: Option<Prepared>,
    /// Blocks read since the last [`DiskTier::flush_touches`].
    touched: Vec<(NamespaceId, BlockKey)>,
    /// Blocks with reads or writes in flight, so a delete meanwhile can void them: without
    /// this a write finishing after a delete would catalog the block again, and a read would
    /// promote it back into DRAM.
    in_flight: HashMap<(NamespaceId, BlockKey), InFlight, foldhash::fast::RandomState>,
    /// Blocks that appeared or went, for the cluster index (off unless one is configured).
    journal: Journal,
}

/// IOs in flight for one block, and how many deletes it has seen (tickets carry the count
/// they started under; a different one at the end means the block was deleted meanwhile).
#[derive(Debug, Default)]
struct InFlight {
    ios: u32,
    gen: u32,
}

impl State {
    /// Notes an IO starting on a block; the generation its ticket carries.
    fn start_io(&mut self, k: (NamespaceId, BlockKey)) -> u32 {
        let e = self.in_flight.entry(k).or_default();
        e.ios += 1;
        e.gen
    }

    /// Notes the end of an IO started under `gen`; whether the block was not deleted since.
    fn end_io(&mut self, k: &(NamespaceId, BlockKey), gen: u32) -> bool {
        let Some(e) = self.in_flight.get_mut(k) else {
            return false;
        };
        let valid = e.gen == gen;
        e.ios = e.ios.saturating_sub(1);
        if e.ios == 0 {
            self.in_flight.remove(k);
        }
        valid
    }

    /// Voids the IOs in flight on a deleted block.
    fn void_ios(&mut self, k: &(NamespaceId, BlockKey)) {
        if let Some(e) = self.in_flight.get_mut(k) {
            e.gen = e.gen.wrapping_add(1);
        }
    }

    /// Adds a block to the index and the region, namespace, tenant and byte counts.
    fn insert(&mut self, ns: NamespaceId, key: BlockKey, loc: Loc) {
        let a = align_up(loc.len);
        self.regions[loc.region as usize].live_blocks += 1;
        self.used_bytes += a;
        let u = self.per_ns.entry(ns).or_default();
        u.blocks += 1;
        u.bytes += a;
        if let Some(o) = self.owners.get(&ns) {
            *self.tenant_bytes.entry(o.clone()).or_default() += a;
        }
        if self.index.insert((ns, key), loc).is_none() {
            self.journal.record(ns, key, Tier::Disk, true);
        }
    }

    /// Removes a block from the index and the counts; its former place. A namespace left
    /// without blocks is forgotten with its owner.
    fn remove(&mut self, k: &(NamespaceId, BlockKey)) -> Option<Loc> {
        let l = self.index.remove(k)?;
        let a = align_up(l.len);
        self.journal.record(k.0, k.1, Tier::Disk, false);
        let r = &mut self.regions[l.region as usize];
        r.live_blocks = r.live_blocks.saturating_sub(1);
        self.used_bytes = self.used_bytes.saturating_sub(a);
        if let Some(o) = self.owners.get(&k.0) {
            self.add_tenant_bytes(&o.clone(), a, false);
        }
        if let Some(u) = self.per_ns.get_mut(&k.0) {
            u.blocks = u.blocks.saturating_sub(1);
            u.bytes = u.bytes.saturating_sub(a);
            if u.blocks == 0 {
                self.per_ns.remove(&k.0);
                self.owners.remove(&k.0);
            }
        }
        Some(l)
    }

    /// Adds (or takes away) `bytes` to a tenant's count; a tenant at zero is forgotten.
    fn add_tenant_bytes(&mut self, tenant: &Arc<str>, bytes: u64, add: bool) {
        count(&mut self.tenant_bytes, tenant, bytes, add);
    }

    /// Records that `ns` counts against `tenant` (from its first block on, or again after
    /// the namespace's blocks were all gone); whether it is new.
    fn adopt(&mut self, ns: NamespaceId, tenant: &str) -> bool {
        if self.owners.contains_key(&ns) {
            return false;
        }
        let t: Arc<str> = self
            .tenant_bytes
            .get_key_value(tenant)
            .map_or_else(|| Arc::from(tenant), |(k, _)| k.clone());
        let held = self.per_ns.get(&ns).map_or(0, |u| u.bytes);
        if held > 0 {
            self.add_tenant_bytes(&t, held, true);
        }
        self.owners.insert(ns, t);
        true
    }

    /// The least recently used blocks of `tenant` whose removal brings it to `target`
    /// bytes or below.
    fn tenant_victims(&self, tenant: &str, target: u64) -> Vec<(NamespaceId, BlockKey)> {
        let mut held = self.tenant_bytes.get(tenant).copied().unwrap_or(0);
        let mine: Vec<NamespaceId> = self
            .owners
            .iter()
            .filter(|(_, o)| o.as_ref() == tenant)
            .map(|(n, _)| *n)
            .collect();
        // Least recently read first; among equals, in the order they were written.
        let age = |l: &Loc| {
            (
                l.last_unix_ms,
                self.regions[l.region as usize].seq,
                l.offset,
            )
        };
        let mut blocks: Vec<(&(NamespaceId, BlockKey), &Loc)> = self
            .index
            .iter()
            .filter(|((n, _), _)| mine.contains(n))
            .collect();
        blocks.sort_unstable_by_key(|(_, l)| age(l));
        let mut out = Vec::new();
        for (k, l) in blocks {
            if held <= target {
                break;
            }
            held = held.saturating_sub(align_up(l.len));
            out.push(*k);
        }
        out
    }
}

/// Adds (or takes away) `bytes` to a tenant's entry of `counts`; one at zero is removed.
fn count(
    counts: &mut HashMap<Arc<str>, u64, foldhash::fast::RandomState>,
    tenant: &Arc<str>,
    bytes: u64,
    add: bool,
) {
    let t = counts.entry(tenant.clone()).or_default();
    *t = if add {
        *t + bytes
    } else {
        t.saturating_sub(bytes)
    };
    if *t == 0 {
        counts.remove(tenant);
    }
}

/// A read the caller is about to do: the block's place and checksum. Hand it back with
/// [`DiskTier::end_read`].
#[derive(Debug)]
pub struct ReadTicket {
    /// Region file.
    pub file: Arc<File>,
    /// Region number.
    pub region: u32,
    /// File offset.
    pub offset: u64,
    /// Block length.
    pub len: u64,
    /// Expected xxh3-64.
    pub checksum: u64,
    /// Delete generation of the block when the read started.
    gen: u32,
}

/// How a read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// Bytes read and verified.
    Verified,
    /// Bytes read but the checksum did not match: the block is dropped.
    Corrupt,
    /// The read failed (IO error).
    Failed,
    /// Not attempted (no DRAM slot for it).
    Abandoned,
}

/// Space granted for one block write. Hand it back with [`DiskTier::end_writes`].
#[derive(Debug)]
pub struct WriteTicket {
    /// Region file.
    pub file: Arc<File>,
    /// Region number.
    pub region: u32,
    /// Region generation.
    pub seq: u64,
    /// File offset.
    pub offset: u64,
    /// Delete generation of the block when the write was granted.
    gen: u32,
    /// The tenant the write counts against until it ends, and its aligned bytes.
    tenant: Arc<str>,
    reserved: u64,
}

/// A finished block write, handed to [`DiskTier::end_writes`].
#[derive(Debug)]
pub struct WriteDone {
    /// Namespace.
    pub ns: NamespaceId,
    /// Key.
    pub key: BlockKey,
    /// Block length.
    pub len: u64,
    /// xxh3-64 of the block.
    pub checksum: u64,
    /// The space it was written to.
    pub ticket: WriteTicket,
    /// Outcome of the data write.
    pub result: io::Result<()>,
}

/// Why a block was not written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteSkip {
    /// The tier already holds it.
    Stored,
    /// The tier is degraded (IO errors); writes resume after a pause.
    Degraded,
    /// No region can take it now (all busy).
    Busy,
    /// The block is larger than `disk.max_bytes_per_tenant`.
    Quota,
}

/// The disk tier.
pub struct DiskTier {
    cfg: DiskConfig,
    engine: Box<dyn IoEngine>,
    catalog: Catalog,
    instance: u64,
    direct: bool,
    regions_dir: PathBuf,
    state: Mutex<State>,
    admission: Mutex<Admission>,
    counters: Counters,
    rates: Mutex<Rates>,
}

impl std::fmt::Debug for DiskTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskTier")
            .field("path", &self.cfg.path)
            .field("engine", &self.engine.name())
            .finish()
    }
}

fn setup<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DiskError + 'a {
    move |source| DiskError::Setup {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Opens a region file: writes are durable when they complete (`O_DSYNC`), so the catalog
/// never names data a power failure could take back; a link at the path is refused
/// (`O_NOFOLLOW`) rather than followed out of the disk tier's directory.
fn open_region(path: &Path, direct: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(true).truncate(false);
    let mut flags = libc::O_DSYNC | libc::O_NOFOLLOW;
    if direct {
        flags |= libc::O_DIRECT;
    }
    o.custom_flags(flags);
    o.open(path)
}

/// Whether files in `dir` can be opened with O_DIRECT.
fn probe_direct(dir: &Path) -> bool {
    let p = dir.join(".direct-probe");
    let ok = open_region(&p, true).is_ok();
    let _ = std::fs::remove_file(&p);
    ok
}

fn preallocate(f: &File, len: u64) -> io::Result<()> {
    let Ok(l) = libc::off_t::try_from(len) else {
        return Err(io::Error::other("region too large"));
    };
    // SAFETY: fallocate on an fd we own; no memory is passed.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, l) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return f.set_len(len);
    }
    Err(e)
}

impl DiskTier {
    /// Opens (creating if needed) the tier under `cfg.path`: the catalog, the region files,
    /// and the index rebuilt from the catalog and checked against the region headers.
    pub fn open(cfg: &DiskConfig) -> Result<DiskTier, DiskError> {
        let root = cfg.path.clone();
        std::fs::create_dir_all(&root).map_err(setup("create the disk directory", &root))?;
        let regions_dir = root.join("regions");
        std::fs::create_dir_all(&regions_dir)
            .map_err(setup("create the region directory", &regions_dir))?;
        let region_bytes = cfg.region_bytes.0;
        let want = u32::try_from(cfg.capacity_bytes.0 / region_bytes).unwrap_or(u32::MAX);
        let fresh = CatalogMeta {
            version: FORMAT_VERSION,
            region_bytes,
            instance: std::hash::BuildHasher::hash_one(
                &foldhash::fast::RandomState::default(),
                unix_ms() ^ u64::from(std::process::id()),
            ),
            regions: want,
            flags: 0,
        };
        let (mut catalog, meta) = Catalog::open(&root.join("catalog"), fresh)?;
        catalog.set_sync_interval(std::time::Duration::from_millis(u64::from(
            cfg.catalog_sync_ms,
        )));

        let direct = cfg.direct_io && probe_direct(&regions_dir);
        let mut kind = cfg.engine;
        if cfg.direct_io && !direct {
            tracing::warn!(
                path = %regions_dir.display(),
                "the filesystem refuses O_DIRECT; the disk tier uses psync through the page cache"
            );
            kind = DiskEngine::Psync;
        }
        let psync = || {
            PsyncEngine::start(cfg.io_depth)
                .map(|e| Box::new(e) as Box<dyn IoEngine>)
                .map_err(setup("start IO threads for", &root))
        };
        let engine: Box<dyn IoEngine> = match kind {
            DiskEngine::IoUring => match UringEngine::start(cfg.io_depth) {
                Ok(e) => Box::new(e),
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring is unavailable; the disk tier uses psync");
                    psync()?
                }
            },
            DiskEngine::Psync => psync()?,
        };

        let mut regions = Vec::new();
        let mut degraded = None;
        for i in 0..want {
            let p = regions_dir.join(format!("region-{i:05}.kvd"));
            let existed = p.exists();
            let f = open_region(&p, direct).map_err(setup("open region file", &p))?;
            let sized = f
                .metadata()
                .map(|m| m.len() >= region_bytes)
                .unwrap_or(false);
            if !sized {
                let r = if cfg.preallocate {
                    preallocate(&f, region_bytes)
                } else {
                    f.set_len(region_bytes)
                };
                if let Err(e) = r {
                    if !existed {
                        let _ = std::fs::remove_file(&p);
                    }
                    let why = format!(
                        "only {i} of {want} region files could be allocated in {}: {e}",
                        regions_dir.display()
                    );
                    tracing::error!("{why}; the disk tier runs with what it has");
                    degraded = Some(why);
                    break;
                }
            }
            regions.push(Region {
                file: Arc::new(f),
                seq: 0,
                state: RegionState::Free,
                head: 0,
                live_blocks: 0,
                last_access_ms: 0,
                reads: 0,
                writes: 0,
                header: None,
            });
        }

        // Region headers: which generation each file holds.
        let mut max_seq = 0;
        let mut valid = vec![false; regions.len()];
        for (i, r) in regions.iter_mut().enumerate() {
            let b = run_sync(
                engine.as_ref(),
                IoKind::Read,
                r.file.clone(),
                header_offset(region_bytes),
                IoBuf::aligned(HEADER_BYTES as usize),
            );
            if let Ok(b) = b {
                if let Ok(h) = RegionHeader::decode(b.as_slice()) {
                    if h.instance == meta.instance
                        && h.region as usize == i
                        && h.region_bytes == region_bytes
                    {
                        r.seq = h.seq;
                        r.last_access_ms = h.created_unix_ms;
                        valid[i] = true;
                        max_seq = max_seq.max(h.seq);
                    }
                }
            }
        }

        // Catalog → index, dropping whatever does not match the regions.
        let mut st = State {
            index: HashMap::default(),
            per_ns: HashMap::default(),
            owners: HashMap::default(),
            tenant_bytes: HashMap::default(),
            tenant_pending: HashMap::default(),
            regions,
            active: None,
            next_seq: max_seq + 1,
            used_bytes: 0,
            degraded: degraded.clone(),
            retry_at: None,
            reduced: degraded,
            next: None,
            touched: Vec::new(),
            in_flight: HashMap::default(),
            journal: Journal::off(),
        };
        let owners = catalog.owners()?;
        for (ns, tenant) in &owners {
            st.adopt(*ns, tenant);
        }
        let mut drop = Vec::new();
        catalog.scan_blocks(|ns, key, rec| {
            let ok = rec.as_ref().ok().filter(|r| {
                (r.region as usize) < st.regions.len()
                    && valid[r.region as usize]
                    && st.regions[r.region as usize].seq == r.seq
                    && r.fits(region_bytes)
            });
            match ok {
                Some(r) => {
                    let reg = &mut st.regions[r.region as usize];
                    reg.head = reg.head.max(r.offset + align_up(r.len));
                    reg.last_access_ms = reg.last_access_ms.max(r.last_unix_ms);
                    st.insert(ns, key, Loc::from(r));
                }
                None => {
                    let (reg, off) = rec.map(|r| (r.region, r.offset)).unwrap_or((u32::MAX, 0));
                    drop.push((ns, key, reg, off));
                }
            }
        })?;
        let mut stray = Vec::new();
        catalog.scan_region_index(|r, o, v| {
            let keep = v
                .and_then(|k| st.index.get(&k))
                .is_some_and(|l| l.region == r && l.offset == o);
            if !keep {
                stray.push((r, o));
            }
        })?;
        if !drop.is_empty() {
            tracing::warn!(
                blocks = drop.len(),
                "dropped catalog entries that do not match their region (torn or reclaimed)"
            );
            catalog.delete_blocks(&drop)?;
        }
        catalog.delete_region_entries(&stray)?;
        let ownerless: Vec<NamespaceId> = owners
            .iter()
            .map(|(ns, _)| *ns)
            .filter(|ns| !st.per_ns.contains_key(ns))
            .collect();
        for ns in &ownerless {
            st.owners.remove(ns);
        }
        catalog.delete_owners(&ownerless)?;
        let lost = catalog.lost_at_open();
        if lost > 0 {
            tracing::warn!(
                writes = lost,
                blocks_about = lost / 2,
                "the disk catalog came back without its last synced writes (its write-ahead \
                 log was truncated or damaged): those blocks are misses now; the space they \
                 used is reclaimed with their regions"
            );
        }

        for (i, r) in st.regions.iter_mut().enumerate() {
            if !valid[i] {
                continue;
            }
            if r.seq == max_seq && max_seq > 0 {
                r.state = RegionState::Active;
                st.active = Some(i as u32);
            } else if r.live_blocks > 0 {
                r.state = RegionState::Sealed;
            }
        }
        tracing::info!(
            path = %root.display(),
            engine = engine.name(),
            direct_io = direct,
            regions = st.regions.len(),
            blocks = st.index.len(),
            used_bytes = st.used_bytes,
            "disk tier open"
        );
        let admission = Admission::new(cfg.admission, cfg.admission_min_frequency, 1 << 20);
        let counters = Counters::default();
        counters
            .dropped_at_start
            .store(drop.len() as u64, Ordering::Relaxed);
        Ok(DiskTier {
            cfg: cfg.clone(),
            engine,
            catalog,
            instance: meta.instance,
            direct,
            regions_dir,
            state: Mutex::new(st),
            admission: Mutex::new(admission),
            counters,
            rates: Mutex::new(Rates {
                at: Instant::now(),
                read: 0,
                write: 0,
                read_bps: 0,
                write_bps: 0,
            }),
        })
    }

    /// The IO engine (callers submit the data IO of their tickets themselves).
    pub fn engine(&self) -> &dyn IoEngine {
        self.engine.as_ref()
    }

    /// Records a sighting of a block for the admission filter.
    pub fn record_sighting(&self, ns: &NamespaceId, key: &BlockKey) {
        if self.cfg.admission == admission::AdmissionPolicy::Always {
            return;
        }
        self.admission.lock().record(ns, key);
    }

    /// Whether a demoted block should be written; counts a rejection when not.
    pub fn admit(&self, ns: &NamespaceId, key: &BlockKey) -> bool {
        let ok = self.admission.lock().admit(ns, key);
        if !ok {
            self.counters
                .admission_rejections
                .fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// For each key, whether the tier holds it.
    pub fn presence(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Vec<bool> {
        let s = self.state.lock();
        keys.iter()
            .map(|k| s.index.contains_key(&(*ns, *k)))
            .collect()
    }

    /// Starts a read of a block: where it is, and a hold on its region so the region is not
    /// reclaimed under the read. `None` (a counted miss) when the tier does not hold it.
    pub fn begin_read(&self, ns: &NamespaceId, key: &BlockKey) -> Option<ReadTicket> {
        let mut s = self.state.lock();
        let Some(loc) = s.index.get(&(*ns, *key)).copied() else {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let gen = s.start_io((*ns, *key));
        let r = &mut s.regions[loc.region as usize];
        r.reads += 1;
        Some(ReadTicket {
            file: r.file.clone(),
            region: loc.region,
            offset: loc.offset,
            len: loc.len,
            checksum: loc.checksum,
            gen,
        })
    }

    /// Ends a read started with [`begin_read`](Self::begin_read). Returns false when the
    /// block was deleted while the read was in flight: the bytes must then not be served or
    /// promoted (it counts as a miss).
    pub fn end_read(
        &self,
        ns: &NamespaceId,
        key: &BlockKey,
        t: &ReadTicket,
        outcome: ReadOutcome,
    ) -> bool {
        let now = unix_ms();
        let mut s = self.state.lock();
        let valid = s.end_io(&(*ns, *key), t.gen);
        let outcome = match outcome {
            ReadOutcome::Verified if !valid => ReadOutcome::Abandoned,
            o => o,
        };
        if let Some(r) = s.regions.get_mut(t.region as usize) {
            r.reads = r.reads.saturating_sub(1);
            if outcome == ReadOutcome::Verified {
                r.last_access_ms = now;
            }
        }
        let here = s
            .index
            .get(&(*ns, *key))
            .is_some_and(|l| l.region == t.region && l.offset == t.offset);
        match outcome {
            ReadOutcome::Verified => {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                self.counters.read_bytes.fetch_add(t.len, Ordering::Relaxed);
                if let Some(l) = s.index.get_mut(&(*ns, *key)).filter(|_| here) {
                    l.hits = l.hits.saturating_add(1);
                    l.last_unix_ms = now;
                    // Persisted later in one batch (flush_touches): access statistics are
                    // advisory, and a RocksDB write per read would sit on the GET's path.
                    if s.touched.len() < MAX_TOUCHED {
                        s.touched.push((*ns, *key));
                    }
                }
            }
            ReadOutcome::Corrupt => {
                self.counters
                    .checksum_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(ns = %ns, key = %key, region = t.region, offset = t.offset,
                    "disk block failed its checksum; dropped (served as a miss)");
                if here {
                    self.remove_locked(&mut s, ns, std::slice::from_ref(key));
                }
            }
            ReadOutcome::Failed => {
                self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
            }
            ReadOutcome::Abandoned => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
            }
        }
        valid
    }

    /// Removes blocks of one namespace from the index and the catalog; for each key, whether
    /// the tier held it.
    fn remove_locked(&self, s: &mut State, ns: &NamespaceId, keys: &[BlockKey]) -> Vec<bool> {
        let mut gone = Vec::new();
        let held = keys
            .iter()
            .map(|k| match s.remove(&(*ns, *k)) {
                Some(l) => {
                    gone.push((*ns, *k, l.region, l.offset));
                    true
                }
                None => false,
            })
            .collect();
        if let Err(e) = self.catalog.delete_blocks(&gone) {
            tracing::warn!(error = %e, "cannot delete blocks from the disk catalog");
        }
        held
    }

    /// Deletes blocks; for each key, whether the tier held it. Reads and writes of these
    /// blocks still in flight are voided (see [`end_read`](Self::end_read) and
    /// [`end_writes`](Self::end_writes)).
    pub fn delete(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Vec<bool> {
        let mut s = self.state.lock();
        for k in keys {
            s.void_ios(&(*ns, *k));
        }
        self.remove_locked(&mut s, ns, keys)
    }

    /// Grants space for a block of `len` bytes of namespace `ns`, which counts against
    /// `tenant` (the base of the namespace's tenant). Blocks of regions reclaimed to make room,
    /// and the tenant's own least recently used blocks when it is at
    /// `disk.max_bytes_per_tenant`, are appended to `reclaimed` (their other copies no longer
    /// have a disk copy).
    pub fn begin_write(
        &self,
        ns: &NamespaceId,
        tenant: &str,
        key: &BlockKey,
        len: u64,
        reclaimed: &mut Vec<(NamespaceId, BlockKey)>,
    ) -> Result<WriteTicket, WriteSkip> {
        let mut s = self.state.lock();
        if s.index.contains_key(&(*ns, *key)) {
            return Err(WriteSkip::Stored);
        }
        if let Some(t) = s.retry_at {
            if Instant::now() < t {
                return Err(WriteSkip::Degraded);
            }
            s.retry_at = None;
        }
        let need = align_up(len);
        self.own(&mut s, ns, tenant);
        self.keep_tenant_under_quota(&mut s, tenant, need, reclaimed)?;
        let region_bytes = self.cfg.region_bytes.0;
        let data_end = header_offset(region_bytes);
        loop {
            if let Some(a) = s.active {
                let r = &mut s.regions[a as usize];
                if r.head + need <= data_end {
                    let offset = r.head;
                    r.head += need;
                    r.writes += 1;
                    let half_full = r.head > data_end / 2;
                    let (file, seq) = (r.file.clone(), r.seq);
                    let tenant = s.owners.get(ns).cloned().unwrap_or_else(|| tenant.into());
                    count(&mut s.tenant_pending, &tenant, need, true);
                    let t = WriteTicket {
                        file,
                        region: a,
                        seq,
                        offset,
                        gen: s.start_io((*ns, *key)),
                        tenant,
                        reserved: need,
                    };
                    // Past half of the active region, start the next one (its header write
                    // then has half a region's time to finish).
                    if s.next.is_none() && half_full {
                        self.prepare_next(&mut s, reclaimed);
                    }
                    return Ok(t);
                }
                r.state = RegionState::Sealed;
                s.active = None;
            }
            let p = match s.next.take() {
                Some(p) => p,
                None => match self.pick_region(&mut s, reclaimed)? {
                    Some(i) => self.start_region(&mut s, i),
                    None => return Err(WriteSkip::Busy),
                },
            };
            self.activate(&mut s, p)?;
        }
    }

    /// Notes (and records in the catalog) which tenant `ns` counts against.
    fn own(&self, s: &mut State, ns: &NamespaceId, tenant: &str) {
        if s.adopt(*ns, tenant) {
            if let Err(e) = self.catalog.put_owner(ns, tenant) {
                tracing::warn!(error = %e, "cannot record a namespace's tenant in the disk catalog");
            }
        }
    }

    /// Makes room for `need` more bytes of `tenant` within `disk.max_bytes_per_tenant`: its
    /// own least recently used blocks go (down to a sixteenth of the quota, or one block,
    /// below it, so the next writes need no scan), never another tenant's; its writes in
    /// flight count. A block larger than the quota is refused; one that only the writes in
    /// flight leave no room for waits for them (`Busy`).
    fn keep_tenant_under_quota(
        &self,
        s: &mut State,
        tenant: &str,
        need: u64,
        reclaimed: &mut Vec<(NamespaceId, BlockKey)>,
    ) -> Result<(), WriteSkip> {
        let cap = self.cfg.max_bytes_per_tenant.0;
        if cap == 0 {
            return Ok(());
        }
        if need > cap {
            return Err(WriteSkip::Quota);
        }
        let held = s.tenant_bytes.get(tenant).copied().unwrap_or(0);
        let pending = s.tenant_pending.get(tenant).copied().unwrap_or(0);
        if held + pending + need <= cap {
            return Ok(());
        }
        // Room for this write and the ones in flight, and some slack so that the next
        // writes need no scan.
        let slack = (cap / 16).max(need).min(cap - need);
        let target = (cap - need - slack).saturating_sub(pending);
        let victims = s.tenant_victims(tenant, target);
        let mut gone = Vec::with_capacity(victims.len());
        for k in victims {
            s.void_ios(&k);
            if let Some(l) = s.remove(&k) {
                gone.push((k.0, k.1, l.region, l.offset));
                reclaimed.push(k);
            }
        }
        if let Err(e) = self.catalog.delete_blocks(&gone) {
            tracing::warn!(error = %e, "cannot delete blocks from the disk catalog");
        }
        self.counters
            .quota_evictions
            .fetch_add(gone.len() as u64, Ordering::Relaxed);
        tracing::debug!(
            blocks = gone.len(),
            "tenant at its disk quota: its oldest blocks went"
        );
        let held = s.tenant_bytes.get(tenant).copied().unwrap_or(0);
        if held + pending + need > cap {
            // Its writes in flight fill the rest: this one waits for them.
            return Err(WriteSkip::Busy);
        }
        Ok(())
    }

    /// A region to write next: a free one, or a reclaimed victim; `None` when every region is
    /// busy.
    fn pick_region(
        &self,
        s: &mut State,
        reclaimed: &mut Vec<(NamespaceId, BlockKey)>,
    ) -> Result<Option<usize>, WriteSkip> {
        if let Some(i) = s.regions.iter().position(|r| r.state == RegionState::Free) {
            return Ok(Some(i));
        }
        let Some(v) = self.victim(s) else {
            return Ok(None);
        };
        self.reclaim_locked(s, v, reclaimed).map_err(|e| {
            self.degrade(s, format!("cannot reclaim region {v}: {e}"));
            WriteSkip::Degraded
        })?;
        Ok(Some(v))
    }

    /// Starts the next region ahead of need, so its header write is long done when the
    /// active region fills (a synchronous header write would stall a full IO queue).
    fn prepare_next(&self, s: &mut State, reclaimed: &mut Vec<(NamespaceId, BlockKey)>) {
        if let Ok(Some(i)) = self.pick_region(s, reclaimed) {
            let p = self.start_region(s, i);
            s.next = Some(p);
        }
    }

    /// Gives region `i` a new generation and writes its header in the background.
    fn start_region(&self, s: &mut State, i: usize) -> Prepared {
        let seq = s.next_seq;
        s.next_seq += 1;
        let h = RegionHeader {
            region: i as u32,
            seq,
            region_bytes: self.cfg.region_bytes.0,
            instance: self.instance,
            created_unix_ms: unix_ms(),
        };
        let mut buf = IoBuf::aligned(HEADER_BYTES as usize);
        buf.as_mut_slice().copy_from_slice(&h.encode());
        s.regions[i].state = RegionState::Preparing;
        s.regions[i].header = None;
        let done: HeaderDone = Arc::new((Mutex::new(None), Condvar::new()));
        let d2 = done.clone();
        let op = IoOp {
            kind: IoKind::Write,
            file: s.regions[i].file.clone(),
            offset: header_offset(self.cfg.region_bytes.0),
            buf,
            done: Box::new(move |_b, r| {
                *d2.0.lock() = Some(r);
                d2.1.notify_all();
            }),
        };
        // On failure the callback records the error.
        let _ = self.engine.submit(op);
        Prepared {
            region: i,
            seq,
            created_unix_ms: h.created_unix_ms,
            done,
        }
    }

    /// Waits for a started region's header and makes it the active region.
    fn activate(&self, s: &mut State, p: Prepared) -> Result<(), WriteSkip> {
        // A header already known to have failed stops here; one still in flight is checked
        // by end_writes before any block of the region is cataloged, so data writes need not
        // wait for it (waiting would drain a full IO queue at every region switch).
        let failed = p
            .done
            .0
            .lock()
            .as_ref()
            .and_then(|r| r.as_ref().err().map(|e| e.to_string()));
        if let Some(e) = failed {
            self.header_failed(s, p.region, &e);
            return Err(WriteSkip::Degraded);
        }
        let r = &mut s.regions[p.region];
        r.seq = p.seq;
        r.state = RegionState::Active;
        r.head = 0;
        r.live_blocks = 0;
        r.last_access_ms = p.created_unix_ms;
        r.header = Some(p.done);
        s.active = Some(p.region as u32);
        Ok(())
    }

    fn header_failed(&self, s: &mut State, region: usize, e: &str) {
        s.regions[region].state = RegionState::Failed;
        s.regions[region].header = None;
        if s.active == Some(region as u32) {
            s.active = None;
        }
        self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
        self.degrade(
            s,
            format!("cannot write the header of region {region}: {e}"),
        );
    }

    /// Waits for a region's pending header write; true when it is on disk.
    fn header_ok(&self, s: &mut State, region: usize) -> bool {
        let Some(done) = s.regions[region].header.clone() else {
            return s.regions[region].state != RegionState::Failed;
        };
        let r = {
            let mut g = done.0.lock();
            while g.is_none() {
                done.1.wait(&mut g);
            }
            g.as_ref()
                .map(|r| r.as_ref().map(|_| ()).map_err(|e| e.to_string()))
                .unwrap_or(Ok(()))
        };
        match r {
            Ok(()) => {
                s.regions[region].header = None;
                true
            }
            Err(e) => {
                self.header_failed(s, region, &e);
                false
            }
        }
    }

    fn victim(&self, s: &State) -> Option<usize> {
        let idle = s
            .regions
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state == RegionState::Sealed && r.reads == 0 && r.writes == 0);
        match self.cfg.reclaim {
            ReclaimPolicy::Fifo => idle.min_by_key(|(_, r)| r.seq),
            ReclaimPolicy::Lru => idle.min_by_key(|(_, r)| (r.last_access_ms, r.seq)),
        }
        .map(|(i, _)| i)
    }

    fn reclaim_locked(
        &self,
        s: &mut State,
        v: usize,
        reclaimed: &mut Vec<(NamespaceId, BlockKey)>,
    ) -> Result<(), CatalogError> {
        let gone = self.catalog.reclaim(v as u32)?;
        let mut n = 0u64;
        for k in &gone {
            if s.index.get(k).is_some_and(|l| l.region as usize == v) {
                s.remove(k);
                reclaimed.push(*k);
                n += 1;
            }
        }
        let r = &mut s.regions[v];
        r.state = RegionState::Free;
        r.live_blocks = 0;
        self.counters.reclaims.fetch_add(1, Ordering::Relaxed);
        self.counters
            .reclaimed_blocks
            .fetch_add(n, Ordering::Relaxed);
        tracing::debug!(region = v, blocks = n, "reclaimed a region");
        Ok(())
    }

    fn degrade(&self, s: &mut State, why: String) {
        if s.degraded.as_deref() != Some(why.as_str()) {
            tracing::error!(
                "disk tier degraded: {why}; DRAM keeps serving, disk writes pause for {} s",
                WRITE_BACKOFF.as_secs()
            );
        }
        s.degraded = Some(why);
        s.retry_at = Some(Instant::now() + WRITE_BACKOFF);
    }

    /// Ends writes granted by [`begin_write`](Self::begin_write): successful ones become
    /// visible (catalog first, then the index); failed ones give their space up. Returns, per
    /// write, whether the block is now on disk.
    pub fn end_writes(&self, done: &[WriteDone]) -> Vec<bool> {
        let now = unix_ms();
        let mut s = self.state.lock();
        let mut records = Vec::new();
        let mut ok = vec![false; done.len()];
        for (i, w) in done.iter().enumerate() {
            let (ns, key, len, checksum, t, r) =
                (&w.ns, &w.key, &w.len, &w.checksum, &w.ticket, &w.result);
            if let Some(reg) = s.regions.get_mut(t.region as usize) {
                reg.writes = reg.writes.saturating_sub(1);
            }
            count(&mut s.tenant_pending, &t.tenant, t.reserved, false);
            // Deleted while the write was in flight: its space is dead, the block not stored.
            let valid = s.end_io(&(*ns, *key), t.gen);
            match r {
                Ok(()) => {
                    // A region reclaimed while the write was in flight cannot be (reclaim
                    // skips regions with writes), but check the generation anyway; and the
                    // region's header must be on disk before anything in it is cataloged.
                    if !valid
                        || s.regions[t.region as usize].seq != t.seq
                        || s.index.contains_key(&(*ns, *key))
                        || !self.header_ok(&mut s, t.region as usize)
                    {
                        continue;
                    }
                    let rec = BlockRecord {
                        region: t.region,
                        seq: t.seq,
                        offset: t.offset,
                        len: *len,
                        checksum: *checksum,
                        stored_unix_ms: now,
                        hits: 0,
                        last_unix_ms: now,
                    };
                    records.push((i, *ns, *key, rec));
                }
                Err(e) => {
                    self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
                    let why = format!("write to region {} failed: {e}", t.region);
                    // The rest of this region may be unwritable (a sparse file on a full
                    // filesystem): move on to another region.
                    if s.active == Some(t.region) {
                        s.regions[t.region as usize].state = RegionState::Sealed;
                        s.active = None;
                    }
                    self.degrade(&mut s, why);
                }
            }
        }
        if records.is_empty() {
            return ok;
        }
        let batch: Vec<_> = records.iter().map(|(_, n, k, r)| (*n, *k, *r)).collect();
        if let Err(e) = self.catalog.put_blocks(&batch) {
            self.degrade(&mut s, format!("cannot record written blocks: {e}"));
            return ok;
        }
        for (i, ns, key, rec) in records {
            s.insert(ns, key, Loc::from(&rec));
            self.counters.writes.fetch_add(1, Ordering::Relaxed);
            self.counters
                .write_bytes
                .fetch_add(rec.len, Ordering::Relaxed);
            ok[i] = true;
        }
        if s.retry_at.is_none() {
            s.degraded = None;
        }
        ok
    }

    /// Starts recording residency changes (at most `cap` between two
    /// [`take_changes`](Self::take_changes)); blocks loaded at start are not changes.
    pub fn record_changes(&self, cap: usize) {
        self.state.lock().journal = Journal::new(cap);
    }

    /// Residency changes since the last call.
    pub fn take_changes(&self) -> Taken {
        self.state.lock().journal.take()
    }

    /// A page of the blocks on disk, in key order after `after` (see
    /// [`Catalog::block_keys`]).
    pub fn block_keys(
        &self,
        after: Option<(NamespaceId, BlockKey)>,
        limit: usize,
    ) -> Result<Vec<(NamespaceId, BlockKey)>, DiskError> {
        Ok(self.catalog.block_keys(after, limit)?)
    }

    /// Blocks of `ns` on disk, and the space they take.
    pub fn ns_usage(&self, ns: &NamespaceId) -> (u64, u64) {
        self.state
            .lock()
            .per_ns
            .get(ns)
            .map_or((0, 0), |u| (u.blocks, u.bytes))
    }

    /// Space the blocks counting against `tenant` (a base) take.
    pub fn tenant_bytes(&self, tenant: &str) -> u64 {
        self.state
            .lock()
            .tenant_bytes
            .get(tenant)
            .copied()
            .unwrap_or(0)
    }

    /// Namespaces with blocks on disk.
    pub fn namespaces(&self) -> Vec<NamespaceId> {
        let mut v: Vec<_> = self.state.lock().per_ns.keys().copied().collect();
        v.sort();
        v
    }

    /// The disk copy of a block: (length, checksum, hits, age ms, idle ms).
    pub fn inspect(&self, ns: &NamespaceId, key: &BlockKey) -> Option<(u64, u64, u32, u64, u64)> {
        let now = unix_ms();
        self.state.lock().index.get(&(*ns, *key)).map(|l| {
            (
                l.len,
                l.checksum,
                l.hits,
                now.saturating_sub(l.stored_unix_ms),
                now.saturating_sub(l.last_unix_ms),
            )
        })
    }

    /// Adjusts the count of blocks queued by a drain.
    pub fn drain_pending(&self) -> &AtomicU64 {
        &self.counters.drain_pending
    }

    /// Blocks queued by a warm and not yet read, and blocks warmed since start.
    pub fn warm_counters(&self) -> (&AtomicU64, &AtomicU64) {
        (&self.counters.warm_pending, &self.counters.warmed)
    }

    /// The blocks of `ns` on disk with their lengths, most recently read or written first.
    pub fn blocks_by_recency(&self, ns: &NamespaceId) -> Vec<(BlockKey, u64)> {
        let mut v: Vec<(u64, BlockKey, u64)> = self
            .state
            .lock()
            .index
            .iter()
            .filter(|((n, _), _)| n == ns)
            .map(|((_, k), l)| (l.last_unix_ms.max(l.stored_unix_ms), *k, l.len))
            .collect();
        v.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        v.into_iter().map(|(_, k, len)| (k, len)).collect()
    }

    /// Updates the read/write rates (call about once a second).
    pub fn sample_rates(&self) {
        let mut r = self.rates.lock();
        let dt = r.at.elapsed().as_secs_f64();
        if dt < 0.5 {
            return;
        }
        let rd = self.counters.read_bytes.load(Ordering::Relaxed);
        let wr = self.counters.write_bytes.load(Ordering::Relaxed);
        r.read_bps = ((rd - r.read) as f64 / dt) as u64;
        r.write_bps = ((wr - r.write) as f64 / dt) as u64;
        r.read = rd;
        r.write = wr;
        r.at = Instant::now();
    }

    /// Persists the access statistics of blocks read since the last call (one batch).
    pub fn flush_touches(&self) {
        let recs: Vec<(NamespaceId, BlockKey, BlockRecord)> = {
            let mut s = self.state.lock();
            let touched = std::mem::take(&mut s.touched);
            touched
                .into_iter()
                .filter_map(|k| {
                    let l = s.index.get(&k)?;
                    let seq = s.regions[l.region as usize].seq;
                    Some((k.0, k.1, record(l, seq)))
                })
                .collect()
        };
        if recs.is_empty() {
            return;
        }
        if let Err(e) = self.catalog.touch_many(&recs) {
            tracing::warn!(error = %e, "cannot record disk hits");
        }
    }

    /// Flushes the catalog's log (clean shutdown).
    pub fn flush(&self) {
        self.flush_touches();
        if let Err(e) = self.catalog.flush() {
            tracing::warn!(error = %e, "cannot flush the disk catalog");
        }
    }

    /// Status for `kvd-ctl status`.
    pub fn report(&self) -> DiskReport {
        let s = self.state.lock();
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let r = self.rates.lock();
        DiskReport {
            path: self.cfg.path.display().to_string(),
            engine: self.engine.name().into(),
            direct_io: self.direct,
            capacity_bytes: s.regions.len() as u64 * self.cfg.region_bytes.0,
            used_bytes: s.used_bytes,
            regions: s.regions.len() as u32,
            free_regions: s
                .regions
                .iter()
                .filter(|r| r.state == RegionState::Free)
                .count() as u32,
            blocks: s.index.len() as u64,
            hits: l(&c.hits),
            misses: l(&c.misses),
            read_bytes: l(&c.read_bytes),
            write_bytes: l(&c.write_bytes),
            read_bytes_per_s: r.read_bps,
            write_bytes_per_s: r.write_bps,
            writes: l(&c.writes),
            admission_rejections: l(&c.admission_rejections),
            reclaims: l(&c.reclaims),
            reclaimed_blocks: l(&c.reclaimed_blocks),
            quota_evictions: l(&c.quota_evictions),
            checksum_failures: l(&c.checksum_failures),
            io_errors: l(&c.io_errors),
            dropped_at_start: l(&c.dropped_at_start),
            drain_pending: l(&c.drain_pending),
            warm_pending: l(&c.warm_pending),
            warmed: l(&c.warmed),
            degraded: s
                .degraded
                .clone()
                .or_else(|| s.reduced.clone())
                .unwrap_or_default(),
        }
    }

    /// Directory of the region files.
    pub fn regions_dir(&self) -> &Path {
        &self.regions_dir
    }

    /// The catalog (the S3 tier keeps its segment records there too).
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }
}

fn record(l: &Loc, seq: u64) -> BlockRecord {
    BlockRecord {
        region: l.region,
        seq,
        offset: l.offset,
        len: l.len,
        checksum: l.checksum,
        stored_unix_ms: l.stored_unix_ms,
        hits: l.hits,
        last_unix_ms: l.last_unix_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ByteSize;
    use twox_hash::XxHash3_64;

    fn cfg(dir: &Path, regions: u64, engine: DiskEngine) -> DiskConfig {
        DiskConfig {
            capacity_bytes: ByteSize(regions * (64 << 10)),
            path: dir.to_owned(),
            region_bytes: ByteSize(64 << 10),
            engine,
            direct_io: true,
            io_depth: 4,
            preallocate: true,
            reclaim: ReclaimPolicy::Fifo,
            admission: admission::AdmissionPolicy::Always,
            admission_min_frequency: 1,
            demote_watermark: 0.0,
            catalog_sync_ms: 0,
            max_bytes_per_tenant: ByteSize(0),
        }
    }

    fn key(i: u8) -> BlockKey {
        BlockKey([i; 32])
    }

    const NS: NamespaceId = NamespaceId([7; 16]);

    /// Writes `len` bytes of value `i` where `ticket` says; the result for end_writes.
    fn write_data(t: &DiskTier, ticket: WriteTicket, i: u8, len: u64) -> WriteDone {
        write_data_of(t, NS, ticket, i, len)
    }

    /// [`write_data`] for a block of `ns`.
    fn write_data_of(
        t: &DiskTier,
        ns: NamespaceId,
        ticket: WriteTicket,
        i: u8,
        len: u64,
    ) -> WriteDone {
        let mut buf = IoBuf::aligned(align_up(len) as usize);
        buf.as_mut_slice()[..len as usize].fill(i);
        let sum = XxHash3_64::oneshot(&buf.as_slice()[..len as usize]);
        let r = run_sync(
            t.engine(),
            IoKind::Write,
            ticket.file.clone(),
            ticket.offset,
            buf,
        )
        .map(|_| ());
        WriteDone {
            ns,
            key: key(i),
            len,
            checksum: sum,
            ticket,
            result: r,
        }
    }

    /// Writes one block of `len` bytes of value `i` through the tier's own API.
    fn write(t: &DiskTier, i: u8, len: u64) -> Vec<(NamespaceId, BlockKey)> {
        write_as(t, NS, "", i, len)
    }

    /// [`write`] for a block of `ns`, counting against `tenant`.
    fn write_as(
        t: &DiskTier,
        ns: NamespaceId,
        tenant: &str,
        i: u8,
        len: u64,
    ) -> Vec<(NamespaceId, BlockKey)> {
        let mut reclaimed = Vec::new();
        let ticket = t
            .begin_write(&ns, tenant, &key(i), len, &mut reclaimed)
            .unwrap();
        let done = write_data_of(t, ns, ticket, i, len);
        assert_eq!(t.end_writes(&[done]), vec![true]);
        reclaimed
    }

    fn read(t: &DiskTier, i: u8) -> Option<Vec<u8>> {
        let tk = t.begin_read(&NS, &key(i))?;
        let buf = run_sync(
            t.engine(),
            IoKind::Read,
            tk.file.clone(),
            tk.offset,
            IoBuf::aligned(align_up(tk.len) as usize),
        )
        .ok()?;
        let bytes = buf.as_slice()[..tk.len as usize].to_vec();
        let ok = XxHash3_64::oneshot(&bytes) == tk.checksum;
        t.end_read(
            &NS,
            &key(i),
            &tk,
            if ok {
                ReadOutcome::Verified
            } else {
                ReadOutcome::Corrupt
            },
        );
        ok.then_some(bytes)
    }

    #[test]
    fn fifo_reclaim_drops_the_oldest_region_and_survives_reopen() {
        for engine in [DiskEngine::Psync, DiskEngine::IoUring] {
            let dir = tempfile::tempdir().unwrap();
            let c = cfg(dir.path(), 3, engine);
            {
                let t = DiskTier::open(&c).unwrap();
                // 64 KiB regions hold 3 blocks of 20000 bytes (5 pages each) after the header.
                // The next region is started once the active one is half full, so the oldest
                // region is reclaimed while the last one fills.
                for i in 0..7 {
                    let gone = write(&t, i, 20_000);
                    assert!(gone.is_empty(), "block {i}: reclaim while regions are free");
                }
                let mut gone = Vec::new();
                for i in 7..10 {
                    gone.extend(write(&t, i, 20_000));
                }
                gone.sort();
                assert_eq!(gone, vec![(NS, key(0)), (NS, key(1)), (NS, key(2))]);
                assert!(read(&t, 0).is_none());
                assert_eq!(read(&t, 9), Some(vec![9; 20_000]));
                let r = t.report();
                assert_eq!((r.blocks, r.reclaims, r.reclaimed_blocks), (7, 1, 3));
            }
            let t = DiskTier::open(&c).unwrap();
            assert_eq!(t.report().blocks, 7, "{engine:?}");
            for i in 3..10 {
                assert_eq!(read(&t, i), Some(vec![i; 20_000]), "block {i} after reopen");
            }
            // Appends continue after the last block, not over it.
            write(&t, 20, 100);
            assert_eq!(read(&t, 9), Some(vec![9; 20_000]));
            assert_eq!(read(&t, 20), Some(vec![20; 100]));
        }
    }

    /// A tenant at `disk.max_bytes_per_tenant` loses its own least recently read blocks to
    /// its new ones, never another tenant's; the counts survive a restart.
    #[test]
    fn a_tenant_at_its_quota_evicts_only_its_own_oldest_blocks() {
        const A: NamespaceId = NamespaceId([1; 16]);
        const A2: NamespaceId = NamespaceId([2; 16]);
        const B: NamespaceId = NamespaceId([3; 16]);
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path(), 8, DiskEngine::Psync);
        let block = align_up(20_000);
        c.max_bytes_per_tenant = ByteSize(4 * block);
        {
            let t = DiskTier::open(&c).unwrap();
            for i in 0..2 {
                assert!(write_as(&t, A, "a", i, 20_000).is_empty());
                assert!(write_as(&t, A2, "a", 10 + i, 20_000).is_empty());
            }
            for i in 0..3 {
                assert!(write_as(&t, B, "b", 20 + i, 20_000).is_empty());
            }
            assert_eq!(t.tenant_bytes("a"), 4 * block);
            std::thread::sleep(Duration::from_millis(5));
            let tk = t.begin_read(&A, &key(0)).unwrap();
            t.end_read(&A, &key(0), &tk, ReadOutcome::Verified);
            // Block 0 was read since: blocks 10 and 1 (A2's, then A's) are the oldest; two go
            // so the next writes find room without another scan.
            let mut gone = write_as(&t, A, "a", 5, 20_000);
            gone.sort();
            assert_eq!(gone, vec![(A, key(1)), (A2, key(10))]);
            assert_eq!(t.tenant_bytes("a"), 3 * block);
            assert_eq!(
                t.tenant_bytes("b"),
                3 * block,
                "another tenant keeps everything"
            );
            assert_eq!(t.ns_usage(&A), (2, 2 * block));
            assert_eq!(t.report().quota_evictions, 2);
            let mut reclaimed = Vec::new();
            assert_eq!(
                t.begin_write(&B, "b", &key(30), 5 * block, &mut reclaimed)
                    .unwrap_err(),
                WriteSkip::Quota,
                "a block larger than the quota is refused"
            );
            // Writes in flight count: a fifth block waits for the four granted.
            const C: NamespaceId = NamespaceId([6; 16]);
            let granted: Vec<_> = (40..44)
                .map(|i| {
                    t.begin_write(&C, "c", &key(i), 20_000, &mut reclaimed)
                        .unwrap()
                })
                .collect();
            assert_eq!(
                t.begin_write(&C, "c", &key(44), 20_000, &mut reclaimed)
                    .unwrap_err(),
                WriteSkip::Busy
            );
            let done: Vec<_> = granted
                .into_iter()
                .zip(40..)
                .map(|(g, i)| write_data_of(&t, C, g, i, 20_000))
                .collect();
            assert_eq!(t.end_writes(&done), vec![true; 4]);
            assert!(reclaimed.is_empty());
            assert_eq!(write_as(&t, C, "c", 44, 20_000).len(), 2);
            assert_eq!(t.tenant_bytes("c"), 3 * block);
        }
        let t = DiskTier::open(&c).unwrap();
        assert_eq!(t.tenant_bytes("a"), 3 * block, "owners are in the catalog");
        assert_eq!(t.tenant_bytes("b"), 3 * block);
        assert_eq!(t.ns_usage(&A2), (1, block));
    }

    #[test]
    fn a_corrupted_block_is_a_miss_and_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 2, DiskEngine::Psync);
        let t = DiskTier::open(&c).unwrap();
        write(&t, 1, 5000);
        write(&t, 2, 5000);
        let tk = t.begin_read(&NS, &key(1)).unwrap();
        t.end_read(&NS, &key(1), &tk, ReadOutcome::Abandoned);
        let path = t.regions_dir().join("region-00000.kvd");
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xEE], tk.offset + 17).unwrap();
        assert_eq!(read(&t, 1), None);
        assert_eq!(read(&t, 2), Some(vec![2; 5000]), "its neighbour is intact");
        let r = t.report();
        assert_eq!((r.checksum_failures, r.blocks), (1, 1));
        assert!(!t.presence(&NS, &[key(1)])[0], "dropped after the failure");
    }

    #[test]
    fn a_region_header_from_elsewhere_drops_its_blocks_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 2, DiskEngine::Psync);
        {
            let t = DiskTier::open(&c).unwrap();
            write(&t, 1, 5000);
        }
        let path = dir.path().join("regions/region-00000.kvd");
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0u8; 64], header_offset(c.region_bytes.0))
            .unwrap();
        let t = DiskTier::open(&c).unwrap();
        let r = t.report();
        assert_eq!((r.blocks, r.dropped_at_start), (0, 1));
        assert!(read(&t, 1).is_none());
    }

    /// Writes block `i` with a delete (and, with `rewrite`, a new grant for the same key)
    /// landing while the first write is in flight; what end_writes says of each.
    fn write_racing_a_delete(t: &DiskTier, i: u8, rewrite: bool) -> Vec<bool> {
        let mut reclaimed = Vec::new();
        let first = t
            .begin_write(&NS, "", &key(i), 5000, &mut reclaimed)
            .unwrap();
        assert_eq!(t.delete(&NS, &[key(i)]), vec![false], "not stored yet");
        let second = rewrite.then(|| {
            t.begin_write(&NS, "", &key(i), 5000, &mut reclaimed)
                .unwrap()
        });
        let done: Vec<_> = std::iter::once(first)
            .chain(second)
            .map(|ticket| write_data(t, ticket, i, 5000))
            .collect();
        t.end_writes(&done)
    }

    #[test]
    fn a_delete_voids_writes_and_reads_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let t = DiskTier::open(&cfg(dir.path(), 2, DiskEngine::Psync)).unwrap();
        // A write finishing after the delete is not cataloged.
        assert_eq!(write_racing_a_delete(&t, 1, false), vec![false]);
        assert!(!t.presence(&NS, &[key(1)])[0]);
        // One granted after the delete is a new block and stands.
        assert_eq!(write_racing_a_delete(&t, 2, true), vec![false, true]);
        assert_eq!(read(&t, 2), Some(vec![2; 5000]));
        // A read in flight across a delete is not current: its bytes must not be served.
        write(&t, 3, 5000);
        let tk = t.begin_read(&NS, &key(3)).unwrap();
        assert_eq!(t.delete(&NS, &[key(3)]), vec![true]);
        assert!(!t.end_read(&NS, &key(3), &tk, ReadOutcome::Verified));
        let r = t.report();
        assert_eq!((r.blocks, r.hits), (1, 1), "only block 2, read once");
        // Nothing is left tracked once the IOs ended.
        assert!(t.state.lock().in_flight.is_empty());
        // After a restart the catalog agrees.
        drop(t);
        let t = DiskTier::open(&cfg(dir.path(), 2, DiskEngine::Psync)).unwrap();
        assert_eq!(
            t.presence(&NS, &[key(1), key(2), key(3)]),
            vec![false, true, false]
        );
    }

    use std::os::unix::fs::FileExt;
}
