//! Background demotion: copies DRAM blocks to the disk tier, off the request path.
//!
//! One thread (`kvd-demote`) looks at every namespace about every 10 ms, and at once when a
//! drain is asked for. When an arena is fuller than `disk.demote_watermark`, the coldest
//! blocks holding the bytes above it get a disk copy (if the admission filter lets them), so
//! that by the time LRU eviction reaches them they are already safe on disk. A drain (`kvd-ctl drain`) makes it copy every block of
//! the chosen namespaces regardless of watermark and admission. A block whose disk copy was
//! reclaimed for newer blocks is not written again until it is read again (the store's
//! `DISPLACED`), so a DRAM larger than the disk is not rewritten in a circle. Blocks are
//! written straight from their arena slot; while a write is in flight the block is held like
//! a read lease so it can be neither evicted nor reused. Up to `disk.io_depth` writes are in
//! flight at once. Once a second it also persists the access statistics of blocks read from
//! disk.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::mpsc::channel;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use kvd_proto::{BlockKey, NamespaceId};
use parking_lot::Mutex;

use crate::daemon::{Daemon, Namespace};
use crate::disk::engine::{IoBuf, IoKind, IoOp};
use crate::disk::format::align_up;
use crate::disk::{DiskTier, WriteDone, WriteSkip};
use crate::store::{Demotion, DemotionOutcome};

const PASS_INTERVAL: Duration = Duration::from_millis(10);

/// Which namespaces are being drained.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DrainSet {
    all: bool,
    some: HashSet<NamespaceId>,
}

impl DrainSet {
    /// Adds a namespace, or every namespace with `None`.
    pub fn add(&mut self, ns: Option<NamespaceId>) {
        match ns {
            None => self.all = true,
            Some(id) => {
                self.some.insert(id);
            }
        }
    }

    fn contains(&self, ns: &NamespaceId) -> bool {
        self.all || self.some.contains(ns)
    }

    /// No drain is asked for.
    pub fn is_empty(&self) -> bool {
        !self.all && self.some.is_empty()
    }
}

/// Runs the demotion loop until the daemon shuts down or is dropped.
pub fn run(daemon: Weak<Daemon>, disk: Arc<DiskTier>, drains: Arc<Mutex<DrainSet>>) {
    let depth = disk_depth(&daemon);
    let mut last_rates = Instant::now();
    loop {
        let Some(d) = daemon.upgrade() else { return };
        // Not on is_shutting_down: the shutdown drain runs after the clients are closed.
        if d.is_stopping() {
            return;
        }
        if last_rates.elapsed() >= Duration::from_secs(1) {
            disk.sample_rates();
            disk.flush_touches();
            last_rates = Instant::now();
        }
        let mut worked = false;
        let draining = drains.lock().clone();
        let draining_now: Vec<(Arc<Namespace>, bool)> = d
            .namespaces()
            .into_iter()
            .map(|ns| {
                let drain = draining.contains(&ns.id);
                (ns, drain)
            })
            .collect();
        let any_drain = !draining.is_empty();
        let mut pending = 0u64;
        for (ns, drain) in &draining_now {
            let mark = {
                let st = ns.store.lock();
                let mark = (st.capacity_bytes() as f64 * d.cfg.disk.demote_watermark) as u64;
                if !*drain && st.used_bytes() <= mark {
                    continue;
                }
                mark
            };
            let more = |st: &mut crate::store::NsStore, k: usize| {
                let excess = st.used_bytes().saturating_sub(mark);
                if !*drain && excess == 0 {
                    return Vec::new();
                }
                st.demotion_candidates(k, *drain, excess)
            };
            if demote(&d, &disk, ns, *drain, depth, more) > 0 {
                worked = true;
            }
            if *drain {
                pending += ns.store.lock().without_disk_copy();
            }
        }
        if any_drain {
            // A drain requested during this pass is not covered by `pending`: leave the
            // figures to the next pass.
            let mut set = drains.lock();
            if *set == draining {
                disk.drain_pending().store(pending, Ordering::Relaxed);
                if pending == 0 {
                    *set = DrainSet::default();
                    drop(set);
                    disk.flush();
                    let displaced: u64 = draining_now
                        .iter()
                        .filter(|(_, drain)| *drain)
                        .map(|(ns, _)| ns.store.lock().displaced())
                        .sum();
                    if displaced == 0 {
                        tracing::info!("drain finished: every DRAM block has a disk copy");
                    } else {
                        tracing::warn!(
                            displaced,
                            "drain finished; blocks written earlier were reclaimed for newer \
                             ones and not written again: the disk tier holds less than DRAM \
                             (raise disk.capacity_bytes)"
                        );
                    }
                }
            }
        }
        drop(d);
        if !worked {
            // A drain request unparks the thread early.
            std::thread::park_timeout(PASS_INTERVAL);
        }
    }
}

fn disk_depth(daemon: &Weak<Daemon>) -> usize {
    daemon
        .upgrade()
        .map(|d| d.cfg.disk.io_depth as usize)
        .unwrap_or(1)
}

type Done = (usize, IoBuf, std::io::Result<()>);

/// Most blocks one namespace demotes per pass, so other namespaces, drain accounting and
/// shutdown get their turn.
const BLOCKS_PER_PASS: usize = 4096;

/// Writes blocks of `ns` to disk, keeping `depth` writes in flight: candidates come from
/// `more` as room frees up, completions are recorded (catalog batch, then the DRAM entries'
/// disk flags) as they arrive. The queue is refilled before each catalog batch is written,
/// so the device stays busy while the catalog syncs. Returns how many blocks were handled.
fn demote(
    d: &Daemon,
    disk: &DiskTier,
    ns: &Arc<Namespace>,
    drain: bool,
    depth: usize,
    mut more: impl FnMut(&mut crate::store::NsStore, usize) -> Vec<Demotion>,
) -> usize {
    let (tx, rx) = channel::<Done>();
    let mut p = Pass {
        d,
        disk,
        ns,
        drain,
        depth,
        tenant: crate::tenancy::base(&ns.desc.tenant),
        tx,
        tickets: Vec::new(),
        reclaimed: Vec::new(),
        outcomes: Vec::new(),
        in_flight: 0,
        taken: 0,
        handled: 0,
        exhausted: false,
    };
    loop {
        p.refill(&mut more);
        if p.in_flight > 0 {
            let mut done = Vec::new();
            if let Ok(first) = rx.recv() {
                done.push(first);
                done.extend(rx.try_iter());
            }
            p.in_flight -= done.len();
            p.refill(&mut more);
            p.complete(done);
        }
        p.finish();
        if p.in_flight == 0 && (p.exhausted || p.taken >= BLOCKS_PER_PASS) {
            break;
        }
    }
    let Pass {
        handled, reclaimed, ..
    } = p;
    if !reclaimed.is_empty() {
        for other in d.namespaces() {
            let mut st = other.store.lock();
            for (_, k) in reclaimed.iter().filter(|(n, _)| *n == other.id) {
                st.clear_on_disk(k);
            }
        }
    }
    handled
}

/// One namespace's demotion pass: the writes in flight and what became of the others.
struct Pass<'a> {
    d: &'a Daemon,
    disk: &'a DiskTier,
    ns: &'a Arc<Namespace>,
    drain: bool,
    depth: usize,
    tenant: &'a str,
    tx: std::sync::mpsc::Sender<Done>,
    tickets: Vec<Option<(Demotion, crate::disk::WriteTicket)>>,
    reclaimed: Vec<(NamespaceId, BlockKey)>,
    /// Outcomes not yet handed to the store.
    outcomes: Vec<(u32, DemotionOutcome)>,
    in_flight: usize,
    /// Candidates taken from the store this pass.
    taken: usize,
    handled: usize,
    exhausted: bool,
}

impl Pass<'_> {
    /// Starts writes for new candidates until `depth` are in flight; once the daemon is
    /// stopping, none: what is in flight finishes.
    fn refill(
        &mut self,
        more: &mut impl FnMut(&mut crate::store::NsStore, usize) -> Vec<Demotion>,
    ) {
        if self.d.is_stopping() {
            self.exhausted = true;
        }
        if self.exhausted || self.in_flight >= self.depth || self.taken >= BLOCKS_PER_PASS {
            return;
        }
        let want = (self.depth - self.in_flight).min(BLOCKS_PER_PASS - self.taken);
        let cands = more(&mut self.ns.store.lock(), want);
        if cands.len() < want {
            self.exhausted = true;
        }
        self.taken += cands.len();
        let mut ops = Vec::new();
        for c in cands {
            if let Some(op) = self.start(c) {
                ops.push(op);
            }
        }
        // On failure every callback reports the error, and the writes count as failed.
        let _ = self.disk.engine().submit_many(ops);
    }

    /// The write of one candidate, or its outcome when it needs none.
    fn start(&mut self, c: Demotion) -> Option<IoOp> {
        let (disk, ns) = (self.disk, self.ns);
        if !self.drain && !disk.admit(&ns.id, &c.key) {
            self.outcomes.push((c.entry, DemotionOutcome::Rejected));
            return None;
        }
        let t = match disk.begin_write(&ns.id, self.tenant, &c.key, c.len, &mut self.reclaimed) {
            Ok(t) => t,
            Err(skip) => {
                let o = match skip {
                    WriteSkip::Stored => DemotionOutcome::Written,
                    WriteSkip::Quota => DemotionOutcome::Rejected,
                    WriteSkip::Degraded | WriteSkip::Busy => {
                        self.exhausted = true;
                        DemotionOutcome::Failed
                    }
                };
                self.outcomes.push((c.entry, o));
                return None;
            }
        };
        let keep: Arc<dyn Send + Sync> = ns.clone();
        // SAFETY: `keep` keeps the namespace, hence its arena, alive; the block is committed
        // (no client writes it) and held by the demotion (not freed or reused) until
        // finish_demotion, after the write completed.
        let Some(buf) = (unsafe { ns.arena.io_buf(keep, c.offset, align_up(c.len)) }) else {
            // Cannot happen for slots from our allocator (classes are 4 KiB multiples).
            disk.end_writes(&[WriteDone {
                ns: ns.id,
                key: c.key,
                len: c.len,
                checksum: c.checksum,
                ticket: t,
                result: Err(std::io::Error::other("slot outside the arena")),
            }]);
            self.outcomes.push((c.entry, DemotionOutcome::Failed));
            return None;
        };
        let (i, tx) = (self.tickets.len(), self.tx.clone());
        let op = IoOp {
            kind: IoKind::Write,
            file: t.file.clone(),
            offset: t.offset,
            buf,
            done: Box::new(move |b, r| {
                let _ = tx.send((i, b, r));
            }),
        };
        self.tickets.push(Some((c, t)));
        self.in_flight += 1;
        Some(op)
    }

    /// Records completed writes: one catalog batch, then their outcomes.
    fn complete(&mut self, done: Vec<Done>) {
        let mut entries = Vec::new();
        let mut batch = Vec::new();
        for (i, _buf, r) in done {
            if let Some((c, t)) = self.tickets.get_mut(i).and_then(Option::take) {
                entries.push(c.entry);
                batch.push(WriteDone {
                    ns: self.ns.id,
                    key: c.key,
                    len: c.len,
                    checksum: c.checksum,
                    ticket: t,
                    result: r,
                });
            }
        }
        for (e, ok) in entries.into_iter().zip(self.disk.end_writes(&batch)) {
            let o = if ok {
                DemotionOutcome::Written
            } else {
                DemotionOutcome::Failed
            };
            self.outcomes.push((e, o));
        }
    }

    /// Hands the outcomes so far to the store.
    fn finish(&mut self) {
        if self.outcomes.is_empty() {
            return;
        }
        self.handled += self.outcomes.len();
        let mut st = self.ns.store.lock();
        for (e, o) in self.outcomes.drain(..) {
            st.finish_demotion(e, o);
        }
    }
}
