//! Background demotion: copies DRAM blocks to the disk tier, off the request path.
//!
//! One thread (`kvd-demote`) looks at every namespace about every 10 ms. When an arena is
//! fuller than `disk.demote_watermark`, the coldest blocks holding the bytes above it get a
//! disk copy (if the admission filter lets them), so that by the time LRU eviction reaches
//! them they are already safe on disk. A drain (`kvd-ctl drain`) makes it copy every block of
//! the chosen namespaces regardless of watermark and admission. Blocks are written straight
//! from their arena slot; while a write is in flight the block is held like a read lease so
//! it can be neither evicted nor reused. Up to `disk.io_depth` writes are in flight at once.

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
#[derive(Debug, Default)]
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

    fn is_empty(&self) -> bool {
        !self.all && self.some.is_empty()
    }
}

/// Runs the demotion loop until the daemon shuts down or is dropped.
pub fn run(daemon: Weak<Daemon>, disk: Arc<DiskTier>, drains: Arc<Mutex<DrainSet>>) {
    let depth = disk_depth(&daemon);
    let mut last_rates = Instant::now();
    loop {
        let Some(d) = daemon.upgrade() else { return };
        if d.is_shutting_down() {
            return;
        }
        if last_rates.elapsed() >= Duration::from_secs(1) {
            disk.sample_rates();
            last_rates = Instant::now();
        }
        let mut worked = false;
        let draining = drains.lock();
        let draining_now: Vec<(Arc<Namespace>, bool)> = d
            .namespaces()
            .into_iter()
            .map(|ns| {
                let drain = draining.contains(&ns.id);
                (ns, drain)
            })
            .collect();
        let any_drain = !draining.is_empty();
        drop(draining);
        let mut pending = 0u64;
        for (ns, drain) in &draining_now {
            let (cands, left) = {
                let mut st = ns.store.lock();
                let cap = st.capacity_bytes() as f64;
                let mark = (cap * d.cfg.disk.demote_watermark) as u64;
                let used = st.used_bytes();
                if !*drain && used <= mark {
                    continue;
                }
                let c = st.demotion_candidates(depth, *drain, used.saturating_sub(mark));
                let left = if *drain { st.without_disk_copy() } else { 0 };
                (c, left)
            };
            pending += left;
            if !cands.is_empty() {
                worked = true;
                demote(&d, &disk, ns, cands, *drain);
            }
        }
        if any_drain {
            disk.drain_pending().store(pending, Ordering::Relaxed);
            if pending == 0 {
                *drains.lock() = DrainSet::default();
                disk.flush();
                tracing::info!("drain finished: every DRAM block has a disk copy");
            }
        }
        drop(d);
        if !worked {
            std::thread::sleep(PASS_INTERVAL);
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

/// Writes `cands` of `ns` to disk and waits for them.
fn demote(d: &Daemon, disk: &DiskTier, ns: &Arc<Namespace>, cands: Vec<Demotion>, drain: bool) {
    let (tx, rx) = channel::<Done>();
    let mut tickets = Vec::new();
    let mut outcomes: Vec<(u32, DemotionOutcome)> = Vec::new();
    let mut reclaimed: Vec<(NamespaceId, BlockKey)> = Vec::new();
    for c in cands {
        if !drain && !disk.admit(&ns.id, &c.key) {
            outcomes.push((c.entry, DemotionOutcome::Rejected));
            continue;
        }
        let t = match disk.begin_write(&ns.id, &c.key, c.len, &mut reclaimed) {
            Ok(t) => t,
            Err(WriteSkip::Stored) => {
                outcomes.push((c.entry, DemotionOutcome::Written));
                continue;
            }
            Err(WriteSkip::Degraded | WriteSkip::Busy) => {
                outcomes.push((c.entry, DemotionOutcome::Failed));
                continue;
            }
        };
        let len = align_up(c.len);
        let in_arena = usize::try_from(c.offset)
            .ok()
            .zip(usize::try_from(len).ok())
            .filter(|&(o, l)| ns.arena.map().contains(o, l));
        let Some((off, l)) = in_arena else {
            // Cannot happen for slots from our allocator (classes are 4 KiB multiples).
            disk.end_writes(&[WriteDone {
                ns: ns.id,
                key: c.key,
                len: c.len,
                checksum: c.checksum,
                ticket: t,
                result: Err(std::io::Error::other("slot outside the arena")),
            }]);
            outcomes.push((c.entry, DemotionOutcome::Failed));
            continue;
        };
        let keep: Arc<dyn Send + Sync> = ns.clone();
        // SAFETY: the range is inside the arena mapping (checked), which `keep` keeps alive;
        // the block is committed (no client writes it) and held by the demotion (not freed or
        // reused) until finish_demotion below, after the write completed.
        let buf = unsafe { IoBuf::from_raw(keep, ns.arena.map().as_ptr().add(off), l) };
        let i = tickets.len();
        let tx = tx.clone();
        let op = IoOp {
            kind: IoKind::Write,
            file: t.file.clone(),
            offset: t.offset,
            buf,
            done: Box::new(move |b, r| {
                let _ = tx.send((i, b, r));
            }),
        };
        tickets.push(Some((c, t)));
        if let Err(e) = disk.engine().submit(op) {
            tracing::error!(error = %e, "disk engine stopped; demotion skipped");
            if let Some((c, t)) = tickets[i].take() {
                disk.end_writes(&[WriteDone {
                    ns: ns.id,
                    key: c.key,
                    len: c.len,
                    checksum: c.checksum,
                    ticket: t,
                    result: Err(std::io::Error::other("engine stopped")),
                }]);
                outcomes.push((c.entry, DemotionOutcome::Failed));
            }
        }
    }
    drop(tx);
    let mut done = Vec::new();
    for (i, _buf, r) in rx.iter() {
        if let Some((c, t)) = tickets.get_mut(i).and_then(Option::take) {
            done.push((c, t, r));
        }
    }
    if !done.is_empty() {
        let entries: Vec<_> = done.iter().map(|(c, _, _)| c.entry).collect();
        let batch: Vec<_> = done
            .into_iter()
            .map(|(c, t, r)| WriteDone {
                ns: ns.id,
                key: c.key,
                len: c.len,
                checksum: c.checksum,
                ticket: t,
                result: r,
            })
            .collect();
        let ok = disk.end_writes(&batch);
        for (e, ok) in entries.into_iter().zip(ok) {
            outcomes.push((
                e,
                if ok {
                    DemotionOutcome::Written
                } else {
                    DemotionOutcome::Failed
                },
            ));
        }
    }
    {
        let mut st = ns.store.lock();
        for (e, o) in outcomes {
            st.finish_demotion(e, o);
        }
    }
    if !reclaimed.is_empty() {
        for other in d.namespaces() {
            let mut st = other.store.lock();
            for (n, k) in reclaimed.iter().filter(|(n, _)| *n == other.id) {
                let _ = n;
                st.clear_on_disk(k);
            }
        }
    }
}
