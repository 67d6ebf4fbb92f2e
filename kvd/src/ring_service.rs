//! The data plane: one thread per connection serving its shared-memory ring.
//!
//! The thread pops descriptors, applies them to the namespace stores and posts completions.
//! It spins for `ring.spin_us` after the last descriptor (a futex wake costs more than a
//! 64 KiB copy) and then sleeps on the ring's doorbell. It owns the connection's reservations
//! and read leases, so when the connection ends — cleanly, by a crash of the client, or because
//! the client broke the ring protocol — everything the client held is given back here.
//!
//! Tokens for reservations and leases come from one per-connection counter. A token below the
//! counter but no longer held is `Stale` (e.g. a lease that timed out); a token never issued
//! can only come from a corrupted or hostile client, which is dropped.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvd_proto::ring::{Completion, Op, Status, Submission};
use kvd_proto::BlockKey;
use kvd_shm::DaemonRing;

use crate::alloc::Slot;
use crate::daemon::{Conn, Daemon, Namespace};
use crate::store::{Committed, ReserveError};

/// Most reservations plus leases one connection may hold.
pub const MAX_HELD_PER_CONN: usize = 65_536;

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
            Err(Violation(format!("{op} of token {token} that was never issued")))
        }
    }

    fn held(&self) -> usize {
        self.reservations.len() + self.leases.len()
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
                let Some(ns) = self.namespace(sub.ns) else {
                    c.status = Status::BadNamespace as u16;
                    return Ok(c);
                };
                if self.held() >= MAX_HELD_PER_CONN {
                    c.status = Status::LimitExceeded as u16;
                    return Ok(c);
                }
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
                let sum = r.ns.arena.checksum(r.slot.offset, len);
                let now = self.daemon.now_ms();
                let out = r.ns.store.lock().commit(&r.key, r.slot, len, sum, now);
                c.checksum = sum;
                if out == Committed::Duplicate {
                    c.status = Status::Exists as u16;
                }
            }
            Op::Abort => match self.reservations.remove(&sub.arg0) {
                Some(r) => r.ns.store.lock().abort(r.slot),
                None => c.status = self.unknown_token("abort", sub.arg0)? as u16,
            },
            Op::Get => {
                let Some(ns) = self.namespace(sub.ns) else {
                    c.status = Status::BadNamespace as u16;
                    return Ok(c);
                };
                if self.held() >= MAX_HELD_PER_CONN {
                    c.status = Status::LimitExceeded as u16;
                    return Ok(c);
                }
                let hit = ns.store.lock().get(&sub.key, self.daemon.now_ms());
                match hit {
                    Some(h) => {
                        let token = self.token();
                        c.offset = h.offset;
                        c.len = h.len;
                        c.checksum = h.checksum;
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
                tracing::warn!(client = self.conn.id, token = t, "read lease timed out and was reclaimed");
            }
        }
    }

    fn release_everything(&mut self) {
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
