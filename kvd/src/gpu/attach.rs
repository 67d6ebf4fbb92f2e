//! Daemon-driven transfers: an engine's paged KV buffers mapped into kvd, and the batched
//! copies between them and the DRAM arena that kvd runs itself.
//!
//! Why: with the connector doing the copies, every step costs the engine process CPU time and
//! a staging buffer; with the KV tensors shared (CUDA IPC handles, or sealed memfds for the
//! host stand-in), the engine sends one small frame per step and kvd moves the pages on its
//! own stream, many pages per call (plans from [`kvd_gpu::plan`]). An [`Attachment`] belongs to
//! one control connection: when the engine process dies its socket closes, the connection's
//! attachments drop and every mapping is closed, so no stale IPC mapping outlives the engine
//! (a copy in flight finishes first: it holds the attachment).
//!
//! Saves reserve slots, copy, and commit. Their checksums come from the backend where it can
//! compute them from the engine's pages (CUDA: kvd's checksum kernel, on its own stream beside
//! a copy that leaves the SMs free, so the CPU never reads the bytes); otherwise blocks are
//! committed unsealed and hashed after the reply ([`seal`]), off the engine's critical path,
//! the way ring commits are sealed off the request path. With a T0 pool ([`super::pool`])
//! saved blocks are also copied device to device into it. Loads take a block's pooled copy when
//! there is one (device to device, no checksum: it came straight from an engine's pages), else
//! a DRAM read lease, check size (and checksum when asked and known), copy, and release.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvd_gpu::plan::{block_bytes, block_runs, extent, Layer};
use kvd_gpu::{Backend, DevicePtr, DeviceRun, GpuError, Run, Shared};
use kvd_proto::frame::ErrorCode;
use kvd_proto::gpu::{BlockCode, GpuLayer, GpuShare};
use kvd_proto::{BlockKey, NamespaceId};
use parking_lot::Mutex;
use twox_hash::XxHash3_64;

use crate::alloc::Slot;
use crate::daemon::{Daemon, Namespace, OpError};
use crate::gpu::pool::{Lease as PoolLease, Pool};
use crate::ring_service::SealJob;
use crate::store::{Committed, ReserveError};

/// Blocks per driver call: bounds the slots reserved (and leases held) at once.
const BATCH: usize = 256;

/// Counters of daemon-driven transfers (for stats and metrics).
#[derive(Debug, Default)]
pub struct Counters {
    /// Attachments mapped now.
    pub attachments: AtomicU64,
    /// Blocks saved device → DRAM.
    pub saved_blocks: AtomicU64,
    /// Blocks loaded into engines (a block loaded layer by layer counts once, with its last
    /// layer).
    pub loaded_blocks: AtomicU64,
    /// Bytes copied device → DRAM.
    pub d2h_bytes: AtomicU64,
    /// Bytes copied DRAM → device.
    pub h2d_bytes: AtomicU64,
    /// Transfers the driver failed.
    pub copy_errors: AtomicU64,
    /// Last attach or driver error.
    pub last_error: Mutex<String>,
}

impl Counters {
    fn failed(&self, e: &GpuError) {
        self.copy_errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock() = e.to_string();
    }
}

/// An engine's KV buffers mapped into kvd for one namespace; unmapped when dropped.
pub struct Attachment {
    backend: Arc<dyn Backend>,
    counters: Arc<Counters>,
    pool: Option<Arc<Pool>>,
    ns: Arc<Namespace>,
    imports: Vec<DevicePtr>,
    layers: Vec<Layer>,
    block_bytes: u64,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("imports", &self.imports.len())
            .field("layers", &self.layers.len())
            .field("block_bytes", &self.block_bytes)
            .finish()
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        for &base in &self.imports {
            // SAFETY: `base` came from `import` on this backend and is closed once, here;
            // every copy holds the attachment, so none is running.
            if let Err(e) = unsafe { self.backend.close_import(base) } {
                tracing::warn!(error = %e, "closing an engine KV mapping failed");
            }
        }
        self.counters.attachments.fetch_sub(1, Ordering::Relaxed);
    }
}

fn bad(message: impl Into<String>) -> OpError {
    OpError::new(ErrorCode::BadRequest, message)
}

fn driver_error(counters: &Counters, e: GpuError) -> OpError {
    counters.failed(&e);
    match e {
        GpuError::Invalid(m) => bad(m),
        other => OpError::new(ErrorCode::Internal, other.to_string()),
    }
}

impl Attachment {
    /// Maps the shared allocations (`fds` are the `Fd` shares' descriptors, in order) and
    /// checks that every layer lies inside its allocation.
    pub fn new(
        backend: Arc<dyn Backend>,
        counters: Arc<Counters>,
        pool: Option<Arc<Pool>>,
        ns: Arc<Namespace>,
        shares: &[GpuShare],
        fds: Vec<OwnedFd>,
        layers: &[GpuLayer],
    ) -> Result<Attachment, OpError> {
        let want_fds = shares
            .iter()
            .filter(|s| matches!(s, GpuShare::Fd { .. }))
            .count();
        if want_fds != fds.len() {
            return Err(bad(format!(
                "{want_fds} shares are file descriptors but {} descriptors came with the frame",
                fds.len()
            )));
        }
        if layers.is_empty() {
            return Err(bad("an attachment needs at least one layer buffer"));
        }
        counters.attachments.fetch_add(1, Ordering::Relaxed);
        // From here on, dropping `a` closes whatever was mapped so far.
        let mut a = Attachment {
            backend: backend.clone(),
            counters: counters.clone(),
            pool,
            ns,
            imports: Vec::with_capacity(shares.len()),
            layers: Vec::with_capacity(layers.len()),
            block_bytes: 0,
        };
        let mut spans = Vec::with_capacity(shares.len());
        let mut fds = fds.into_iter();
        for (i, s) in shares.iter().enumerate() {
            let fd;
            let shared = match s {
                GpuShare::Fd { len } => {
                    fd = fds.next().ok_or_else(|| bad("descriptor missing"))?;
                    Shared::Fd {
                        fd: fd.as_fd(),
                        len: *len,
                    }
                }
                GpuShare::CudaIpc(h) => Shared::CudaIpc(*h),
            };
            let m = backend.import(shared).map_err(|e| {
                counters.failed(&e);
                bad(format!("cannot map shared allocation {i}: {e}"))
            })?;
            a.imports.push(m.base);
            spans.push(m);
        }
        for (i, l) in layers.iter().enumerate() {
            let span = spans
                .get(l.share as usize)
                .ok_or_else(|| bad(format!("layer {i} names share {}", l.share)))?;
            let end = extent(l.pages, l.stride, l.page).and_then(|o| o.checked_add(l.offset));
            let fits = end.is_some_and(|e| e <= span.len);
            if l.page == 0 || l.stride < l.page || !fits {
                return Err(bad(format!(
                    "layer {i}: {} pages of {} B every {} B from offset {} do not fit the {} B \
                     allocation it names",
                    l.pages, l.page, l.stride, l.offset, span.len
                )));
            }
            a.layers.push(Layer {
                base: span.base + l.offset,
                stride: l.stride,
                page: l.page,
                pages: l.pages,
            });
        }
        a.block_bytes = block_bytes(&a.layers);
        let max = a.ns.store.lock().max_block();
        if a.block_bytes > max {
            return Err(OpError::new(
                ErrorCode::TooLarge,
                format!(
                    "a block of these layers holds {} bytes; dram.max_block_bytes is {max}",
                    a.block_bytes
                ),
            ));
        }
        Ok(a)
    }

    /// Bytes of one block (one page of every layer).
    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    /// The namespace the blocks belong to.
    pub fn namespace(&self) -> &Arc<Namespace> {
        &self.ns
    }

    /// Copies page `pages[i]` of every layer into a new block `keys[i]`. Returns a code per
    /// key and the committed entries, whose checksums are still to be [`seal`]ed.
    pub fn save(
        &self,
        daemon: &Daemon,
        keys: &[BlockKey],
        pages: &[u32],
    ) -> Result<(Vec<BlockCode>, Vec<u32>), OpError> {
        if keys.len() != pages.len() {
            return Err(bad(format!(
                "{} keys but {} pages",
                keys.len(),
                pages.len()
            )));
        }
        let (len, ns) = (self.block_bytes, &self.ns);
        let mut codes = Vec::with_capacity(keys.len());
        let mut committed = Vec::new();
        for (ks, ps) in keys.chunks(BATCH).zip(pages.chunks(BATCH)) {
            let mut held = Reserved {
                ns,
                slots: Vec::with_capacity(ks.len()),
            };
            let (mut ids, mut hosts) = (Vec::new(), Vec::new());
            let first = codes.len();
            for (k, &p) in ks.iter().zip(ps) {
                let reserved = ns.store.lock().reserve(k, len);
                let code = match reserved {
                    Ok(slot) => {
                        // SAFETY: the slot is reserved by this call and uncommitted, so nobody
                        // else reads or writes it until it is committed or aborted (by `held`).
                        let Some(buf) = (unsafe { ns.arena.slot_mut(slot.offset, len) }) else {
                            ns.store.lock().abort(slot);
                            codes.push(BlockCode::NoRoom);
                            continue;
                        };
                        hosts.push(buf.as_mut_ptr() as usize);
                        ids.push(u64::from(p));
                        held.slots.push((codes.len(), *k, slot));
                        BlockCode::Done
                    }
                    Err(ReserveError::Exists) => BlockCode::Exists,
                    Err(_) => BlockCode::NoRoom,
                };
                codes.push(code);
            }
            if hosts.is_empty() {
                continue;
            }
            let runs = block_runs(&self.layers, &ids, &hosts).map_err(|e| bad(e.to_string()))?;
            let sums = self.copy_and_checksum(&runs, &ids)?;
            let now = daemon.now_ms();
            let mut store = ns.store.lock();
            let mut stored = Vec::with_capacity(ids.len());
            for (j, ((i, k, slot), &id)) in held.slots.drain(..).zip(&ids).enumerate() {
                match store.commit(&k, slot, len, now) {
                    Committed::Stored(entry) => {
                        match sums.as_ref().and_then(|s| s.get(j)) {
                            Some(&sum) if store.hold(entry).is_some() => store.seal(entry, sum),
                            _ => committed.push(entry),
                        }
                        stored.push((k, id));
                    }
                    Committed::Duplicate => codes[i] = BlockCode::Exists,
                }
            }
            drop(store);
            if let Some(pool) = &self.pool {
                self.fill_pool(pool, &stored);
            }
            let n = codes[first..]
                .iter()
                .filter(|c| **c == BlockCode::Done)
                .count() as u64;
            self.counters.saved_blocks.fetch_add(n, Ordering::Relaxed);
            self.counters
                .d2h_bytes
                .fetch_add(hosts.len() as u64 * len, Ordering::Relaxed);
        }
        Ok((codes, committed))
    }

    /// Copies block `keys[i]` into page `pages[i]` of layers `first .. first + count` (all
    /// when `count` is 0). Blocks held only on disk are read into DRAM first.
    pub fn load(
        &self,
        daemon: &Daemon,
        keys: &[BlockKey],
        pages: &[u32],
        first: u32,
        count: u32,
        verify: bool,
    ) -> Result<Vec<BlockCode>, OpError> {
        if keys.len() != pages.len() {
            return Err(bad(format!(
                "{} keys but {} pages",
                keys.len(),
                pages.len()
            )));
        }
        let n_layers = self.layers.len();
        let first = first as usize;
        let count = if count == 0 {
            n_layers.saturating_sub(first)
        } else {
            count as usize
        };
        if first.checked_add(count).is_none_or(|e| e > n_layers) || count == 0 {
            return Err(bad(format!(
                "layers {first}..{} of {n_layers}",
                first.saturating_add(count)
            )));
        }
        let layers = &self.layers[first..first + count];
        // A block loaded layer by layer counts once, with its last layer.
        let completes = first + count == n_layers;
        let skip: u64 = self.layers[..first].iter().map(|l| l.page).sum();
        let part: u64 = layers.iter().map(|l| l.page).sum();
        let ns = &self.ns;
        let mut codes = Vec::with_capacity(keys.len());
        for (ks, ps) in keys.chunks(BATCH).zip(pages.chunks(BATCH)) {
            let mut leases = Leases {
                ns,
                entries: Vec::with_capacity(ks.len()),
            };
            let (mut ids, mut hosts) = (Vec::new(), Vec::new());
            let mut pooled = PoolLeases {
                pool: self.pool.as_deref(),
                leases: Vec::new(),
                ids: Vec::new(),
            };
            for (k, &p) in ks.iter().zip(ps) {
                if pooled.take(ns.id, k, self.block_bytes, p) {
                    codes.push(BlockCode::Done);
                    continue;
                }
                let now = daemon.now_ms();
                let hit = ns.store.lock().get(k, now);
                let Some(hit) = hit.or_else(|| daemon.read_into_dram(ns, k, true)) else {
                    codes.push(BlockCode::Missing);
                    continue;
                };
                leases.entries.push(hit.entry);
                if hit.len != self.block_bytes {
                    codes.push(BlockCode::BadSize);
                    continue;
                }
                if verify && hit.sealed {
                    let mut h = XxHash3_64::new();
                    let ok = ns.arena.hash_range(&mut h, hit.offset, hit.len);
                    if !ok || std::hash::Hasher::finish(&h) != hit.checksum {
                        tracing::warn!(ns = %ns.id, "a block failed its checksum before a GPU load");
                        codes.push(BlockCode::Corrupt);
                        continue;
                    }
                }
                // SAFETY: the lease keeps the committed block (no client writes it) from being
                // freed or reused until `leases` drops, after the copy; `ns` keeps the arena
                // mapped.
                let Some(buf) = (unsafe { ns.arena.block(hit.offset + skip, part) }) else {
                    codes.push(BlockCode::BadSize);
                    continue;
                };
                hosts.push(buf.as_ptr() as usize);
                ids.push(u64::from(p));
                codes.push(BlockCode::Done);
            }
            if !pooled.leases.is_empty() {
                let slots: Vec<usize> = pooled
                    .leases
                    .iter()
                    .map(|l| (l.addr + skip) as usize)
                    .collect();
                let runs: Vec<DeviceRun> = block_runs(layers, &pooled.ids, &slots)
                    .map_err(|e| bad(e.to_string()))?
                    .into_iter()
                    .map(|r| DeviceRun {
                        src: r.host as u64,
                        dst: r.dev,
                        len: r.len,
                    })
                    .collect();
                // SAFETY: sources are leased pool slots (not evicted or reused until the
                // leases drop); destinations lie inside layers checked against their imports.
                unsafe { self.backend.copy_d2d(&runs) }
                    .map_err(|e| driver_error(&self.counters, e))?;
                if completes {
                    self.counters
                        .loaded_blocks
                        .fetch_add(pooled.leases.len() as u64, Ordering::Relaxed);
                }
            }
            if hosts.is_empty() {
                continue;
            }
            let runs = block_runs(layers, &ids, &hosts).map_err(|e| bad(e.to_string()))?;
            // SAFETY: device ranges lie inside layers checked against their live imports; host
            // ranges are leased blocks nobody writes; the engine's pages are its to race on.
            unsafe { self.backend.copy_h2d(&runs) }.map_err(|e| driver_error(&self.counters, e))?;
            if completes {
                self.counters
                    .loaded_blocks
                    .fetch_add(hosts.len() as u64, Ordering::Relaxed);
            }
            self.counters
                .h2d_bytes
                .fetch_add(hosts.len() as u64 * part, Ordering::Relaxed);
        }
        Ok(codes)
    }
}

impl Attachment {
    /// Copies a save's pages into their slots and, on a second thread meanwhile, has the
    /// backend compute the blocks' checksums from the pages — unless the copy itself keeps the
    /// device's SMs busy; `None` when the backend does not (or failed: counted), and the blocks
    /// are then sealed on the CPU.
    fn copy_and_checksum(&self, runs: &[Run], ids: &[u64]) -> Result<Option<Vec<u64>>, OpError> {
        let on_device = !self.backend.d2h_uses_sms(runs);
        let (copied, sums) = std::thread::scope(|s| {
            let sums = on_device.then(|| {
                std::thread::Builder::new()
                    .name("kvd-gpu-sums".into())
                    .spawn_scoped(s, || self.backend.checksums(&self.layers, ids))
            });
            // SAFETY: every device range lies inside a layer checked against its live import
            // at attach (and re-checked by the plan); every host range is a slot reserved by
            // the caller, written by nobody else until committed.
            let copied = unsafe { self.backend.copy_d2h(runs) };
            let sums = match sums {
                None => Ok(None),
                Some(Ok(h)) => h.join().unwrap_or_else(|_| {
                    Err(GpuError::Invalid("the checksum thread panicked".into()))
                }),
                Some(Err(e)) => Err(GpuError::Invalid(format!(
                    "cannot start a checksum thread: {e}"
                ))),
            };
            (copied, sums)
        });
        copied.map_err(|e| driver_error(&self.counters, e))?;
        match sums {
            Ok(Some(s)) if s.len() == ids.len() => Ok(Some(s)),
            Ok(_) => Ok(None),
            Err(e) => {
                self.counters.failed(&e);
                tracing::warn!(
                    error = %e,
                    "device checksums failed; the blocks are hashed on the CPU"
                );
                Ok(None)
            }
        }
    }

    /// Keeps device copies of just-saved blocks (`(key, engine page)`) in the T0 pool, as
    /// far as it makes room; a failed copy only leaves them out.
    fn fill_pool(&self, pool: &Pool, stored: &[(BlockKey, u64)]) {
        let mut reserved = Vec::with_capacity(stored.len());
        let (mut ids, mut slots) = (Vec::new(), Vec::new());
        for (k, id) in stored {
            if let Some(r) = pool.reserve(self.ns.id, k, self.block_bytes) {
                slots.push(r.addr() as usize);
                ids.push(*id);
                reserved.push((*k, r));
            }
        }
        if reserved.is_empty() {
            return;
        }
        let copied = block_runs(&self.layers, &ids, &slots).and_then(|runs| {
            let runs: Vec<DeviceRun> = runs
                .into_iter()
                .map(|r| DeviceRun {
                    src: r.dev,
                    dst: r.host as u64,
                    len: r.len,
                })
                .collect();
            // SAFETY: sources lie inside layers checked against their live imports; the
            // destinations are slots reserved above, invisible to readers until committed.
            unsafe { self.backend.copy_d2d(&runs) }
        });
        match copied {
            Ok(()) => {
                for (k, r) in reserved {
                    pool.commit(self.ns.id, &k, r, self.block_bytes);
                }
            }
            Err(e) => {
                self.counters.failed(&e);
                for (_, r) in reserved {
                    pool.abort(r);
                }
            }
        }
    }
}

/// Pool leases of a load, released when dropped.
struct PoolLeases<'a> {
    pool: Option<&'a Pool>,
    leases: Vec<PoolLease>,
    ids: Vec<u64>,
}

impl PoolLeases<'_> {
    /// Leases `key`'s pooled copy for engine page `page`; false when it is not pooled (or
    /// has another size).
    fn take(&mut self, ns: NamespaceId, key: &BlockKey, len: u64, page: u32) -> bool {
        let Some(pool) = self.pool else {
            return false;
        };
        match pool.lease(ns, key) {
            Some(l) if l.len == len => {
                self.leases.push(l);
                self.ids.push(u64::from(page));
                true
            }
            Some(l) => {
                pool.release(l);
                false
            }
            None => false,
        }
    }
}

impl Drop for PoolLeases<'_> {
    fn drop(&mut self) {
        if let Some(pool) = self.pool {
            for l in self.leases.drain(..) {
                pool.release(l);
            }
        }
    }
}

/// Computes and records the checksums of blocks committed by [`Attachment::save`], on up to
/// `threads` threads (one core hashes slower than a GPU copies over PCIe); an entry gone
/// (evicted or deleted) or sealed meanwhile is skipped.
pub fn seal(ns: &Arc<Namespace>, entries: &[u32], threads: usize) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(&entry) = entries.get(i) else {
            return;
        };
        if let Some(job) = SealJob::start(ns.clone(), entry) {
            job.finish();
        }
    };
    let helpers = threads.clamp(1, entries.len().max(1)) - 1;
    std::thread::scope(|s| {
        for _ in 0..helpers {
            // A thread that cannot start leaves its share to the others.
            let _ = std::thread::Builder::new()
                .name("kvd-gpu-seal".into())
                .spawn_scoped(s, work);
        }
        work();
    });
}

/// Slots reserved for a save, aborted unless committed.
struct Reserved<'a> {
    ns: &'a Namespace,
    slots: Vec<(usize, BlockKey, Slot)>,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if self.slots.is_empty() {
            return;
        }
        let mut store = self.ns.store.lock();
        for (_, _, s) in self.slots.drain(..) {
            store.abort(s);
        }
    }
}

/// Read leases of a load, released when dropped.
struct Leases<'a> {
    ns: &'a Namespace,
    entries: Vec<u32>,
}

impl Drop for Leases<'_> {
    fn drop(&mut self) {
        let mut store = self.ns.store.lock();
        for &e in &self.entries {
            store.release(e);
        }
    }
}
