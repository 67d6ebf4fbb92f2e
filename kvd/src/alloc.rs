//! Size-class slab allocator over the offsets of an arena's data region.
//!
//! The data region is cut into equal chunks, each as large as the biggest size class. A chunk
//! is handed to one size class on demand and split into equal slots; when its last slot is
//! freed it returns to the free pool, so memory moves between classes as the block-size mix
//! changes. Classes step by quarters of a power of two (4, 5, 6, 7, 8, 10, 12, 14, 16 KiB…),
//! all multiples of 4 KiB, so slots stay direct-IO aligned and waste is at most 25 %.
//! Pure logic on integers: no memory is touched here, which keeps it property-testable.

use kvd_proto::arena::SLOT_ALIGN;

/// A slot handed out by [`SlabAllocator::alloc`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Offset in the arena.
    pub offset: u64,
    /// Capacity of the slot (≥ the requested length).
    pub cap: u64,
}

#[derive(Debug, Clone)]
struct Chunk {
    class: Option<u8>,
    free: Vec<u32>,
    used: u32,
}

/// Allocator state for one arena.
#[derive(Debug, Clone)]
pub struct SlabAllocator {
    data_offset: u64,
    chunk_bytes: u64,
    classes: Vec<u64>,
    chunks: Vec<Chunk>,
    free_chunks: Vec<u32>,
    /// Chunks of each class that may have free slots (stale entries skipped lazily).
    partial: Vec<Vec<u32>>,
    used_bytes: u64,
}

/// Bytes of one allocator chunk for blocks of at most `max_block` bytes (slots never cross a
/// chunk boundary; chunks start at the arena's data offset).
pub fn chunk_bytes_for(max_block: u64) -> u64 {
    class_sizes(max_block.max(SLOT_ALIGN))
        .last()
        .copied()
        .unwrap_or(SLOT_ALIGN)
}

fn class_sizes(max: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut base = SLOT_ALIGN;
    loop {
        for q in 4..8u64 {
            let s = base / 4 * q;
            if s % SLOT_ALIGN == 0 && out.last().is_none_or(|&l| s > l) {
                out.push(s);
                if s >= max {
                    return out;
                }
            }
        }
        base *= 2;
    }
}

impl SlabAllocator {
    /// An allocator for `[data_offset, data_offset + data_bytes)` serving blocks up to
    /// `max_block` bytes. Returns `None` when not even one chunk fits.
    pub fn new(data_offset: u64, data_bytes: u64, max_block: u64) -> Option<Self> {
        let classes = class_sizes(max_block.max(SLOT_ALIGN));
        let chunk_bytes = *classes.last()?;
        let n = data_bytes / chunk_bytes;
        if n == 0 {
            return None;
        }
        let n = u32::try_from(n).ok()?;
        Some(Self {
            data_offset,
            chunk_bytes,
            partial: vec![Vec::new(); classes.len()],
            classes,
            chunks: vec![
                Chunk {
                    class: None,
                    free: Vec::new(),
                    used: 0
                };
                n as usize
            ],
            free_chunks: (0..n).rev().collect(),
            used_bytes: 0,
        })
    }

    /// Largest block this allocator serves.
    pub fn max_block(&self) -> u64 {
        self.chunk_bytes
    }

    /// Bytes of slot capacity handed out.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// Bytes the allocator manages (whole chunks).
    pub fn capacity_bytes(&self) -> u64 {
        self.chunk_bytes * self.chunks.len() as u64
    }

    /// Bytes of the slot a block of `len` bytes takes (its size class); None when too large.
    pub fn slot_size(&self, len: u64) -> Option<u64> {
        self.class_of(len.max(1))
            .map(|c| self.classes[usize::from(c)])
    }

    fn class_of(&self, len: u64) -> Option<u8> {
        let i = self.classes.partition_point(|&c| c < len);
        if i < self.classes.len() {
            u8::try_from(i).ok()
        } else {
            None
        }
    }

    /// Allocates a slot for `len` bytes; `None` when no slot of that class is free.
    pub fn alloc(&mut self, len: u64) -> Option<Slot> {
        let class = self.class_of(len.max(1))?;
        let ci = usize::from(class);
        let size = self.classes[ci];
        while let Some(&chunk) = self.partial[ci].last() {
            let c = &mut self.chunks[chunk as usize];
            if c.class == Some(class) {
                if let Some(slot) = c.free.pop() {
                    c.used += 1;
                    if c.free.is_empty() {
                        self.partial[ci].pop();
                    }
                    self.used_bytes += size;
                    return Some(self.slot_at(chunk, slot, size));
                }
            }
            self.partial[ci].pop();
        }
        let chunk = self.free_chunks.pop()?;
        let per = u32::try_from(self.chunk_bytes / size).unwrap_or(u32::MAX);
        let c = &mut self.chunks[chunk as usize];
        c.class = Some(class);
        c.free = (1..per).rev().collect();
        c.used = 1;
        if !c.free.is_empty() {
            self.partial[ci].push(chunk);
        }
        self.used_bytes += size;
        Some(self.slot_at(chunk, 0, size))
    }

    fn slot_at(&self, chunk: u32, slot: u32, size: u64) -> Slot {
        Slot {
            offset: self.data_offset + u64::from(chunk) * self.chunk_bytes + u64::from(slot) * size,
            cap: size,
        }
    }

    /// Frees the slot at `offset`. Returns false (and changes nothing) when `offset` is not an
    /// allocated slot — a bug in the caller, reported rather than corrupting the free lists.
    pub fn free(&mut self, offset: u64) -> bool {
        let Some(rel) = offset.checked_sub(self.data_offset) else {
            return false;
        };
        let chunk = rel / self.chunk_bytes;
        let Some(c) = self.chunks.get_mut(chunk as usize) else {
            return false;
        };
        let Some(class) = c.class else {
            return false;
        };
        let size = self.classes[usize::from(class)];
        let within = rel % self.chunk_bytes;
        if within % size != 0 {
            return false;
        }
        let Ok(slot) = u32::try_from(within / size) else {
            return false;
        };
        if c.free.contains(&slot) || c.used == 0 {
            return false;
        }
        c.used -= 1;
        self.used_bytes -= size;
        let chunk = chunk as u32;
        if c.used == 0 {
            c.class = None;
            c.free = Vec::new();
            self.free_chunks.push(chunk);
        } else {
            if c.free.is_empty() {
                self.partial[usize::from(class)].push(chunk);
            }
            c.free.push(slot);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn classes_are_aligned_and_bounded() {
        let c = class_sizes(4 << 20);
        assert_eq!(c[0], 4096);
        assert!(c.iter().all(|s| s % 4096 == 0));
        assert!(c
            .windows(2)
            .all(|w| w[1] > w[0] && w[1] * 4 <= w[0] * 5 + 4096 * 4));
        assert_eq!(*c.last().unwrap(), 4 << 20);
        let c = class_sizes(3_000_000);
        assert!(*c.last().unwrap() >= 3_000_000);
    }

    #[test]
    fn too_small_region_and_too_large_block() {
        assert!(SlabAllocator::new(4096, 1 << 20, 4 << 20).is_none());
        let mut a = SlabAllocator::new(4096, 8 << 20, 1 << 20).unwrap();
        assert!(a.alloc((1 << 20) + 1).is_none());
        assert!(a.alloc(1 << 20).is_some());
    }

    #[test]
    fn exhaustion_and_chunk_recycling_between_classes() {
        let mut a = SlabAllocator::new(4096, 4 << 20, 1 << 20).unwrap();
        let small: Vec<_> = std::iter::from_fn(|| a.alloc(64 << 10)).collect();
        assert_eq!(small.len(), 64);
        assert!(a.alloc(1 << 20).is_none());
        for s in &small[..16] {
            assert!(a.free(s.offset));
        }
        // One whole chunk came free and serves a big block now.
        assert!(a.alloc(1 << 20).is_some());
        assert!(a.free(small[20].offset));
        assert!(!a.free(small[20].offset), "double free is refused");
        assert!(!a.free(3), "foreign offset is refused");
    }

    proptest! {
        /// Slots never overlap, stay inside the region and aligned, and accounting adds up.
        #[test]
        fn slots_never_overlap(ops in prop::collection::vec((any::<bool>(), 1u64..(1 << 20), any::<prop::sample::Index>()), 1..400)) {
            let region = 16u64 << 20;
            let mut a = SlabAllocator::new(8192, region, 1 << 20).unwrap();
            let mut live: BTreeMap<u64, u64> = BTreeMap::new();
            for (is_alloc, len, pick) in ops {
                if is_alloc || live.is_empty() {
                    if let Some(s) = a.alloc(len) {
                        prop_assert!(s.cap >= len && s.cap < len.max(4096) * 2);
                        prop_assert!(s.offset % 4096 == 0 && s.offset >= 8192);
                        prop_assert!(s.offset + s.cap <= 8192 + region);
                        if let Some((&o, &c)) = live.range(..s.offset + s.cap).next_back() {
                            prop_assert!(o + c <= s.offset || o >= s.offset + s.cap, "overlap");
                        }
                        live.insert(s.offset, s.cap);
                    }
                } else {
                    let off = *live.keys().nth(pick.index(live.len())).unwrap();
                    prop_assert!(a.free(off));
                    live.remove(&off);
                }
                prop_assert_eq!(a.used_bytes(), live.values().sum::<u64>());
            }
            for off in live.keys() {
                prop_assert!(a.free(*off));
            }
            prop_assert_eq!(a.used_bytes(), 0);
            prop_assert!(a.alloc(1 << 20).is_some());
        }
    }
}
