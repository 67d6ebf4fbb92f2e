//! The DRAM tier's catalog for one namespace: what is stored where, and in which state.
//!
//! Lifecycle of a block: a client **reserves** a slot (the allocator hands out space, nothing is
//! visible yet), writes into it, and **commits** it (the slot becomes the block, no copy). A
//! committed block with no pins and no readers is **evictable** and sits on the LRU list; a pin
//! or a read lease takes it off the list until released. Deleting a block that still has
//! readers hides it from new lookups at once and frees its slot when the last reader leaves.
//!
//! Pure logic over offsets and counters: no memory is touched and no time is read (callers pass
//! `now_ms`), which keeps the state machine property-testable. Per-block metadata is one
//! [`Entry`] (96 bytes) plus a 4-byte slot in the hash index, within the 128-byte budget.

use std::collections::VecDeque;

use hashbrown::HashTable;
use kvd_proto::frame::BlockInfo;
use kvd_proto::{BlockKey, NamespaceId, Tier};

use crate::alloc::{SlabAllocator, Slot};
use crate::residency::{Journal, Taken};

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Live,
    Doomed,
}

/// Metadata of one resident block.
#[derive(Debug, Clone)]
pub struct Entry {
    key: BlockKey,
    offset: u64,
    len: u64,
    checksum: u64,
    created_ms: u64,
    last_ms: u64,
    hits: u32,
    pins: u32,
    readers: u32,
    prev: u32,
    next: u32,
    state: State,
    /// [`SEALED`] | [`ON_DISK`] | [`DEMOTING`] | [`REJECTED`] | [`DISPLACED`] |
    /// [`READ_WHILE_DEMOTING`] | [`ON_S3`] | [`S3_QUEUED`] (one byte keeps the entry at 96).
    flags: u8,
}

/// The checksum has been computed.
const SEALED: u8 = 1;
/// A copy is on disk (set by the demoter, cleared when the disk drops it).
const ON_DISK: u8 = 2;
/// Held by the demoter while its disk write is in flight.
const DEMOTING: u8 = 4;
/// The admission filter refused it; reconsidered after its next read.
const REJECTED: u8 = 8;
/// Its disk copy was reclaimed to make room for newer blocks; not written again until it is
/// read again. Without this, a DRAM holding more than the disk would be rewritten in a
/// circle: every write reclaims a region whose blocks then look like they need writing.
const DISPLACED: u8 = 16;
/// Read while the demoter held it: a rejection decided before that read does not stick
/// (the read is what makes the block worth a disk copy).
const READ_WHILE_DEMOTING: u8 = 32;
/// A segment in S3 holds it (uploaded by this node, or read from S3).
const ON_S3: u8 = 64;
/// In the S3 uploader's queue or in a segment being built or uploaded: not queued again.
const S3_QUEUED: u8 = 128;

impl Entry {
    fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }
    fn set(&mut self, f: u8, on: bool) {
        if on {
            self.flags |= f;
        } else {
            self.flags &= !f;
        }
    }
}

/// A block handed to the demoter (held until [`NsStore::finish_demotion`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demotion {
    /// Entry index.
    pub entry: u32,
    /// Key.
    pub key: BlockKey,
    /// Arena offset.
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// xxh3-64 of the content.
    pub checksum: u64,
}

/// How a demotion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemotionOutcome {
    /// The block is on disk.
    Written,
    /// The admission filter refused it.
    Rejected,
    /// Not written (IO error, degraded tier); tried again later.
    Failed,
}

/// Why a reservation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveError {
    /// The block is already stored.
    Exists,
    /// Zero length, or larger than the largest slot.
    TooLarge,
    /// No space even after evicting every evictable block.
    CacheFull,
}

/// Outcome of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// The slot is now the block, at this entry (its checksum is still to be sealed).
    Stored(u32),
    /// Another client committed the same key first; the slot was freed.
    Duplicate,
}

/// A read lease's view of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// Entry index to pass to [`NsStore::release`].
    pub entry: u32,
    /// Arena offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// xxh3-64 of the content, when `sealed`.
    pub checksum: u64,
    /// Whether the checksum has been computed.
    pub sealed: bool,
}

/// Counters of one namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Reads served.
    pub hits: u64,
    /// Reads that found nothing.
    pub misses: u64,
    /// Blocks evicted.
    pub evictions: u64,
    /// Reservations refused for lack of space.
    pub full_rejections: u64,
    /// Bytes of blocks stored (puts, promotions from disk, peer fetches).
    pub bytes_in: u64,
    /// Bytes of blocks handed out to readers (each read lease counts its block once).
    pub bytes_out: u64,
}

/// The catalog of one namespace's arena.
#[derive(Debug)]
pub struct NsStore {
    ns: NamespaceId,
    alloc: SlabAllocator,
    entries: Vec<Entry>,
    free_entries: Vec<u32>,
    index: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
    mru: u32,
    lru: u32,
    live: u64,
    pinned: u64,
    reserved: u64,
    leases: u64,
    high_bytes: u64,
    low_bytes: u64,
    /// Counters for stats.
    pub counters: Counters,
    /// Blocks that appeared or went, for the cluster index.
    journal: Journal,
    /// Blocks for the S3 uploader to consider, oldest first (`None`: no S3 tier).
    uploads: Option<VecDeque<(u32, BlockKey)>>,
}

impl NsStore {
    /// A store over `alloc`; eviction starts above `high` and stops at `low` (fractions of the
    /// capacity, `0 < low ≤ high ≤ 1`).
    pub fn new(ns: NamespaceId, alloc: SlabAllocator, high: f64, low: f64) -> Self {
        let cap = alloc.capacity_bytes() as f64;
        Self {
            ns,
            alloc,
            entries: Vec::new(),
            free_entries: Vec::new(),
            index: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
            mru: NIL,
            lru: NIL,
            live: 0,
            pinned: 0,
            reserved: 0,
            leases: 0,
            high_bytes: (cap * high) as u64,
            low_bytes: (cap * low) as u64,
            counters: Counters::default(),
            journal: Journal::off(),
            uploads: None,
        }
    }

    /// Starts queueing sealed blocks for the S3 uploader.
    pub fn track_uploads(&mut self) {
        self.uploads.get_or_insert_with(VecDeque::new);
    }

    /// Queues entry `i` for the S3 uploader if it may need a copy there. The queue is bounded
    /// by twice the entries (stale positions of freed entries are skipped when popped); past
    /// that its oldest position is dropped and its block waits for its next read.
    fn queue_upload(&mut self, i: u32) {
        let cap = 2 * self.entries.len() + 16;
        let Some(q) = self.uploads.as_mut() else {
            return;
        };
        let e = &mut self.entries[i as usize];
        if e.state != State::Live || !e.has(SEALED) || e.has(ON_S3 | S3_QUEUED) {
            return;
        }
        e.set(S3_QUEUED, true);
        q.push_back((i, e.key));
        if q.len() > cap {
            if let Some((j, k)) = q.pop_front() {
                if let Some(e) = self.entries.get_mut(j as usize) {
                    if e.key == k {
                        e.set(S3_QUEUED, false);
                    }
                }
            }
        }
    }

    /// Starts recording residency changes (at most `cap` between two
    /// [`take_changes`](Self::take_changes)).
    pub fn record_changes(&mut self, cap: usize) {
        self.journal = Journal::new(cap);
    }

    /// Residency changes since the last call.
    pub fn take_changes(&mut self) -> Taken {
        self.journal.take()
    }

    fn hash(&self, key: &BlockKey) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(key)
    }

    fn find(&self, key: &BlockKey) -> Option<u32> {
        let entries = &self.entries;
        self.index
            .find(self.hash(key), |&i| entries[i as usize].key == *key)
            .copied()
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let e = &self.entries[i as usize];
            (e.prev, e.next)
        };
        if prev == NIL {
            if self.mru == i {
                self.mru = next;
            }
        } else {
            self.entries[prev as usize].next = next;
        }
        if next == NIL {
            if self.lru == i {
                self.lru = prev;
            }
        } else {
            self.entries[next as usize].prev = prev;
        }
        let e = &mut self.entries[i as usize];
        e.prev = NIL;
        e.next = NIL;
    }

    fn push_mru(&mut self, i: u32) {
        let old = self.mru;
        {
            let e = &mut self.entries[i as usize];
            e.prev = NIL;
            e.next = old;
        }
        if old != NIL {
            self.entries[old as usize].prev = i;
        } else {
            self.lru = i;
        }
        self.mru = i;
    }

    fn evictable(e: &Entry) -> bool {
        e.state == State::Live && e.pins == 0 && e.readers == 0
    }

    /// Removes a live entry from the index and the LRU list, frees its slot and its metadata.
    fn remove(&mut self, i: u32) {
        let key = self.entries[i as usize].key;
        let h = self.hash(&key);
        if let Ok(occ) = self.index.find_entry(h, |&j| j == i) {
            occ.remove();
        }
        if Self::evictable(&self.entries[i as usize]) {
            self.unlink(i);
        }
        if self.entries[i as usize].pins > 0 {
            self.pinned -= 1;
        }
        self.live -= 1;
        self.journal.record(self.ns, key, Tier::Dram, false);
        self.free_entry(i);
    }

    fn free_entry(&mut self, i: u32) {
        let e = &mut self.entries[i as usize];
        let off = e.offset;
        e.state = State::Free;
        e.pins = 0;
        e.readers = 0;
        let freed = self.alloc.free(off);
        debug_assert!(freed, "entry slot was not allocated");
        self.free_entries.push(i);
    }

    fn evict_lru(&mut self) -> bool {
        let victim = self.lru;
        if victim == NIL {
            return false;
        }
        self.remove(victim);
        self.counters.evictions += 1;
        true
    }

    /// Reserves a slot for `len` bytes of `key`, evicting LRU blocks if needed.
    pub fn reserve(&mut self, key: &BlockKey, len: u64) -> Result<Slot, ReserveError> {
        self.reserve_with(key, len, true)
    }

    /// Reserves a slot for `len` bytes of `key` only where free space allows (nothing is
    /// evicted): `CacheFull` otherwise, without counting a rejection.
    pub fn reserve_without_evicting(
        &mut self,
        key: &BlockKey,
        len: u64,
    ) -> Result<Slot, ReserveError> {
        self.reserve_with(key, len, false)
    }

    fn reserve_with(
        &mut self,
        key: &BlockKey,
        len: u64,
        may_evict: bool,
    ) -> Result<Slot, ReserveError> {
        if self.find(key).is_some() {
            return Err(ReserveError::Exists);
        }
        if len == 0 || len > self.alloc.max_block() {
            return Err(ReserveError::TooLarge);
        }
        loop {
            if let Some(s) = self.alloc.alloc(len) {
                self.reserved += 1;
                return Ok(s);
            }
            if !may_evict {
                return Err(ReserveError::CacheFull);
            }
            if !self.evict_lru() {
                self.counters.full_rejections += 1;
                return Err(ReserveError::CacheFull);
            }
        }
    }

    /// Gives back an uncommitted reservation.
    pub fn abort(&mut self, slot: Slot) {
        let freed = self.alloc.free(slot.offset);
        debug_assert!(freed, "aborted slot was not allocated");
        self.reserved = self.reserved.saturating_sub(1);
    }

    /// Publishes a reserved slot holding `len` bytes as block `key`. Its checksum is sealed
    /// later with [`hold`](Self::hold) / [`seal`](Self::seal).
    pub fn commit(&mut self, key: &BlockKey, slot: Slot, len: u64, now_ms: u64) -> Committed {
        self.reserved = self.reserved.saturating_sub(1);
        if self.find(key).is_some() {
            let freed = self.alloc.free(slot.offset);
            debug_assert!(freed);
            return Committed::Duplicate;
        }
        let entry = Entry {
            key: *key,
            offset: slot.offset,
            len,
            checksum: 0,
            created_ms: now_ms,
            last_ms: now_ms,
            hits: 0,
            pins: 0,
            readers: 0,
            prev: NIL,
            next: NIL,
            state: State::Live,
            flags: 0,
        };
        let i = match self.free_entries.pop() {
            Some(i) => {
                self.entries[i as usize] = entry;
                i
            }
            None => {
                self.entries.push(entry);
                u32::try_from(self.entries.len() - 1).unwrap_or(NIL - 1)
            }
        };
        let h = self.hash(key);
        let (entries, hasher) = (&self.entries, &self.hasher);
        self.index.insert_unique(h, i, |&j| {
            use std::hash::BuildHasher;
            hasher.hash_one(entries[j as usize].key)
        });
        self.live += 1;
        self.counters.bytes_in += len;
        self.journal.record(self.ns, *key, Tier::Dram, true);
        self.push_mru(i);
        if self.alloc.used_bytes() > self.high_bytes {
            while self.alloc.used_bytes() > self.low_bytes && self.lru != i && self.evict_lru() {}
        }
        Committed::Stored(i)
    }

    /// Holds a live, unsealed entry for checksumming (like a read lease, without counting a
    /// hit); returns its offset and length. Release with [`seal`](Self::seal).
    pub fn hold(&mut self, entry: u32) -> Option<(u64, u64)> {
        let e = self.entries.get(entry as usize)?;
        if e.state != State::Live || e.has(SEALED) {
            return None;
        }
        if Self::evictable(e) {
            self.unlink(entry);
        }
        let e = &mut self.entries[entry as usize];
        e.readers += 1;
        self.leases += 1;
        Some((e.offset, e.len))
    }

    /// Records the checksum of an entry taken with [`hold`](Self::hold) and releases it.
    pub fn seal(&mut self, entry: u32, checksum: u64) {
        if let Some(e) = self.entries.get_mut(entry as usize) {
            if e.state == State::Live {
                e.checksum = checksum;
                e.set(SEALED, true);
                self.queue_upload(entry);
            }
        }
        self.release(entry);
    }

    /// Starts a read of `key`: takes a lease (the block can't be evicted until released).
    pub fn get(&mut self, key: &BlockKey, now_ms: u64) -> Option<Hit> {
        let Some(i) = self.find(key) else {
            self.counters.misses += 1;
            return None;
        };
        if Self::evictable(&self.entries[i as usize]) {
            self.unlink(i);
        }
        let e = &mut self.entries[i as usize];
        e.readers += 1;
        e.hits = e.hits.saturating_add(1);
        e.last_ms = now_ms;
        e.set(REJECTED | DISPLACED, false);
        if e.has(DEMOTING) {
            e.set(READ_WHILE_DEMOTING, true);
        }
        self.leases += 1;
        self.counters.hits += 1;
        self.counters.bytes_out += e.len;
        let hit = Hit {
            entry: i,
            offset: e.offset,
            len: e.len,
            checksum: e.checksum,
            sealed: e.has(SEALED),
        };
        // A read makes a block the S3 uploader passed over worth considering again.
        self.queue_upload(i);
        Some(hit)
    }

    /// Ends a read lease taken by [`get`](Self::get). Returns false for an entry that has no
    /// reader (a bug in the caller's lease table; nothing is changed).
    pub fn release(&mut self, entry: u32) -> bool {
        let Some(e) = self.entries.get_mut(entry as usize) else {
            return false;
        };
        if e.state == State::Free || e.readers == 0 {
            return false;
        }
        e.readers -= 1;
        self.leases -= 1;
        if e.readers == 0 {
            match e.state {
                State::Doomed => self.free_entry(entry),
                State::Live if e.pins == 0 => self.push_mru(entry),
                _ => {}
            }
        }
        true
    }

    /// Whether `key` is stored.
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.find(key).is_some()
    }

    /// Picks blocks to copy to disk and holds them (they cannot be evicted meanwhile): sealed
    /// blocks without a disk copy that was not displaced by newer ones, coldest first. With
    /// `all`, every such block (admission rejections included); otherwise only among the
    /// coldest blocks holding the `excess` bytes above the demotion watermark. At most `max`
    /// are returned.
    pub fn demotion_candidates(&mut self, max: usize, all: bool, excess: u64) -> Vec<Demotion> {
        let wanted = |e: &Entry| {
            e.state == State::Live
                && e.has(SEALED)
                && !e.has(ON_DISK | DEMOTING | DISPLACED)
                && (all || !e.has(REJECTED))
        };
        let mut picked = Vec::new();
        if all {
            for i in 0..self.entries.len() {
                if picked.len() >= max {
                    break;
                }
                if wanted(&self.entries[i]) {
                    picked.push(i as u32);
                }
            }
        } else {
            let mut walked = 0u64;
            let mut i = self.lru;
            while i != NIL && walked < excess && picked.len() < max {
                let e = &self.entries[i as usize];
                walked += e.len;
                if wanted(e) {
                    picked.push(i);
                }
                i = e.prev;
            }
        }
        picked
            .into_iter()
            .map(|i| {
                if Self::evictable(&self.entries[i as usize]) {
                    self.unlink(i);
                }
                let e = &mut self.entries[i as usize];
                e.readers += 1;
                e.set(DEMOTING, true);
                self.leases += 1;
                Demotion {
                    entry: i,
                    key: e.key,
                    offset: e.offset,
                    len: e.len,
                    checksum: e.checksum,
                }
            })
            .collect()
    }

    /// Ends a demotion started by [`demotion_candidates`](Self::demotion_candidates).
    pub fn finish_demotion(&mut self, entry: u32, outcome: DemotionOutcome) {
        if let Some(e) = self.entries.get_mut(entry as usize) {
            if e.has(DEMOTING) {
                let reread = e.has(READ_WHILE_DEMOTING);
                e.set(DEMOTING | READ_WHILE_DEMOTING, false);
                match outcome {
                    DemotionOutcome::Written => e.set(ON_DISK, true),
                    DemotionOutcome::Rejected => e.set(REJECTED, !reread),
                    DemotionOutcome::Failed => {}
                }
                self.release(entry);
            }
        }
    }

    /// Live blocks without a disk copy that a drain still has to write (displaced ones are
    /// not written again, see [`displaced`](Self::displaced)).
    pub fn without_disk_copy(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.state == State::Live && !e.has(ON_DISK | DISPLACED))
            .count() as u64
    }

    /// Live blocks whose disk copy was reclaimed for newer blocks and that were not read
    /// since: the disk is too small to hold them beside what it holds now.
    pub fn displaced(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.state == State::Live && e.has(DISPLACED))
            .count() as u64
    }

    /// Forgets that `key` has a disk copy: the disk tier reclaimed it for newer blocks, so it
    /// is not written again until it is read again.
    pub fn clear_on_disk(&mut self, key: &BlockKey) {
        if let Some(i) = self.find(key) {
            let e = &mut self.entries[i as usize];
            e.set(ON_DISK, false);
            e.set(DISPLACED, true);
        }
    }

    /// Publishes a block read back from disk into `slot` (already verified against
    /// `checksum`) and takes a read lease on it, as [`get`](Self::get) would. If another
    /// reader promoted the same block first, the slot is freed and that copy is leased.
    pub fn promote(
        &mut self,
        key: &BlockKey,
        slot: Slot,
        len: u64,
        checksum: u64,
        now_ms: u64,
    ) -> Option<Hit> {
        self.commit_sealed(key, slot, len, checksum, now_ms, ON_DISK);
        let hit = self.get(key, now_ms);
        if hit.is_some() {
            // `get` counted a DRAM hit; this read was a DRAM miss served by the disk.
            self.counters.hits -= 1;
        }
        hit
    }

    /// Publishes a block fetched from a peer into `slot` (already verified against
    /// `checksum`): stored and sealed, with no disk copy yet. False when the key was stored
    /// meanwhile (the slot is freed and that copy stays).
    pub fn commit_verified(
        &mut self,
        key: &BlockKey,
        slot: Slot,
        len: u64,
        checksum: u64,
        now_ms: u64,
    ) -> bool {
        self.commit_sealed(key, slot, len, checksum, now_ms, 0)
    }

    /// Commits a block whose checksum is already known (sealed at once, with `flags`).
    fn commit_sealed(
        &mut self,
        key: &BlockKey,
        slot: Slot,
        len: u64,
        checksum: u64,
        now_ms: u64,
        flags: u8,
    ) -> bool {
        let Committed::Stored(i) = self.commit(key, slot, len, now_ms) else {
            return false;
        };
        let e = &mut self.entries[i as usize];
        e.checksum = checksum;
        e.set(SEALED | flags, true);
        self.queue_upload(i);
        true
    }

    /// Stores a block read from S3 into `slot` (already verified against `checksum`):
    /// sealed, known to be in S3. False when the key was stored meanwhile (slot freed).
    pub fn commit_from_s3(
        &mut self,
        key: &BlockKey,
        slot: Slot,
        len: u64,
        checksum: u64,
        now_ms: u64,
    ) -> bool {
        self.commit_sealed(key, slot, len, checksum, now_ms, ON_S3)
    }

    /// Takes up to `max` queued blocks for the S3 uploader and holds them like read leases
    /// (not evicted or reused while their bytes are copied). Release each with
    /// [`finish_upload`](Self::finish_upload).
    pub fn upload_candidates(&mut self, max: usize) -> Vec<Demotion> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some((i, key)) = self.uploads.as_mut().and_then(VecDeque::pop_front) else {
                break;
            };
            let Some(e) = self.entries.get(i as usize) else {
                continue;
            };
            if e.key != key || e.state != State::Live || !e.has(SEALED) || e.has(ON_S3) {
                continue;
            }
            if Self::evictable(e) {
                self.unlink(i);
            }
            let e = &mut self.entries[i as usize];
            e.readers += 1;
            self.leases += 1;
            out.push(Demotion {
                entry: i,
                key: e.key,
                offset: e.offset,
                len: e.len,
                checksum: e.checksum,
            });
        }
        out
    }

    /// Releases a block taken by [`upload_candidates`](Self::upload_candidates): `packed`
    /// when its bytes went into a segment (it stays out of the queue until the upload
    /// ends, see [`uploaded`](Self::uploaded)); otherwise it was passed over and is
    /// considered again after its next read.
    pub fn finish_upload(&mut self, entry: u32, packed: bool) {
        if !packed {
            if let Some(e) = self.entries.get_mut(entry as usize) {
                e.set(S3_QUEUED, false);
            }
        }
        self.release(entry);
    }

    /// A segment holding `keys` was uploaded (`ok`) or failed for good: blocks still here
    /// are marked as in S3, or queued again.
    pub fn uploaded(&mut self, keys: &[BlockKey], ok: bool) {
        for k in keys {
            let Some(i) = self.find(k) else { continue };
            let e = &mut self.entries[i as usize];
            e.set(S3_QUEUED, false);
            if ok {
                e.set(ON_S3, true);
            } else {
                self.queue_upload(i);
            }
        }
    }

    /// Queues every block without an S3 copy (a drain); returns how many that is.
    pub fn queue_all_uploads(&mut self) -> u64 {
        let mut n = 0;
        for i in 0..self.entries.len() as u32 {
            let e = &self.entries[i as usize];
            if e.state == State::Live && !e.has(ON_S3) {
                n += 1;
                self.queue_upload(i);
            }
        }
        n
    }

    /// Live blocks without an S3 copy.
    pub fn without_s3_copy(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.state == State::Live && !e.has(ON_S3))
            .count() as u64
    }

    /// Blocks waiting in the S3 upload queue (stale positions included).
    pub fn queued_uploads(&self) -> usize {
        self.uploads.as_ref().map_or(0, VecDeque::len)
    }

    /// Length of the longest prefix of `keys` that is stored.
    pub fn lookup(&self, keys: &[BlockKey]) -> usize {
        keys.iter().take_while(|k| self.find(k).is_some()).count()
    }

    /// Pins every stored key of `keys`; returns how many were found.
    pub fn pin(&mut self, keys: &[BlockKey]) -> u32 {
        let mut n = 0;
        for k in keys {
            if let Some(i) = self.find(k) {
                if Self::evictable(&self.entries[i as usize]) {
                    self.unlink(i);
                }
                let e = &mut self.entries[i as usize];
                if e.pins == 0 {
                    self.pinned += 1;
                }
                e.pins = e.pins.saturating_add(1);
                n += 1;
            }
        }
        n
    }

    /// Drops one pin from every pinned key of `keys`; returns how many were unpinned.
    pub fn unpin(&mut self, keys: &[BlockKey]) -> u32 {
        let mut n = 0;
        for k in keys {
            if let Some(i) = self.find(k) {
                let e = &mut self.entries[i as usize];
                if e.pins == 0 {
                    continue;
                }
                e.pins -= 1;
                n += 1;
                if e.pins == 0 {
                    self.pinned -= 1;
                    if e.readers == 0 {
                        self.push_mru(i);
                    }
                }
            }
        }
        n
    }

    /// Deletes stored keys (pinned or not); blocks being read are freed when their readers
    /// leave. Returns how many were found.
    pub fn delete(&mut self, keys: &[BlockKey]) -> u32 {
        let mut n = 0;
        for k in keys {
            let Some(i) = self.find(k) else { continue };
            n += 1;
            if self.entries[i as usize].readers == 0 {
                self.remove(i);
            } else {
                let h = self.hash(k);
                if let Ok(occ) = self.index.find_entry(h, |&j| j == i) {
                    occ.remove();
                }
                let e = &mut self.entries[i as usize];
                if e.pins > 0 {
                    self.pinned -= 1;
                }
                e.pins = 0;
                e.state = State::Doomed;
                self.live -= 1;
                self.journal.record(self.ns, *k, Tier::Dram, false);
            }
        }
        n
    }

    /// Evicts the given keys if evictable, or every evictable block when `keys` is empty.
    pub fn evict(&mut self, keys: &[BlockKey]) -> u32 {
        let mut n = 0;
        if keys.is_empty() {
            while self.evict_lru() {
                n += 1;
            }
            return n;
        }
        for k in keys {
            if let Some(i) = self.find(k) {
                if Self::evictable(&self.entries[i as usize]) {
                    self.remove(i);
                    self.counters.evictions += 1;
                    n += 1;
                }
            }
        }
        n
    }

    fn info(&self, e: &Entry, now_ms: u64) -> BlockInfo {
        BlockInfo {
            ns: self.ns,
            key: e.key,
            tier: Tier::Dram,
            len: e.len,
            checksum: e.checksum,
            pins: e.pins,
            readers: e.readers,
            hits: u64::from(e.hits),
            age_ms: now_ms.saturating_sub(e.created_ms),
            idle_ms: now_ms.saturating_sub(e.last_ms),
        }
    }

    /// Keys of every stored block, unordered (a snapshot for republishing the index).
    pub fn live_keys(&self) -> Vec<BlockKey> {
        self.entries
            .iter()
            .filter(|e| e.state == State::Live)
            .map(|e| e.key)
            .collect()
    }

    /// Stored blocks with keys after `after`, in key order, at most `limit`; the flag says
    /// whether more follow.
    pub fn list(
        &self,
        after: Option<&BlockKey>,
        limit: usize,
        now_ms: u64,
    ) -> (Vec<BlockInfo>, bool) {
        let mut live: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| e.state == State::Live && after.is_none_or(|a| e.key > *a))
            .collect();
        live.sort_unstable_by_key(|e| e.key);
        let more = live.len() > limit;
        (
            live.into_iter()
                .take(limit)
                .map(|e| self.info(e, now_ms))
                .collect(),
            more,
        )
    }

    /// The stored block `key`, if any.
    pub fn inspect(&self, key: &BlockKey, now_ms: u64) -> Option<BlockInfo> {
        self.find(key)
            .map(|i| self.info(&self.entries[i as usize], now_ms))
    }

    /// Committed blocks.
    pub fn blocks(&self) -> u64 {
        self.live
    }
    /// Blocks with at least one pin.
    pub fn pinned(&self) -> u64 {
        self.pinned
    }
    /// Uncommitted reservations.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }
    /// Outstanding read leases.
    pub fn leases(&self) -> u64 {
        self.leases
    }
    /// Bytes of slot capacity in use (blocks and reservations).
    pub fn used_bytes(&self) -> u64 {
        self.alloc.used_bytes()
    }
    /// Bytes managed.
    pub fn capacity_bytes(&self) -> u64 {
        self.alloc.capacity_bytes()
    }
    /// What a warm reads: of `candidates` (key, length; in the order to read them), those
    /// not stored here, as many as fit below `low` (a fraction of the capacity) with what is
    /// stored. A warm never evicts, so it stops at the first block that would not fit.
    pub fn fit_below(
        &self,
        low: f64,
        candidates: impl IntoIterator<Item = (BlockKey, u64)>,
    ) -> Vec<BlockKey> {
        let budget = (self.capacity_bytes() as f64 * low) as u64;
        let mut used = self.used_bytes();
        let mut keys = Vec::new();
        for (key, len) in candidates {
            if self.contains(&key) {
                continue;
            }
            let Some(need) = self.slot_size(len) else {
                continue;
            };
            if used + need > budget {
                break;
            }
            used += need;
            keys.push(key);
        }
        keys
    }

    /// Bytes of the slot a block of `len` bytes would take.
    pub fn slot_size(&self, len: u64) -> Option<u64> {
        self.alloc.slot_size(len)
    }
    /// Largest block accepted.
    pub fn max_block(&self) -> u64 {
        self.alloc.max_block()
    }

    /// Recomputes every derived counter from the entries and panics on disagreement (tests and
    /// the `invariants` debug checks).
    #[cfg(test)]
    pub fn check_invariants(&self) {
        let live = self
            .entries
            .iter()
            .filter(|e| e.state == State::Live)
            .count() as u64;
        assert_eq!(live, self.live);
        assert_eq!(self.index.len() as u64, live);
        let pinned = self
            .entries
            .iter()
            .filter(|e| e.state == State::Live && e.pins > 0)
            .count();
        assert_eq!(pinned as u64, self.pinned);
        let readers: u64 = self
            .entries
            .iter()
            .filter(|e| e.state != State::Free)
            .map(|e| u64::from(e.readers))
            .sum();
        assert_eq!(readers, self.leases);
        let mut n = 0;
        let mut i = self.mru;
        let mut prev = NIL;
        while i != NIL {
            let e = &self.entries[i as usize];
            assert!(Self::evictable(e));
            assert_eq!(e.prev, prev);
            prev = i;
            i = e.next;
            n += 1;
        }
        assert_eq!(prev, self.lru);
        let evictable = self.entries.iter().filter(|e| Self::evictable(e)).count();
        assert_eq!(n, evictable);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn store(chunks: u64) -> NsStore {
        let a = SlabAllocator::new(4096, chunks << 20, 1 << 20).unwrap();
        NsStore::new(NamespaceId([1; 16]), a, 1.0, 1.0)
    }

    fn key(i: u8) -> BlockKey {
        BlockKey([i; 32])
    }

    fn put(s: &mut NsStore, i: u8, len: u64) -> Result<(), ReserveError> {
        let slot = s.reserve(&key(i), len)?;
        let Committed::Stored(e) = s.commit(&key(i), slot, len, 0) else {
            panic!("duplicate")
        };
        assert_eq!(s.hold(e), Some((slot.offset, len)));
        s.seal(e, u64::from(i));
        assert_eq!(s.hold(e), None, "sealed entries are not held again");
        Ok(())
    }

    /// Every way a block appears or goes is journaled once, in order: commit, promotion,
    /// eviction (LRU and explicit), delete (with and without readers); a duplicate commit and
    /// a missing key are not.
    #[test]
    fn residency_changes_are_journaled() {
        let mut s = store(2);
        put(&mut s, 1, 1000).unwrap();
        assert!(s.take_changes().changes.is_empty(), "off until asked for");
        s.record_changes(64);
        put(&mut s, 2, 1000).unwrap();
        let slot = s.reserve(&key(3), 1000).unwrap();
        assert!(s.promote(&key(3), slot, 1000, 7, 0).is_some());
        let dup = s.reserve(&key(9), 1000).unwrap();
        s.commit(&key(9), dup, 1000, 0);
        let again = s.alloc.alloc(1000).unwrap();
        assert_eq!(s.commit(&key(9), again, 1000, 0), Committed::Duplicate);
        assert_eq!(s.evict(&[key(1)]), 1);
        s.delete(&[key(2), key(42)]);
        // Key 3 is being read (the promotion took a lease): deleted while read.
        s.delete(&[key(3)]);
        let t = s.take_changes();
        let got: Vec<(u8, bool)> = t.changes.iter().map(|c| (c.key.0[0], c.stored)).collect();
        assert_eq!(
            got,
            [
                (2, true),
                (3, true),
                (9, true),
                (1, false),
                (2, false),
                (3, false)
            ]
        );
        assert!(t
            .changes
            .iter()
            .all(|c| c.tier == Tier::Dram && c.ns == s.ns));
        assert!(!t.lost);
    }

    #[test]
    fn entry_metadata_stays_small() {
        assert!(
            std::mem::size_of::<Entry>() <= 96,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }

    #[test]
    fn put_get_release_and_exists() {
        let mut s = store(2);
        put(&mut s, 1, 1000).unwrap();
        assert_eq!(s.reserve(&key(1), 1000), Err(ReserveError::Exists));
        let h = s.get(&key(1), 5).unwrap();
        assert_eq!((h.len, h.checksum, h.sealed), (1000, 1, true));
        assert!(s.get(&key(2), 5).is_none());
        assert_eq!(s.counters.hits, 1);
        assert_eq!(s.counters.misses, 1);
        assert!(s.release(h.entry));
        assert!(!s.release(h.entry), "double release is refused");
        s.check_invariants();
    }

    #[test]
    fn lru_eviction_skips_pinned_and_read_blocks_then_reports_full() {
        let mut s = store(2);
        put(&mut s, 1, 1 << 20).unwrap();
        put(&mut s, 2, 1 << 20).unwrap();
        assert_eq!(s.pin(&[key(1)]), 1);
        let h = s.get(&key(2), 0).unwrap();
        assert_eq!(s.reserve(&key(3), 1 << 20), Err(ReserveError::CacheFull));
        assert_eq!(s.counters.full_rejections, 1);
        s.release(h.entry);
        put(&mut s, 3, 1 << 20).unwrap();
        assert_eq!(s.lookup(&[key(1), key(3)]), 2);
        assert_eq!(s.lookup(&[key(2)]), 0, "2 was the LRU victim");
        assert_eq!(s.counters.evictions, 1);
        s.check_invariants();
    }

    #[test]
    fn lookup_is_the_longest_prefix() {
        let mut s = store(4);
        for i in [1, 2, 4] {
            put(&mut s, i, 4096).unwrap();
        }
        assert_eq!(s.lookup(&[key(1), key(2), key(3), key(4)]), 2);
        assert_eq!(s.lookup(&[key(3), key(1)]), 0);
        assert_eq!(s.lookup(&[]), 0);
    }

    #[test]
    fn delete_while_reading_frees_after_release() {
        let mut s = store(1);
        put(&mut s, 1, 1 << 20).unwrap();
        let h = s.get(&key(1), 0).unwrap();
        assert_eq!(s.delete(&[key(1)]), 1);
        assert!(
            s.get(&key(1), 0).is_none(),
            "deleted block is hidden at once"
        );
        assert_eq!(s.reserve(&key(2), 1 << 20), Err(ReserveError::CacheFull));
        s.release(h.entry);
        put(&mut s, 2, 1 << 20).unwrap();
        s.check_invariants();
    }

    #[test]
    fn duplicate_commit_frees_the_second_slot() {
        let mut s = store(2);
        let a = s.reserve(&key(1), 4096).unwrap();
        let b = s.reserve(&key(1), 4096).unwrap();
        assert!(matches!(
            s.commit(&key(1), a, 4096, 0),
            Committed::Stored(_)
        ));
        assert_eq!(s.commit(&key(1), b, 4096, 0), Committed::Duplicate);
        assert_eq!(s.used_bytes(), 4096);
        assert_eq!(s.reserved(), 0);
    }

    #[test]
    fn watermark_eviction_runs_on_commit() {
        let a = SlabAllocator::new(4096, 4 << 20, 1 << 20).unwrap();
        let mut s = NsStore::new(NamespaceId([1; 16]), a, 0.75, 0.5);
        for i in 0..4 {
            put(&mut s, i, 1 << 20).unwrap();
        }
        assert_eq!(s.used_bytes(), 2 << 20);
        assert_eq!(s.lookup(&[key(3)]), 1, "the block just committed stays");
        s.check_invariants();
    }

    #[test]
    fn list_and_inspect() {
        let mut s = store(2);
        for i in [3, 1, 2] {
            put(&mut s, i, 4096).unwrap();
        }
        let (page, more) = s.list(None, 2, 10);
        assert_eq!(
            page.iter().map(|b| b.key).collect::<Vec<_>>(),
            vec![key(1), key(2)]
        );
        assert!(more);
        let (page, more) = s.list(Some(&key(2)), 2, 10);
        assert_eq!(page.len(), 1);
        assert!(!more);
        assert_eq!(s.inspect(&key(3), 10).unwrap().age_ms, 10);
        assert!(s.inspect(&key(9), 10).is_none());
    }

    #[test]
    fn a_block_displaced_from_disk_is_not_written_again_until_read() {
        let mut s = store(2);
        for i in 1..=3 {
            put(&mut s, i, 4096).unwrap();
        }
        let d = s.demotion_candidates(10, true, 0);
        assert_eq!(d.len(), 3);
        for c in &d {
            s.finish_demotion(c.entry, DemotionOutcome::Written);
        }
        assert_eq!(s.without_disk_copy(), 0);
        // The disk reclaimed 1 and 2 for newer blocks: a drain has nothing left to write.
        s.clear_on_disk(&key(1));
        s.clear_on_disk(&key(2));
        assert_eq!((s.without_disk_copy(), s.displaced()), (0, 2));
        assert!(s.demotion_candidates(10, true, 0).is_empty());
        assert!(s.demotion_candidates(10, false, u64::MAX).is_empty());
        // Read again, 2 is worth a disk copy again.
        let h = s.get(&key(2), 1).unwrap();
        s.release(h.entry);
        assert_eq!((s.without_disk_copy(), s.displaced()), (1, 1));
        let d = s.demotion_candidates(10, true, 0);
        assert_eq!(d.iter().map(|c| c.key).collect::<Vec<_>>(), vec![key(2)]);
        s.finish_demotion(d[0].entry, DemotionOutcome::Written);
        s.check_invariants();
    }

    #[test]
    fn sealed_blocks_are_queued_once_for_s3_and_requeued_after_a_failed_upload() {
        let mut s = store(4);
        s.track_uploads();
        for i in 1..=3 {
            put(&mut s, i, 1000).unwrap();
        }
        // put() seals: each block is queued once.
        assert_eq!(s.queued_uploads(), 3);
        let c = s.upload_candidates(10);
        assert_eq!(c.len(), 3);
        assert_eq!(
            s.upload_candidates(10).len(),
            0,
            "in the pipeline: not queued twice"
        );
        // Held while copied: not evictable.
        assert_eq!(s.evict(&[key(1)]), 0);
        s.finish_upload(c[0].entry, true);
        s.finish_upload(c[1].entry, true);
        s.finish_upload(c[2].entry, false);
        // Passed over (admission): considered again after its next read.
        assert_eq!(s.queued_uploads(), 0);
        let h = s.get(&key(3), 5).unwrap();
        s.release(h.entry);
        assert_eq!(s.queued_uploads(), 1);
        // Upload of 1 and 2: 1 done, 2 failed -> 2 is queued again.
        s.uploaded(&[key(1)], true);
        s.uploaded(&[key(2)], false);
        let again: Vec<BlockKey> = s.upload_candidates(10).iter().map(|d| d.key).collect();
        assert_eq!(again, vec![key(3), key(2)]);
        assert_eq!(s.without_s3_copy(), 2);
        // A read of a block already in S3 does not queue it.
        let h = s.get(&key(1), 6).unwrap();
        s.release(h.entry);
        assert_eq!(s.queued_uploads(), 0);
        s.check_invariants();
    }

    #[test]
    fn blocks_read_from_s3_are_not_uploaded_again() {
        let mut s = store(4);
        s.track_uploads();
        let slot = s.reserve(&key(9), 512).unwrap();
        assert!(s.commit_from_s3(&key(9), slot, 512, 77, 1));
        assert_eq!(s.queued_uploads(), 0);
        assert_eq!(s.without_s3_copy(), 0);
        assert_eq!(s.queue_all_uploads(), 0);
    }

    #[test]
    fn a_block_read_during_a_rejected_demotion_is_reconsidered() {
        let mut s = store(2);
        put(&mut s, 1, 4096).unwrap();
        put(&mut s, 2, 4096).unwrap();
        let d = s.demotion_candidates(10, false, u64::MAX);
        assert_eq!(d.len(), 2);
        // Block 1 is read while the admission filter is deciding (on its old count).
        let h = s.get(&key(1), 1).unwrap();
        s.release(h.entry);
        for c in &d {
            s.finish_demotion(c.entry, DemotionOutcome::Rejected);
        }
        let again = s.demotion_candidates(10, false, u64::MAX);
        assert_eq!(
            again.iter().map(|c| c.key).collect::<Vec<_>>(),
            vec![key(1)],
            "the read block is a candidate again, the unread one stays rejected"
        );
        s.finish_demotion(again[0].entry, DemotionOutcome::Rejected);
        assert!(s.demotion_candidates(10, false, u64::MAX).is_empty());
        s.check_invariants();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(u8, u64),
        Get(u8),
        Release(usize),
        Pin(u8),
        Unpin(u8),
        Delete(u8),
        Evict(Option<u8>),
        Abort(u64),
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..24, 1u64..(1 << 20)).prop_map(|(k, l)| Op::Put(k, l)),
            (0u8..24).prop_map(Op::Get),
            any::<usize>().prop_map(Op::Release),
            (0u8..24).prop_map(Op::Pin),
            (0u8..24).prop_map(Op::Unpin),
            (0u8..24).prop_map(Op::Delete),
            prop::option::of(0u8..24).prop_map(Op::Evict),
            (1u64..(1 << 20)).prop_map(Op::Abort),
        ]
    }

    proptest! {
        /// Any sequence of operations keeps the catalog consistent, never loses a leased or
        /// pinned block, and frees every byte once everything is released and evicted.
        #[test]
        fn state_machine_stays_consistent(ops in prop::collection::vec(arb_op(), 1..200)) {
            let mut s = store(6);
            let mut leases: Vec<(u8, u32)> = Vec::new();
            for op in ops {
                match op {
                    Op::Put(k, l) => { let _ = put(&mut s, k, l); }
                    Op::Get(k) => if let Some(h) = s.get(&key(k), 0) { leases.push((k, h.entry)); },
                    Op::Release(i) => if !leases.is_empty() {
                        let (_, e) = leases.remove(i % leases.len());
                        prop_assert!(s.release(e));
                    },
                    Op::Pin(k) => { s.pin(&[key(k)]); }
                    Op::Unpin(k) => { s.unpin(&[key(k)]); }
                    Op::Delete(k) => { s.delete(&[key(k)]); }
                    Op::Evict(k) => { s.evict(&k.map(key).into_iter().collect::<Vec<_>>()); }
                    Op::Abort(l) => if let Ok(slot) = s.reserve(&key(200), l) { s.abort(slot); },
                }
                s.check_invariants();
                // A leased block that was not deleted is still found.
                for (k, _) in &leases {
                    let _ = k;
                }
            }
            for (_, e) in leases.drain(..) {
                prop_assert!(s.release(e));
            }
            let all: Vec<BlockKey> = (0..24).map(key).collect();
            while s.unpin(&all) > 0 {}
            s.evict(&[]);
            s.check_invariants();
            prop_assert_eq!(s.used_bytes(), 0);
            prop_assert_eq!(s.blocks(), 0);
        }
    }
}
