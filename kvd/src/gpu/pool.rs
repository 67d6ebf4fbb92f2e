//! T0: a daemon-owned pool of GPU memory (`gpu.pool_bytes`) holding copies of the blocks
//! engines saved most recently, so loading one of them is a device-to-device copy instead of
//! a transfer over PCIe.
//!
//! Why a bounded copy beside DRAM rather than a tier blocks move through: the DRAM tier stays
//! the record of every block — checksums, demotion to disk, the cluster index and events all
//! work from it — and T0 is an LRU of copies on top, filled by daemon-driven saves. Keys name
//! content, so a pooled copy is right for its key until the key is deleted; deleting a key
//! drops its pooled copy too (once no copy is reading it). An entry being read is leased and
//! never evicted or reused under a copy; a slot being filled is invisible until committed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use kvd_gpu::{Backend, DevicePtr, GpuError};
use kvd_proto::frame::TierStats;
use kvd_proto::{BlockKey, NamespaceId, Tier};
use parking_lot::Mutex;

use crate::alloc::{SlabAllocator, Slot};

type Key = (NamespaceId, BlockKey);

struct Entry {
    slot: Slot,
    len: u64,
    readers: u32,
    tick: u64,
    /// Deleted while read: freed by the last reader.
    dead: bool,
}

struct Inner {
    alloc: SlabAllocator,
    entries: HashMap<Key, Entry>,
    /// Live entries by last use, oldest first.
    lru: BTreeMap<u64, Key>,
    tick: u64,
    hits: u64,
    misses: u64,
    evictions: u64,
    bytes_in: u64,
    bytes_out: u64,
}

impl Inner {
    fn touch(&mut self, key: Key) -> u64 {
        self.tick += 1;
        let t = self.tick;
        if let Some(e) = self.entries.get_mut(&key) {
            self.lru.remove(&e.tick);
            e.tick = t;
            self.lru.insert(t, key);
        }
        t
    }

    /// Frees the least recently used entry nobody reads; false when there is none.
    fn evict_one(&mut self) -> bool {
        let victim = self
            .lru
            .iter()
            .find(|(_, k)| self.entries.get(k).is_some_and(|e| e.readers == 0))
            .map(|(&t, &k)| (t, k));
        let Some((t, k)) = victim else {
            return false;
        };
        self.lru.remove(&t);
        if let Some(e) = self.entries.remove(&k) {
            self.alloc.free(e.slot.offset);
            self.evictions += 1;
        }
        true
    }
}

/// The pool: one device allocation cut into slots by the same slab allocator as the arenas.
pub struct Pool {
    backend: Arc<dyn Backend>,
    base: DevicePtr,
    bytes: u64,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("bytes", &self.bytes).finish()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: `base` came from `alloc` on this backend; every copy holds a lease or a
        // reservation borrowed from the pool, so none runs once the pool is dropped.
        if let Err(e) = unsafe { self.backend.free(self.base) } {
            tracing::warn!(error = %e, "freeing the GPU block pool failed");
        }
    }
}

/// A slot reserved for a block being copied in; give it to [`Pool::commit`] or
/// [`Pool::abort`].
#[derive(Debug)]
pub struct Reserved {
    slot: Slot,
}

impl Reserved {
    /// Device address of the slot.
    pub fn addr(&self) -> DevicePtr {
        self.slot.offset
    }
}

/// A read lease on a pooled block: its device address and length.
#[derive(Debug, Clone, Copy)]
pub struct Lease {
    key: Key,
    /// Device address of the block.
    pub addr: DevicePtr,
    /// Bytes.
    pub len: u64,
}

impl Pool {
    /// Allocates `bytes` of device memory for blocks of at most `max_block` bytes.
    pub fn new(backend: Arc<dyn Backend>, bytes: u64, max_block: u64) -> Result<Pool, GpuError> {
        let len = usize::try_from(bytes)
            .map_err(|_| GpuError::Invalid(format!("a pool of {bytes} bytes")))?;
        let base = backend.alloc(len)?;
        let Some(alloc) = SlabAllocator::new(base, bytes, max_block) else {
            // SAFETY: just allocated, unused.
            let _ = unsafe { backend.free(base) };
            return Err(GpuError::Invalid(format!(
                "gpu.pool_bytes ({bytes}) holds no allocator chunk for blocks of \
                 dram.max_block_bytes ({max_block})"
            )));
        };
        Ok(Pool {
            backend,
            base,
            bytes,
            inner: Mutex::new(Inner {
                alloc,
                entries: HashMap::new(),
                lru: BTreeMap::new(),
                tick: 0,
                hits: 0,
                misses: 0,
                evictions: 0,
                bytes_in: 0,
                bytes_out: 0,
            }),
        })
    }

    /// A slot for `len` bytes of `key`, evicting the least recently used unread copies as
    /// needed; `None` when the key is pooled already or nothing can make room.
    pub fn reserve(&self, ns: NamespaceId, key: &BlockKey, len: u64) -> Option<Reserved> {
        let mut g = self.inner.lock();
        if g.entries.contains_key(&(ns, *key)) {
            return None;
        }
        loop {
            if let Some(slot) = g.alloc.alloc(len) {
                return Some(Reserved { slot });
            }
            if !g.evict_one() {
                return None;
            }
        }
    }

    /// Publishes a filled slot as `key`'s copy.
    pub fn commit(&self, ns: NamespaceId, key: &BlockKey, r: Reserved, len: u64) {
        let mut g = self.inner.lock();
        let k = (ns, *key);
        if g.entries.contains_key(&k) {
            g.alloc.free(r.slot.offset);
            return;
        }
        g.bytes_in += len;
        g.entries.insert(
            k,
            Entry {
                slot: r.slot,
                len,
                readers: 0,
                tick: 0,
                dead: false,
            },
        );
        g.touch(k);
    }

    /// Gives back a slot that was not filled.
    pub fn abort(&self, r: Reserved) {
        self.inner.lock().alloc.free(r.slot.offset);
    }

    /// Leases `key`'s pooled copy, if any (counted as a hit or a miss).
    pub fn lease(&self, ns: NamespaceId, key: &BlockKey) -> Option<Lease> {
        let mut g = self.inner.lock();
        let k = (ns, *key);
        let found = match g.entries.get_mut(&k) {
            Some(e) if !e.dead => {
                e.readers += 1;
                Some(Lease {
                    key: k,
                    addr: e.slot.offset,
                    len: e.len,
                })
            }
            _ => None,
        };
        match found {
            Some(l) => {
                g.hits += 1;
                g.bytes_out += l.len;
                g.touch(k);
            }
            None => g.misses += 1,
        }
        found
    }

    /// Ends a lease; a copy deleted meanwhile is freed by its last reader.
    pub fn release(&self, l: Lease) {
        let mut g = self.inner.lock();
        let free = match g.entries.get_mut(&l.key) {
            Some(e) => {
                e.readers = e.readers.saturating_sub(1);
                e.dead && e.readers == 0
            }
            None => false,
        };
        if free {
            if let Some(e) = g.entries.remove(&l.key) {
                g.alloc.free(e.slot.offset);
            }
        }
    }

    /// Drops the pooled copies of `keys` (at once, or when their last reader finishes).
    pub fn remove(&self, ns: NamespaceId, keys: &[BlockKey]) {
        let mut guard = self.inner.lock();
        let g = &mut *guard;
        for key in keys {
            let k = (ns, *key);
            let Some(e) = g.entries.get_mut(&k) else {
                continue;
            };
            let tick = e.tick;
            if e.readers > 0 {
                e.dead = true;
                g.lru.remove(&tick);
            } else if let Some(e) = g.entries.remove(&k) {
                g.lru.remove(&tick);
                g.alloc.free(e.slot.offset);
            }
        }
    }

    /// The pool as a tier in the daemon's statistics.
    pub fn stats(&self) -> TierStats {
        let g = self.inner.lock();
        TierStats {
            tier: Tier::Gpu,
            capacity_bytes: self.bytes,
            used_bytes: g.alloc.used_bytes(),
            blocks: g.entries.values().filter(|e| !e.dead).count() as u64,
            hits: g.hits,
            misses: g.misses,
            evictions: g.evictions,
            bytes_in: g.bytes_in,
            bytes_out: g.bytes_out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvd_gpu::host::HostBackend;

    fn pool(bytes: u64) -> Pool {
        Pool::new(Arc::new(HostBackend::new()), bytes, 1 << 20).expect("pool")
    }

    fn k(i: u8) -> BlockKey {
        BlockKey([i; 32])
    }

    const NS: NamespaceId = NamespaceId([1; 16]);

    fn put(p: &Pool, i: u8) -> bool {
        match p.reserve(NS, &k(i), 1 << 20) {
            Some(r) => {
                p.commit(NS, &k(i), r, 1 << 20);
                true
            }
            None => false,
        }
    }

    #[test]
    fn least_recently_used_copies_make_room_and_leased_ones_stay() {
        // Fill until the first eviction: the pool never holds more than its capacity.
        let p = pool(16 << 20);
        let mut n = 0;
        while put(&p, n) && n < 100 {
            n += 1;
            if p.stats().evictions > 0 {
                break;
            }
        }
        let cap = p.stats().blocks;
        assert!(cap >= 8, "{:?}", p.stats());
        assert!(p.stats().used_bytes <= 16 << 20);
        // The oldest surviving copy, read now, is not the next victim.
        let oldest = (0..n).find(|&i| p.lease(NS, &k(i)).map(|l| p.release(l)).is_some());
        let oldest = oldest.expect("some copy survives");
        let held = p.lease(NS, &k(oldest)).expect("lease");
        for i in 100..100 + cap as u8 {
            assert!(put(&p, i));
        }
        assert!(
            p.lease(NS, &k(oldest)).is_some(),
            "a leased copy is never evicted"
        );
        p.release(held);
        assert!(p.stats().evictions >= cap);
    }

    #[test]
    fn deleting_a_read_copy_frees_it_after_the_read() {
        let p = pool(16 << 20);
        assert!(put(&p, 1));
        assert!(!put(&p, 1), "pooled already");
        let l = p.lease(NS, &k(1)).expect("lease");
        p.remove(NS, &[k(1)]);
        assert!(
            p.lease(NS, &k(1)).is_none(),
            "deleted copies are not served"
        );
        let used = p.stats().used_bytes;
        assert!(used > 0);
        p.release(l);
        assert_eq!(p.stats().used_bytes, 0);
        assert_eq!(p.stats().blocks, 0);
        assert!(put(&p, 1), "the key can be pooled again");
        let s = p.stats();
        assert_eq!((s.hits, s.misses), (1, 1));
    }

    #[test]
    fn a_pool_too_small_for_one_chunk_is_refused() {
        let e = Pool::new(Arc::new(HostBackend::new()), 1 << 20, 8 << 20).unwrap_err();
        assert!(e.to_string().contains("gpu.pool_bytes"), "{e}");
    }
}
