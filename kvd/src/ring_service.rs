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
//! Tokens for reservations and leases come from one per-connection counter. A token below the
//! counter but no longer held is `Stale` (e.g. a lease that timed out); a token never issued
//! can only come from a corrupted or hostile client, which is dropped.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::VecDeque;

use kvd_proto::ring::{Completion, Op, Status, Submission, COMPLETION_CHECKSUM_VALID};
use kvd_proto::BlockKey;
use kvd_shm::DaemonRing;
use xxhash_rust::xxh3::Xxh3;

use crate::alloc::Slot;
use crate::daemon::{Conn, Daemon, Namespace};
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
struct SealJob {
    ns: Arc<Namespace>,
    entry: u32,
    offset: u64,
    len: u64,
    done: u64,
    hasher: Xxh3,
}

impl SealJob {
    /// Holds `entry` for hashing; `None` if it is gone or already sealed.
    fn start(ns: Arc<Namespace>, entry: u32) -> Option<SealJob> {
        let (offset, len) = ns.store.lock().hold(entry)?;
        Some(SealJob {
            ns,
            entry,
            offset,
            len,
            done: 0,
            hasher: Xxh3::new(),
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
            let sum = self.hasher.digest();
            self.ns.store.lock().seal(self.entry, sum);
            return true;
        }
        false
    }

    fn finish(mut self) {
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
        if self.reservations.len() + self.leases.len() >= MAX_HELD_PER_CONN {
            return Err(Status::LimitExceeded);
        }
        Ok(ns)
    }

    fn handle(&mut self, sub: &Submission) -> Result<Completion, Violation> {
        let mut c = Completion::reply(sub, Status::Ok);
        if self.daemon.is_shutting_down() {
            c.status = Status::ShuttingDown as u16;
            return Ok(c);
        }
        match sub.op {
            Op::Nop => {}
            Op::Reserve => {
                let ns = match self.admit(sub.ns) {
                    Ok(ns) => ns,
                    Err(st) => {
                        c.status = st as u16;
                        return Ok(c);
                    }
                };
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
                    return Ok(c);
                };
                let len = sub.arg1;
                if len == 0 || len > r.slot.cap {
                    c.status = Status::BadLength as u16;
                    self.reservations.insert(sub.arg0, r);
                    return Ok(c);
                }
                let now = self.daemon.now_ms();
                let out = r.ns.store.lock().commit(&r.key, r.slot, len, now);
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
                        return Ok(c);
                    }
                };
                let hit = ns.store.lock().get(&sub.key, self.daemon.now_ms());
                match hit {
                    Some(h) => {
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
                    None => c.status = Status::NotFound as u16,
                }
            }
            Op::Release => match self.leases.remove(&sub.arg0) {
                Some(l) => {
                    l.ns.store.lock().release(l.entry);
                }
                None => c.status = self.unknown_token("release", sub.arg0)? as u16,
            },
        }
        Ok(c)
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

/// Serves `ring` for `conn` until the connection closes or the daemon shuts down.
pub fn run(daemon: Arc<Daemon>, conn: Arc<Conn>, mut ring: DaemonRing) {
    let spin = Duration::from_micros(daemon.cfg.ring.spin_us);
    let mut s = Session {
        lease_timeout: Duration::from_millis(u64::from(daemon.cfg.ring.lease_timeout_ms)),
        daemon,
        conn,
        reservations: HashMap::new(),
        leases: HashMap::new(),
        next_token: 1,
        unsealed: VecDeque::new(),
        sealing: None,
    };
    let mut last_work = Instant::now();
    let mut since_expiry = 0u32;
    'serve: loop {
        if s.conn.closed.load(Ordering::Acquire) {
            break;
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
                loop {
                    match ring.post(&c) {
                        Ok(true) => break,
                        Ok(false) => {
                            ring.notify();
                            if s.conn.closed.load(Ordering::Acquire) {
                                break 'serve;
                            }
                            std::thread::sleep(Duration::from_micros(50));
                        }
                        Err(e) => {
                            tracing::warn!(client = s.conn.id, error = %e, "dropping client: ring protocol violation");
                            break 'serve;
                        }
                    }
                }
                s.conn.ops.fetch_add(1, Ordering::Relaxed);
                since_expiry += 1;
                if since_expiry >= 4096 {
                    since_expiry = 0;
                    s.expire_leases();
                }
                last_work = Instant::now();
            }
            Ok(None) => {
                ring.notify();
                if last_work.elapsed() >= SEAL_AFTER_IDLE && s.seal_step() {
                    continue;
                }
                if last_work.elapsed() < spin {
                    std::hint::spin_loop();
                    continue;
                }
                s.expire_leases();
                ring.sleep(Duration::from_millis(100));
                last_work = Instant::now();
            }
        }
    }
    s.release_everything();
    ring.close();
    s.conn.shut();
}
