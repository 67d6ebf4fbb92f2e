//! The SPSC submission/completion queue pair over a shared ring mapping.
//!
//! [`ClientRing`] produces submissions and consumes completions; [`DaemonRing`] does the
//! opposite. Both keep their own copy of the counter they own and only read the other side's,
//! so a producer's index can never be rewound by the consumer. The daemon treats the client's
//! counters and entries as untrusted: a tail that ran more than `entries` ahead, a head that
//! claims to have consumed completions never posted, or a malformed descriptor is
//! [`RingError::Corrupt`], and the daemon drops that client.
//!
//! Doorbells: a consumer that found nothing after its spin sets its `sleeping` word, re-checks
//! the queue, then futex-waits on the word. A producer publishes its tail, issues a SeqCst fence
//! and swaps `sleeping` to 0, waking only when it was 1. The SeqCst store/load pairs make it
//! impossible for both to miss each other, so no wakeup is lost; waits also have a timeout.

use std::os::fd::OwnedFd;
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvd_proto::ring::{off, Completion, RingLayout, Submission, ENTRY_BYTES, HEADER_BYTES};
use kvd_proto::DecodeError;

use crate::futex;
use crate::map::{create_memfd, HugePages, MapError, Mapping};

/// Why a ring operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The peer wrote counters or entries no correct peer writes.
    #[error("ring corrupted by peer: {0}")]
    Corrupt(String),
    /// The daemon closed this ring (disconnect or shutdown).
    #[error("the daemon closed the ring (connection dropped or daemon shutting down)")]
    Closed,
    /// No completion arrived in time.
    #[error("no completion within {0:?}")]
    Timeout(Duration),
    /// Mapping the ring failed.
    #[error(transparent)]
    Map(#[from] MapError),
    /// The mapped header is not a ring this build understands.
    #[error("bad ring header: {0}")]
    Header(#[from] DecodeError),
}

/// The mapping and its layout, shared by a ring end and its wakers.
#[derive(Debug)]
pub struct RingShared {
    map: Mapping,
    layout: RingLayout,
    mask: u32,
}

impl RingShared {
    fn word(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset % 4 == 0 && offset + 4 <= HEADER_BYTES);
        // SAFETY: `offset` is one of the 4-byte-aligned header offsets inside the page-aligned
        // live mapping; every access to these words, in both processes, is atomic.
        unsafe { &*(self.map.as_ptr().add(offset).cast::<AtomicU32>()) }
    }

    fn entry_ptr(&self, queue_offset: usize, index: u32) -> *mut u8 {
        let i = (index & self.mask) as usize;
        // SAFETY: `i < entries`, so the entry lies inside the queue, which lies inside the
        // mapping (checked by `RingLayout` against the mapped size).
        unsafe { self.map.as_ptr().add(queue_offset + i * ENTRY_BYTES) }
    }

    fn read_entry(&self, queue_offset: usize, index: u32) -> [u8; ENTRY_BYTES] {
        let p = self
            .entry_ptr(queue_offset, index)
            .cast::<[u8; ENTRY_BYTES]>();
        // SAFETY: the entry is inside the mapping; a volatile copy snapshots it so that later
        // validation looks at bytes the peer can no longer change.
        unsafe { p.read_volatile() }
    }

    fn write_entry(&self, queue_offset: usize, index: u32, bytes: &[u8; ENTRY_BYTES]) {
        let p = self
            .entry_ptr(queue_offset, index)
            .cast::<[u8; ENTRY_BYTES]>();
        // SAFETY: the entry is inside the mapping and owned by the producer until it publishes
        // the tail past it.
        unsafe { p.write_volatile(*bytes) }
    }

    /// Whether the daemon closed the ring.
    pub fn is_closed(&self) -> bool {
        self.word(off::CLOSED).load(Ordering::Acquire) != 0
    }

    /// Entries per queue.
    pub fn entries(&self) -> u32 {
        self.layout.entries
    }
}

fn ring_bell(word: &AtomicU32) {
    fence(Ordering::SeqCst);
    if word.swap(0, Ordering::SeqCst) == 1 {
        futex::wake(word, 1);
    }
}

/// Sleeps on `sleeping` unless `ready()` turns true after announcing the sleep.
fn doze(sleeping: &AtomicU32, timeout: Duration, ready: impl Fn() -> bool) {
    sleeping.store(1, Ordering::SeqCst);
    fence(Ordering::SeqCst);
    if !ready() {
        futex::wait(sleeping, 1, timeout);
    }
    sleeping.store(0, Ordering::SeqCst);
}

/// The client end: submits descriptors, reaps completions.
#[derive(Debug)]
pub struct ClientRing {
    shared: RingShared,
    sq_tail: u32,
    cq_head: u32,
}

impl ClientRing {
    /// Maps the ring memfd received in the handshake and checks its header.
    pub fn from_fd(fd: &OwnedFd, ring_bytes: usize) -> Result<Self, RingError> {
        let map = Mapping::map_fd(fd, ring_bytes, true, false)?;
        // SAFETY: the header page is inside the mapping (ring_bytes ≥ 1 checked by map_fd;
        // check_header verifies the size) and only read here.
        let header = unsafe { map.slice(0, HEADER_BYTES.min(map.len())) };
        let layout = RingLayout::check_header(header, map.len())?;
        let shared = RingShared {
            mask: layout.entries - 1,
            map,
            layout,
        };
        let sq_tail = shared.word(off::SQ_TAIL).load(Ordering::Acquire);
        let cq_head = shared.word(off::CQ_HEAD).load(Ordering::Acquire);
        Ok(Self {
            shared,
            sq_tail,
            cq_head,
        })
    }

    /// Entries per queue; never keep more than this many submissions in flight.
    pub fn entries(&self) -> u32 {
        self.shared.entries()
    }

    /// Queues one submission without waking the daemon; `Ok(false)` when the queue is full.
    pub fn push(&mut self, sub: &Submission) -> Result<bool, RingError> {
        if self.shared.is_closed() {
            return Err(RingError::Closed);
        }
        let head = self.shared.word(off::SQ_HEAD).load(Ordering::Acquire);
        if self.sq_tail.wrapping_sub(head) >= self.shared.layout.entries {
            return Ok(false);
        }
        self.shared
            .write_entry(self.shared.layout.sq_offset, self.sq_tail, &sub.encode());
        self.sq_tail = self.sq_tail.wrapping_add(1);
        self.shared
            .word(off::SQ_TAIL)
            .store(self.sq_tail, Ordering::Release);
        Ok(true)
    }

    /// Wakes the daemon if it sleeps (call after one or more [`push`](Self::push)es).
    pub fn notify(&self) {
        ring_bell(self.shared.word(off::SQ_SLEEPING));
    }

    /// Takes one completion if any is ready.
    pub fn pop(&mut self) -> Option<Completion> {
        let tail = self.shared.word(off::CQ_TAIL).load(Ordering::Acquire);
        if tail == self.cq_head {
            return None;
        }
        let c = Completion::decode(
            &self
                .shared
                .read_entry(self.shared.layout.cq_offset, self.cq_head),
        );
        self.cq_head = self.cq_head.wrapping_add(1);
        self.shared
            .word(off::CQ_HEAD)
            .store(self.cq_head, Ordering::Release);
        Some(c)
    }

    /// Waits for the next completion: spins for `spin`, then sleeps on the doorbell, up to
    /// `timeout` in all.
    pub fn wait(&mut self, spin: Duration, timeout: Duration) -> Result<Completion, RingError> {
        let start = Instant::now();
        let mut n = 0u32;
        loop {
            if let Some(c) = self.pop() {
                return Ok(c);
            }
            n = n.wrapping_add(1);
            if n % 64 == 0 {
                let el = start.elapsed();
                if el >= spin {
                    break;
                }
            }
            std::hint::spin_loop();
        }
        loop {
            if let Some(c) = self.pop() {
                return Ok(c);
            }
            if self.shared.is_closed() {
                return Err(RingError::Closed);
            }
            let el = start.elapsed();
            if el >= timeout {
                return Err(RingError::Timeout(timeout));
            }
            let tail_word = self.shared.word(off::CQ_TAIL);
            let head = self.cq_head;
            doze(
                self.shared.word(off::CQ_SLEEPING),
                (timeout - el).min(Duration::from_millis(100)),
                || tail_word.load(Ordering::SeqCst) != head,
            );
        }
    }

    /// Whether the daemon closed this ring.
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }
}

/// The daemon end: consumes descriptors, posts completions.
#[derive(Debug)]
pub struct DaemonRing {
    shared: Arc<RingShared>,
    sq_head: u32,
    cq_tail: u32,
}

/// Lets another thread wake a daemon ring end, or look at how full its queues are.
#[derive(Debug, Clone)]
pub struct RingWaker(Arc<RingShared>);

impl RingWaker {
    /// Wakes the ring's service thread (it re-checks its connection state).
    pub fn wake(&self) {
        let w = self.0.word(off::SQ_SLEEPING);
        w.store(0, Ordering::SeqCst);
        futex::wake(w, 1);
    }

    /// Entries waiting in the submission queue (submitted, not yet taken by the daemon) and
    /// in the completion queue (posted, not yet reaped by the client): a snapshot of four
    /// words, two of them written by the client, so each depth is clamped to the ring size.
    pub fn depths(&self) -> (u32, u32) {
        let w = |o| self.0.word(o).load(Ordering::Acquire);
        let entries = self.0.entries();
        let sq = w(off::SQ_TAIL).wrapping_sub(w(off::SQ_HEAD)).min(entries);
        let cq = w(off::CQ_TAIL).wrapping_sub(w(off::CQ_HEAD)).min(entries);
        (sq, cq)
    }
}

impl DaemonRing {
    /// Creates a ring of `entries` per queue in a new sealed memfd; returns the ring and the fd
    /// to pass to the client.
    pub fn create(entries: u32) -> Result<(Self, OwnedFd), RingError> {
        let layout = RingLayout::new(entries)?;
        let fd = create_memfd("kvd-ring", layout.total_bytes as u64, HugePages::Off)?;
        let map = Mapping::map_fd(&fd, layout.total_bytes, true, true)?;
        // SAFETY: the header page is inside the fresh mapping, which no one else has yet.
        layout.write_header(unsafe { map.slice_mut(0, HEADER_BYTES) });
        let shared = Arc::new(RingShared {
            mask: entries - 1,
            map,
            layout,
        });
        Ok((
            Self {
                shared,
                sq_head: 0,
                cq_tail: 0,
            },
            fd,
        ))
    }

    /// Size of the mapping to announce in the handshake.
    pub fn bytes(&self) -> usize {
        self.shared.layout.total_bytes
    }

    /// Entries per queue.
    pub fn entries(&self) -> u32 {
        self.shared.entries()
    }

    /// A handle to wake this ring's service thread from elsewhere.
    pub fn waker(&self) -> RingWaker {
        RingWaker(self.shared.clone())
    }

    /// Takes the next submission, if any; `Corrupt` if the client broke the protocol.
    pub fn pop(&mut self) -> Result<Option<Submission>, RingError> {
        let tail = self.shared.word(off::SQ_TAIL).load(Ordering::Acquire);
        let avail = tail.wrapping_sub(self.sq_head);
        if avail == 0 {
            return Ok(None);
        }
        if avail > self.shared.layout.entries {
            return Err(RingError::Corrupt(format!(
                "submission tail {tail} is {avail} entries ahead of head {} (ring holds {})",
                self.sq_head, self.shared.layout.entries
            )));
        }
        let bytes = self
            .shared
            .read_entry(self.shared.layout.sq_offset, self.sq_head);
        self.sq_head = self.sq_head.wrapping_add(1);
        self.shared
            .word(off::SQ_HEAD)
            .store(self.sq_head, Ordering::Release);
        Submission::decode(&bytes)
            .map(Some)
            .map_err(|e| RingError::Corrupt(e.to_string()))
    }

    /// Posts a completion; `Ok(false)` when the client has not reaped enough (queue full).
    pub fn post(&mut self, c: &Completion) -> Result<bool, RingError> {
        let head = self.shared.word(off::CQ_HEAD).load(Ordering::Acquire);
        let used = self.cq_tail.wrapping_sub(head);
        if used > self.shared.layout.entries {
            return Err(RingError::Corrupt(format!(
                "completion head {head} claims entries never posted (tail {})",
                self.cq_tail
            )));
        }
        if used == self.shared.layout.entries {
            return Ok(false);
        }
        self.shared
            .write_entry(self.shared.layout.cq_offset, self.cq_tail, &c.encode());
        self.cq_tail = self.cq_tail.wrapping_add(1);
        self.shared
            .word(off::CQ_TAIL)
            .store(self.cq_tail, Ordering::Release);
        Ok(true)
    }

    /// Wakes the client if it sleeps (call after one or more [`post`](Self::post)s).
    pub fn notify(&self) {
        ring_bell(self.shared.word(off::CQ_SLEEPING));
    }

    /// Sleeps until a submission may be waiting, a [`RingWaker`] fires, or `timeout` passes.
    pub fn sleep(&self, timeout: Duration) {
        let tail = self.shared.word(off::SQ_TAIL);
        let head = self.sq_head;
        doze(self.shared.word(off::SQ_SLEEPING), timeout, || {
            tail.load(Ordering::SeqCst) != head
        });
    }

    /// Marks the ring closed and wakes the client so that its waits fail with
    /// [`RingError::Closed`].
    pub fn close(&self) {
        self.shared.word(off::CLOSED).store(1, Ordering::Release);
        let w = self.shared.word(off::CQ_SLEEPING);
        w.store(0, Ordering::SeqCst);
        futex::wake(w, i32::MAX);
    }

    #[cfg(test)]
    fn raw_word(&self, offset: usize) -> &AtomicU32 {
        self.shared.word(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvd_proto::ring::{Op, Status};
    use kvd_proto::BlockKey;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn pair(entries: u32) -> (ClientRing, DaemonRing) {
        let (d, fd) = DaemonRing::create(entries).unwrap();
        let c = ClientRing::from_fd(&fd, d.bytes()).unwrap();
        (c, d)
    }

    fn sub(i: u64) -> Submission {
        let mut s = Submission::new(Op::Get, 1, i);
        s.key = BlockKey([i as u8; 32]);
        s.arg0 = i;
        s
    }

    #[test]
    fn full_queue_is_reported_and_drains_in_order() {
        let (mut c, mut d) = pair(8);
        for i in 0..8 {
            assert!(c.push(&sub(i)).unwrap());
        }
        assert!(!c.push(&sub(99)).unwrap());
        for i in 0..8 {
            assert_eq!(d.pop().unwrap().unwrap(), sub(i));
        }
        assert!(d.pop().unwrap().is_none());
        for i in 0..8 {
            let s = sub(i);
            assert!(d.post(&Completion::reply(&s, Status::Ok)).unwrap());
        }
        assert!(!d.post(&Completion::reply(&sub(0), Status::Ok)).unwrap());
        for i in 0..8 {
            assert_eq!(c.pop().unwrap().user_data, i);
        }
    }

    #[test]
    fn corrupt_counters_and_entries_are_detected() {
        let (_c, mut d) = pair(8);
        d.raw_word(off::SQ_TAIL).store(100, Ordering::SeqCst);
        assert!(matches!(d.pop(), Err(RingError::Corrupt(_))));

        let (_c, mut d) = pair(8);
        d.raw_word(off::CQ_HEAD).store(5, Ordering::SeqCst);
        assert!(matches!(
            d.post(&Completion::reply(&sub(0), Status::Ok)),
            Err(RingError::Corrupt(_))
        ));

        let (mut c, mut d) = pair(8);
        c.push(&sub(1)).unwrap();
        // Scribble an invalid opcode over the queued entry.
        // SAFETY: test-only write inside the mapping's submission queue.
        unsafe { *d.shared.map.as_ptr().add(d.shared.layout.sq_offset) = 200 };
        assert!(matches!(d.pop(), Err(RingError::Corrupt(_))));
    }

    #[test]
    fn close_wakes_a_waiting_client() {
        let (mut c, d) = pair(8);
        let h = std::thread::spawn(move || c.wait(Duration::ZERO, Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(30));
        d.close();
        assert!(matches!(h.join().unwrap(), Err(RingError::Closed)));
    }

    #[test]
    fn wait_times_out() {
        let (mut c, _d) = pair(8);
        assert!(matches!(
            c.wait(Duration::from_micros(10), Duration::from_millis(20)),
            Err(RingError::Timeout(_))
        ));
    }

    #[test]
    fn two_threads_move_many_entries_without_loss() {
        let (mut c, mut d) = pair(16);
        const N: u64 = 200_000;
        let server = std::thread::spawn(move || {
            let mut served = 0u64;
            while served < N {
                match d.pop().unwrap() {
                    Some(s) => {
                        let mut cpl = Completion::reply(&s, Status::Ok);
                        cpl.token = s.arg0 * 2;
                        while !d.post(&cpl).unwrap() {
                            std::hint::spin_loop();
                        }
                        d.notify();
                        served += 1;
                    }
                    None => d.sleep(Duration::from_millis(5)),
                }
            }
        });
        let mut next_sub = 0u64;
        let mut next_cpl = 0u64;
        while next_cpl < N {
            while next_sub < N && next_sub - next_cpl < 16 && c.push(&sub(next_sub)).unwrap() {
                next_sub += 1;
            }
            c.notify();
            let cpl = c
                .wait(Duration::from_micros(50), Duration::from_secs(10))
                .unwrap();
            assert_eq!(cpl.user_data, next_cpl);
            assert_eq!(cpl.token, next_cpl * 2);
            next_cpl += 1;
        }
        server.join().unwrap();
    }

    proptest! {
        /// Any interleaving of pushes and pops behaves like two FIFO queues of capacity N.
        #[test]
        fn matches_a_fifo_model(ops in prop::collection::vec(0u8..4, 1..300)) {
            let (mut c, mut d) = pair(8);
            let mut sq: VecDeque<u64> = VecDeque::new();
            let mut cq: VecDeque<u64> = VecDeque::new();
            let mut n = 0u64;
            for op in ops {
                match op {
                    0 => {
                        let pushed = c.push(&sub(n)).unwrap();
                        prop_assert_eq!(pushed, sq.len() < 8);
                        if pushed { sq.push_back(n); }
                        n += 1;
                    }
                    1 => {
                        let got = d.pop().unwrap().map(|s| s.user_data);
                        prop_assert_eq!(got, sq.pop_front());
                    }
                    2 => {
                        let posted = d.post(&Completion::reply(&sub(n), Status::Ok)).unwrap();
                        prop_assert_eq!(posted, cq.len() < 8);
                        if posted { cq.push_back(n); }
                        n += 1;
                    }
                    _ => {
                        let got = c.pop().map(|c| c.user_data);
                        prop_assert_eq!(got, cq.pop_front());
                    }
                }
            }
        }
    }
}
