//! The data plane: one thread per connection serving its shared-memory ring.
//!
//! The thread pops descriptors, applies them to the namespace stores and posts completions.
//! It spins for `ring.spin_us` after the last descriptor (a futex wake costs more than a
//! 64 KiB copy) and then sleeps on the ring's doorbell. It owns the connection's reservations
//! and read leases, so when the connection ends — cleanly, by a crash of the client, or because
//! the client broke the ring protocol — everything the client held is given back here.
//!
//! Checksums are sealed off the request path: a commit completes at once, and the thread hashes
//! the new block (xxh3-64) in 16 KiB steps once its ring has been idle for 5 µs, yielding to any new
//! descriptor between steps. A sealing block is held like a read lease so it cannot be evicted
//! mid-hash. If more than [`MAX_UNSEALED`] blocks wait, commits seal synchronously instead
//! (backpressure), so the backlog stays bounded.
//!
//! A GET that misses DRAM but hits the disk tier is promoted: the thread reserves a DRAM slot,
//! has the disk engine read the block straight into it, and keeps serving other descriptors
//! meanwhile; when the read completes it verifies the checksum, publishes the block in DRAM
//! and posts the GET's completion with a read lease, exactly as for a DRAM hit (completions
//! are matched by `user_data`, so they may arrive out of order). A checksum mismatch is a
//! miss, never bytes.
//!
//! Tokens for reservations and leases come from one per-connection counter. A token below the
//! counter but no longer held is `Stale` (e.g. a lease that timed out); a token never issued
//! can only come from a corrupted or hostile client, which is dropped.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::VecDeque;

use kvd_proto::ring::{Completion, Op, Status, Submission, COMPLETION_CHECKSUM_VALID};
use kvd_proto::BlockKey;
use kvd_shm::DaemonRing;
use std::hash::Hasher as _;
use twox_hash::XxHash3_64;

use crate::alloc::Slot;
use crate::daemon::{Conn, Daemon, Namespace};
use crate::disk::engine::{IoKind, IoOp};
use crate::disk::format::align_up;
use crate::disk::{ReadOutcome, ReadTicket};
use crate::metrics::Op as TimedOp;
use crate::store::{Committed, ReserveError};

/// Most reservations plus leases one connection may hold.
pub const MAX_HELD_PER_CONN: usize = 65_536;
/// Most committed blocks per connection waiting for their checksum.
pub const MAX_UNSEALED: usize = 1024;
/// Bytes hashed per idle step.
const SEAL_STEP: u64 = 16 << 10;
/// Idle time before sealing starts, so that a client's next request (typically right after a
/// commit) is served before the hashing begins.
const SEAL_AFTER_IDLE: Duration = Duration::from_micros(5);

/// A block being checksummed.
pub(crate) struct SealJob {
    ns: Arc<Namespace>,
    entry: u32,
    offset: u64,
    len: u64,
    done: u64,
    hasher: XxHash3_64,
}

impl SealJob {
    /// Holds `entry` for hashing; `None` if it is gone or already sealed.
    pub(crate) fn start(ns: Arc<Namespace>, entry: u32) -> Option<SealJob> {
        let (offset, len) = ns.store.lock().hold(entry)?;
        Some(SealJob {
            ns,
            entry,
            offset,
            len,
            done: 0,
            hasher: XxHash3_64::new(),
        })
    }

    /// Hashes up to `step` more bytes; true when finished (and sealed).
    fn step(&mut self, step: u64) -> bool {
        let n = step.min(self.len - self.done);
        let ok = self
            .ns
            .arena
            .hash_range(&mut self.hasher, self.offset + self.done, n);
        self.done += n;
        if !ok {
            // Cannot happen for slots from our allocator; release without sealing.
            self.ns.store.lock().release(self.entry);
            return true;
        }
        if self.done == self.len {
            let sum = self.hasher.finish();
            self.ns.store.lock().seal(self.entry, sum);
            return true;
        }
        false
    }

    pub(crate) fn finish(mut self) {
        while !self.step(u64::MAX) {}
    }
}

struct Reservation {
    ns: Arc<Namespace>,
    key: BlockKey,
    slot: Slot,
}

struct Lease {
    ns: Arc<Namespace>,
    entry: u32,
    deadline: Instant,
}

/// A GET being served from disk.
struct PendingRead {
    started: Instant,
    ns: Arc<Namespace>,
    sub: Submission,
    slot: Slot,
    ticket: ReadTicket,
}

/// Most disk reads one connection has in flight; further GETs wait for one to finish.
const MAX_PENDING_READS: usize = 64;

/// Why a descriptor ends the connection.
struct Violation(String);

struct Session {
    daemon: Arc<Daemon>,
    conn: Arc<Conn>,
    reservations: HashMap<u64, Reservation>,
    leases: HashMap<u64, Lease>,
    next_token: u64,
    lease_timeout: Duration,
    unsealed: VecDeque<(Arc<Namespace>, u32)>,
    sealing: Option<SealJob>,
    pending: HashMap<u64, PendingRead>,
    io_tx: Sender<(u64, std::io::Result<()>)>,
    io_rx: Receiver<(u64, std::io::Result<()>)>,
    /// Completions of finished disk reads waiting to be posted.
    backlog: VecDeque<Completion>,
    /// Disk reads not yet handed to the engine.
    to_submit: Vec<IoOp>,
}

impl Session {
    fn namespace(&self, handle: u32) -> Option<Arc<Namespace>> {
        self.conn.handles.read().get(handle as usize).cloned()
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn unknown_token(&self, op: &str, token: u64) -> Result<Status, Violation> {
        if token != 0 && token < self.next_token {
            Ok(Status::Stale)
        } else {
            Err(Violation(format!(
                "{op} of token {token} that was never issued"
            )))
        }
    }

    /// The namespace for a descriptor that will take a reservation or a lease, if the handle
    /// is open on this connection and the connection may hold one more.
    fn admit(&self, handle: u32) -> Result<Arc<Namespace>, Status> {
        let ns = self.namespace(handle).ok_or(Status::BadNamespace)?;
        if self.reservations.len() + self.leases.len() + self.pending.len() >= MAX_HELD_PER_CONN {
            return Err(Status::LimitExceeded);
        }
        Ok(ns)
    }

    fn handle(&mut self, sub: &Submission) -> Result<Option<Completion>, Violation> {
        let mut c = Completion::reply(sub, Status::Ok);
        if self.daemon.is_shutting_down() {
            c.status = Status::ShuttingDown as u16;
            return Ok(Some(c));
        }
        match sub.op {
            Op::Nop => {}
            Op::Reserve => {
                let ns = match self.admit(sub.ns) {
                    Ok(ns) => ns,
                    Err(st) => {
                        c.status = st as u16;
                        return Ok(Some(c));
                    }
                };
                self.daemon.record_sighting(&ns.id, &sub.key);
                let r = ns.store.lock().reserve(&sub.key, sub.arg0);
                match r {
                    Ok(slot) => {
                        let token = self.token();
                        c.offset = slot.offset;
                        c.len = slot.cap;
                        c.token = token;
                        self.reservations.insert(
                            token,
                            Reservation {
                                ns,
                                key: sub.key,
                                slot,
                            },
                        );
                    }
                    Err(ReserveError::Exists) => c.status = Status::Exists as u16,
                    Err(ReserveError::TooLarge) => c.status = Status::TooLarge as u16,
                    Err(ReserveError::CacheFull) => c.status = Status::CacheFull as u16,
                }
            }
            Op::Commit => {
                let Some(r) = self.reservations.remove(&sub.arg0) else {
                    c.status = self.unknown_token("commit", sub.arg0)? as u16;
                    return Ok(Some(c));
                };
                let len = sub.arg1;
                if len == 0 || len > r.slot.cap {
                    c.status = Status::BadLength as u16;
                    self.reservations.insert(sub.arg0, r);
                    return Ok(Some(c));
                }
                let (now, t) = (self.daemon.now_ms(), Instant::now());
                let out = r.ns.store.lock().commit(&r.key, r.slot, len, now);
                self.daemon.latency.since(TimedOp::Commit, t);
                match out {
                    Committed::Duplicate => c.status = Status::Exists as u16,
                    Committed::Stored(entry) => {
                        if self.unsealed.len() < MAX_UNSEALED {
                            self.unsealed.push_back((r.ns, entry));
                        } else if let Some(job) = SealJob::start(r.ns, entry) {
                            job.finish();
                        }
                    }
                }
            }
            Op::Abort => match self.reservations.remove(&sub.arg0) {
                Some(r) => r.ns.store.lock().abort(r.slot),
                None => c.status = self.unknown_token("abort", sub.arg0)? as u16,
            },
            Op::Get => {
                let ns = match self.admit(sub.ns) {
                    Ok(ns) => ns,
                    Err(st) => {
                        c.status = st as u16;
                        return Ok(Some(c));
                    }
                };
                let t = Instant::now();
                let hit = ns.store.lock().get(&sub.key, self.daemon.now_ms());
                self.daemon.record_sighting(&ns.id, &sub.key);
                match hit {
                    Some(h) => {
                        self.lease(&mut c, ns, h);
                        self.daemon.latency.since(TimedOp::Get, t);
                    }
                    None => return Ok(self.get_from_disk(ns, sub, c)),
                }
            }
            Op::Release => match self.leases.remove(&sub.arg0) {
                Some(l) => {
                    l.ns.store.lock().release(l.entry);
                }
                None => c.status = self.unknown_token("release", sub.arg0)? as u16,
            },
        }
        Ok(Some(c))
    }

    /// Fills a GET completion with a read lease on `h`.
    fn lease(&mut self, c: &mut Completion, ns: Arc<Namespace>, h: crate::store::Hit) {
        let token = self.token();
        c.offset = h.offset;
        c.len = h.len;
        if h.sealed {
            c.checksum = h.checksum;
            c.flags = COMPLETION_CHECKSUM_VALID;
        }
        c.token = token;
        self.leases.insert(
            token,
            Lease {
                ns,
                entry: h.entry,
                deadline: Instant::now() + self.lease_timeout,
            },
        );
    }

    /// A GET that missed DRAM: starts a disk read into a fresh slot, or answers NotFound.
    /// `None` means the completion is posted when the read finishes.
    fn get_from_disk(
        &mut self,
        ns: Arc<Namespace>,
        sub: &Submission,
        mut c: Completion,
    ) -> Option<Completion> {
        c.status = Status::NotFound as u16;
        let Some(disk) = self.daemon.disk.clone() else {
            return Some(c);
        };
        let Some(ticket) = disk.begin_read(&ns.id, &sub.key) else {
            return Some(c);
        };
        while self.pending.len() >= MAX_PENDING_READS {
            self.submit_reads();
            match self.io_rx.recv() {
                Ok(done) => {
                    if let Some(c) = self.finish_read(done) {
                        self.backlog.push_back(c);
                    }
                }
                Err(_) => break,
            }
        }
        let reserved = ns.store.lock().reserve(&sub.key, ticket.len);
        let slot = match reserved {
            Ok(slot) => slot,
            Err(ReserveError::Exists) => {
                // Promoted by another reader meanwhile: serve that copy.
                disk.end_read(&ns.id, &sub.key, &ticket, ReadOutcome::Abandoned);
                let hit = ns.store.lock().get(&sub.key, self.daemon.now_ms());
                if let Some(h) = hit {
                    c.status = Status::Ok as u16;
                    self.lease(&mut c, ns, h);
                }
                return Some(c);
            }
            Err(_) => {
                // No DRAM slot to read into (everything is pinned or being read): a miss, so
                // the engine recomputes rather than failing the request.
                disk.end_read(&ns.id, &sub.key, &ticket, ReadOutcome::Abandoned);
                return Some(c);
            }
        };
        let len = align_up(ticket.len);
        let keep: Arc<dyn Send + Sync> = ns.clone();
        // SAFETY: `keep` keeps the namespace, hence its arena, alive; the slot is reserved by
        // this thread and not yet committed, so no client knows it and no one else writes or
        // reads it until the read completes (release_everything waits for pending reads
        // before giving slots back).
        let buf = (len <= slot.cap)
            .then(|| unsafe { ns.arena.io_buf(keep, slot.offset, len) })
            .flatten();
        let Some(buf) = buf else {
            ns.store.lock().abort(slot);
            disk.end_read(&ns.id, &sub.key, &ticket, ReadOutcome::Abandoned);
            return Some(c);
        };
        let token = self.token();
        let tx = self.io_tx.clone();
        let waker = self.conn.waker.lock().clone();
        let op = IoOp {
            kind: IoKind::Read,
            file: ticket.file.clone(),
            offset: ticket.offset,
            buf,
            done: Box::new(move |_buf, r| {
                let _ = tx.send((token, r));
                if let Some(w) = waker {
                    w.wake();
                }
            }),
        };
        // Reads are handed to the engine together once the ring is drained (see
        // `submit_reads`), so a batch of GETs is in flight at once; if the engine has stopped,
        // each callback reports the failure and `finish_read` answers a miss.
        self.to_submit.push(op);
        self.pending.insert(
            token,
            PendingRead {
                started: Instant::now(),
                ns,
                sub: *sub,
                slot,
                ticket,
            },
        );
        None
    }

    /// Hands the disk reads started since the last call to the IO engine, as one batch.
    fn submit_reads(&mut self) {
        if self.to_submit.is_empty() {
            return;
        }
        if let Some(d) = &self.daemon.disk {
            let _ = d.engine().submit_many(std::mem::take(&mut self.to_submit));
        }
    }

    /// Completes a disk read: verify, publish in DRAM, lease; or a miss.
    fn finish_read(&mut self, (token, r): (u64, std::io::Result<()>)) -> Option<Completion> {
        let p = self.pending.remove(&token)?;
        let mut c = Completion::reply(&p.sub, Status::NotFound);
        let Some(disk) = self.daemon.disk.clone() else {
            p.ns.store.lock().abort(p.slot);
            return Some(c);
        };
        let outcome = match r {
            Err(e) => {
                tracing::warn!(error = %e, region = p.ticket.region, offset = p.ticket.offset,
                    "disk read failed; served as a miss");
                ReadOutcome::Failed
            }
            Ok(()) => {
                let mut h = XxHash3_64::new();
                if p.ns.arena.hash_range(&mut h, p.slot.offset, p.ticket.len)
                    && h.finish() == p.ticket.checksum
                {
                    ReadOutcome::Verified
                } else {
                    ReadOutcome::Corrupt
                }
            }
        };
        // False when the block was deleted while the read was in flight: not served, and
        // not promoted back into DRAM.
        let current = disk.end_read(&p.ns.id, &p.sub.key, &p.ticket, outcome);
        tracing::trace!(
            len = p.ticket.len,
            us = p.started.elapsed().as_micros() as u64,
            ?outcome,
            current,
            "disk read"
        );
        if outcome != ReadOutcome::Verified || !current {
            p.ns.store.lock().abort(p.slot);
            return Some(c);
        }
        let hit = p.ns.store.lock().promote(
            &p.sub.key,
            p.slot,
            p.ticket.len,
            p.ticket.checksum,
            self.daemon.now_ms(),
        );
        if let Some(h) = hit {
            c.status = Status::Ok as u16;
            self.lease(&mut c, p.ns, h);
            self.daemon.latency.since(TimedOp::GetDisk, p.started);
        }
        Some(c)
    }

    fn expire_leases(&mut self) {
        if self.leases.is_empty() {
            return;
        }
        let now = Instant::now();
        let expired: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in expired {
            if let Some(l) = self.leases.remove(&t) {
                l.ns.store.lock().release(l.entry);
                tracing::warn!(
                    client = self.conn.id,
                    token = t,
                    "read lease timed out and was reclaimed"
                );
            }
        }
    }

    /// One idle step of checksum sealing; false when there is nothing to seal.
    fn seal_step(&mut self) -> bool {
        if self.sealing.is_none() {
            while let Some((ns, entry)) = self.unsealed.pop_front() {
                if let Some(job) = SealJob::start(ns, entry) {
                    self.sealing = Some(job);
                    break;
                }
            }
        }
        match self.sealing.as_mut() {
            None => false,
            Some(job) => {
                if job.step(SEAL_STEP) {
                    self.sealing = None;
                }
                true
            }
        }
    }

    fn release_everything(&mut self) {
        // Disk reads still write into their slots: wait for them before giving slots back.
        self.submit_reads();
        while !self.pending.is_empty() {
            match self.io_rx.recv() {
                Ok(done) => {
                    let _ = self.finish_read(done);
                }
                Err(_) => break,
            }
        }
        // Seal what this client committed so its blocks do not stay without a checksum.
        if let Some(job) = self.sealing.take() {
            job.finish();
        }
        for (ns, entry) in std::mem::take(&mut self.unsealed) {
            if let Some(job) = SealJob::start(ns, entry) {
                job.finish();
            }
        }
        let (r, l) = (self.reservations.len(), self.leases.len());
        for (_, r) in self.reservations.drain() {
            r.ns.store.lock().abort(r.slot);
        }
        for (_, l) in self.leases.drain() {
            l.ns.store.lock().release(l.entry);
        }
        if r + l > 0 {
            tracing::info!(
                client = self.conn.id,
                reservations = r,
                leases = l,
                "released what a departed client held"
            );
        }
    }
}

/// Posts a completion, waiting while the completion queue is full; false when the
/// connection must end.
fn post(ring: &mut DaemonRing, conn: &Conn, c: &Completion) -> bool {
    loop {
        match ring.post(c) {
            Ok(true) => return true,
            Ok(false) => {
                ring.notify();
                if conn.closed.load(Ordering::Acquire) {
                    return false;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(e) => {
                tracing::warn!(client = conn.id, error = %e, "dropping client: ring protocol violation");
                return false;
            }
        }
    }
}

/// Serves `ring` for `conn` until the connection closes or the daemon shuts down.
pub fn run(daemon: Arc<Daemon>, conn: Arc<Conn>, mut ring: DaemonRing) {
    let spin = Duration::from_micros(daemon.cfg.ring.spin_us);
    let (io_tx, io_rx) = channel();
    let mut s = Session {
        lease_timeout: Duration::from_millis(u64::from(daemon.cfg.ring.lease_timeout_ms)),
        daemon,
        conn,
        reservations: HashMap::new(),
        leases: HashMap::new(),
        next_token: 1,
        unsealed: VecDeque::new(),
        sealing: None,
        pending: HashMap::new(),
        io_tx,
        io_rx,
        backlog: VecDeque::new(),
        to_submit: Vec::new(),
    };
    let mut last_work = Instant::now();
    let mut since_expiry = 0u32;
    'serve: loop {
        if s.conn.closed.load(Ordering::Acquire) {
            break;
        }
        while let Ok(done) = s.io_rx.try_recv() {
            if let Some(c) = s.finish_read(done) {
                s.backlog.push_back(c);
            }
        }
        while let Some(c) = s.backlog.pop_front() {
            if !post(&mut ring, &s.conn, &c) {
                break 'serve;
            }
            s.conn.ops.fetch_add(1, Ordering::Relaxed);
            last_work = Instant::now();
        }
        match ring.pop() {
            Err(e) => {
                tracing::warn!(client = s.conn.id, error = %e, "dropping client: ring protocol violation");
                break;
            }
            Ok(Some(sub)) => {
                let c = match s.handle(&sub) {
                    Ok(c) => c,
                    Err(Violation(why)) => {
                        tracing::warn!(client = s.conn.id, %why, "dropping client: invalid descriptor");
                        break;
                    }
                };
                if let Some(c) = c {
                    if !post(&mut ring, &s.conn, &c) {
                        break 'serve;
                    }
                    s.conn.ops.fetch_add(1, Ordering::Relaxed);
                }
                since_expiry += 1;
                if since_expiry >= 4096 {
                    since_expiry = 0;
                    s.expire_leases();
                }
                last_work = Instant::now();
            }
            Ok(None) => {
                s.submit_reads();
                ring.notify();
                // Never sleep on unsealed blocks: the demoter only copies sealed ones, and a
                // short ring.spin_us must not leave them waiting for the next wake-up.
                if s.sealing.is_some() || !s.unsealed.is_empty() {
                    if last_work.elapsed() >= SEAL_AFTER_IDLE {
                        s.seal_step();
                    } else {
                        std::hint::spin_loop();
                    }
                    continue;
                }
                // While disk reads are in flight their completions wake the thread, and the
                // client's next descriptors mostly wait on them: spinning would only take the
                // CPU from the IO and client threads (measured: 15–20% of read throughput on
                // two cores).
                if last_work.elapsed() < spin && s.pending.is_empty() {
                    std::hint::spin_loop();
                    continue;
                }
                s.expire_leases();
                // Disk reads in flight wake the thread when they finish; the short sleep only
                // bounds the cost of a wake-up that raced the sleep.
                let nap = if s.pending.is_empty() { 100 } else { 1 };
                ring.sleep(Duration::from_millis(nap));
                last_work = Instant::now();
            }
        }
    }
    s.release_everything();
    ring.close();
    s.conn.shut();
}
