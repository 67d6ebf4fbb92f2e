//! The segment object format of the S3 tier: many blocks of one namespace in one object.
//!
//! S3 charges per request and is slow per request (tens of ms), so blocks are never one object
//! each: they are appended to a segment (about `s3.segment_bytes`) that is uploaded whole, and
//! a single block is read back with one ranged GET of its bytes. The segment carries its own
//! index at its end, so any node can learn what a segment holds with one suffix-ranged GET
//! and no other metadata store — this is how a node with an empty disk rebuilds its view of
//! the bucket.
//!
//! Layout (integers little-endian):
//! ```text
//! block bytes, back to back            (offsets in the index)
//! index: count × { key[32] | offset u64 | len u64 | checksum u64 }   (56 B each)
//! trailer (64 B): magic "KVDSEG01" | version u32 | count u32 | namespace[16] |
//!                 index_offset u64 | created_ms u64 | xxh3(index) u64 | xxh3(trailer[..56]) u64
//! ```
//! Every decoder here is a pure function over untrusted bytes with typed errors: a segment
//! written by another build, truncated by a server or altered in the bucket is refused, never
//! trusted. Block bytes are checked against each block's own checksum when read.

use crate::{BlockKey, NamespaceId};
use twox_hash::XxHash3_64;

const MAGIC: [u8; 8] = *b"KVDSEG01";
/// Version of the segment format written by this build.
pub const VERSION: u32 = 1;
/// Bytes of the trailer at the end of every segment.
pub const TRAILER_BYTES: u64 = 64;
/// Bytes of one index entry.
pub const ENTRY_BYTES: u64 = 56;
/// Most blocks in one segment (bounds the index a reader accepts).
pub const MAX_ENTRIES: u32 = 1 << 20;

/// One block in a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Block key.
    pub key: BlockKey,
    /// Offset of the block's bytes in the object.
    pub offset: u64,
    /// Length of the block.
    pub len: u64,
    /// xxh3-64 of the block's bytes.
    pub checksum: u64,
}

/// What a segment's trailer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// Blocks in the segment.
    pub count: u32,
    /// The namespace every block belongs to.
    pub ns: NamespaceId,
    /// Where the index starts (= the end of the block bytes).
    pub index_offset: u64,
    /// When the segment was sealed (ms since the Unix epoch).
    pub created_ms: u64,
    /// xxh3-64 of the index bytes.
    pub index_checksum: u64,
}

impl Trailer {
    /// Bytes of the index.
    pub fn index_len(&self) -> u64 {
        u64::from(self.count) * ENTRY_BYTES
    }

    /// Size of the whole object this trailer describes.
    pub fn object_len(&self) -> u64 {
        self.index_offset + self.index_len() + TRAILER_BYTES
    }
}

/// Why bytes are not a valid segment (or part of one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    /// Shorter than a trailer, or than what the trailer describes.
    #[error("segment truncated: {have} bytes, need {need}")]
    Truncated {
        /// Bytes needed.
        need: u64,
        /// Bytes present.
        have: u64,
    },
    /// Not a kvd segment.
    #[error("not a kvd segment (bad magic)")]
    Magic,
    /// Written by another format version.
    #[error("segment format version {0} (this build reads {VERSION})")]
    Version(u32),
    /// A checksum over the trailer or the index does not match.
    #[error("segment {0} checksum mismatch")]
    Checksum(&'static str),
    /// Offsets or counts that cannot be right.
    #[error("segment inconsistent: {0}")]
    Inconsistent(&'static str),
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Decodes the trailer: the last [`TRAILER_BYTES`] of `tail`, an object's last bytes, of an
/// object `object_len` bytes long.
pub fn decode_trailer(tail: &[u8], object_len: u64) -> Result<Trailer, SegmentError> {
    let n = TRAILER_BYTES as usize;
    if tail.len() < n {
        return Err(SegmentError::Truncated {
            need: TRAILER_BYTES,
            have: tail.len() as u64,
        });
    }
    let t = &tail[tail.len() - n..];
    if t[..8] != MAGIC {
        return Err(SegmentError::Magic);
    }
    if XxHash3_64::oneshot(&t[..56]) != u64_at(t, 56) {
        return Err(SegmentError::Checksum("trailer"));
    }
    let version = u32_at(t, 8);
    if version != VERSION {
        return Err(SegmentError::Version(version));
    }
    let count = u32_at(t, 12);
    let mut ns = [0u8; 16];
    ns.copy_from_slice(&t[16..32]);
    let tr = Trailer {
        count,
        ns: NamespaceId(ns),
        index_offset: u64_at(t, 32),
        created_ms: u64_at(t, 40),
        index_checksum: u64_at(t, 48),
    };
    if count > MAX_ENTRIES {
        return Err(SegmentError::Inconsistent("too many entries"));
    }
    if tr.index_offset.checked_add(tr.index_len() + TRAILER_BYTES) != Some(object_len) {
        return Err(SegmentError::Inconsistent(
            "index offset and count do not add up to the object's length",
        ));
    }
    Ok(tr)
}

/// Decodes and checks the index (`index` is exactly the index bytes the trailer names).
pub fn decode_index(tr: &Trailer, index: &[u8]) -> Result<Vec<Entry>, SegmentError> {
    if index.len() as u64 != tr.index_len() {
        return Err(SegmentError::Truncated {
            need: tr.index_len(),
            have: index.len() as u64,
        });
    }
    if XxHash3_64::oneshot(index) != tr.index_checksum {
        return Err(SegmentError::Checksum("index"));
    }
    let mut out = Vec::with_capacity(tr.count as usize);
    for e in index.chunks_exact(ENTRY_BYTES as usize) {
        let mut key = [0u8; 32];
        key.copy_from_slice(&e[..32]);
        let entry = Entry {
            key: BlockKey(key),
            offset: u64_at(e, 32),
            len: u64_at(e, 40),
            checksum: u64_at(e, 48),
        };
        if entry.len == 0
            || entry
                .offset
                .checked_add(entry.len)
                .is_none_or(|end| end > tr.index_offset)
        {
            return Err(SegmentError::Inconsistent("a block lies outside the data"));
        }
        out.push(entry);
    }
    Ok(out)
}

/// Builds one segment in memory: blocks appended, then sealed with its index and trailer.
#[derive(Debug)]
pub struct Builder {
    ns: NamespaceId,
    buf: Vec<u8>,
    entries: Vec<Entry>,
    first_ms: u64,
}

impl Builder {
    /// An empty segment of `ns` with room for `capacity` bytes of blocks.
    pub fn new(ns: NamespaceId, capacity: usize, now_ms: u64) -> Self {
        Self {
            ns,
            buf: Vec::with_capacity(capacity),
            entries: Vec::new(),
            first_ms: now_ms,
        }
    }

    /// An empty segment of `ns` built in `buf` (cleared; its capacity reused, so a pool of
    /// buffers saves the page faults of a fresh allocation per segment).
    pub fn with_buffer(ns: NamespaceId, mut buf: Vec<u8>, now_ms: u64) -> Self {
        buf.clear();
        Self {
            ns,
            buf,
            entries: Vec::new(),
            first_ms: now_ms,
        }
    }

    /// Appends a block copied from `src` if the copy matches `checksum` (hashed piece by
    /// piece right after each piece is copied, while it is in the CPU's cache: one pass over
    /// the source). False, and nothing appended, when it does not.
    pub fn push_checked(&mut self, key: BlockKey, src: &[u8], checksum: u64) -> bool {
        const PIECE: usize = 64 << 10;
        let start = self.buf.len();
        let mut h = XxHash3_64::new();
        for piece in src.chunks(PIECE) {
            let at = self.buf.len();
            self.buf.extend_from_slice(piece);
            std::hash::Hasher::write(&mut h, &self.buf[at..]);
        }
        if std::hash::Hasher::finish(&h) != checksum {
            self.buf.truncate(start);
            return false;
        }
        self.entries.push(Entry {
            key,
            offset: start as u64,
            len: src.len() as u64,
            checksum,
        });
        true
    }

    /// Appends a block (its checksum computed by the caller over the same bytes).
    pub fn push(&mut self, key: BlockKey, bytes: &[u8], checksum: u64) {
        self.entries.push(Entry {
            key,
            offset: self.buf.len() as u64,
            len: bytes.len() as u64,
            checksum,
        });
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes of blocks so far.
    pub fn data_len(&self) -> u64 {
        self.buf.len() as u64
    }

    /// Blocks so far.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No block yet.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// When the first block was appended (ms since the Unix epoch).
    pub fn first_ms(&self) -> u64 {
        self.first_ms
    }

    /// The namespace.
    pub fn ns(&self) -> NamespaceId {
        self.ns
    }

    /// The keys appended so far.
    pub fn keys(&self) -> impl Iterator<Item = &BlockKey> {
        self.entries.iter().map(|e| &e.key)
    }

    /// Appends the index and the trailer: the object's bytes, and its entries.
    pub fn seal(mut self, created_ms: u64) -> (Vec<u8>, Vec<Entry>) {
        let index_offset = self.buf.len() as u64;
        let start = self.buf.len();
        for e in &self.entries {
            self.buf.extend_from_slice(&e.key.0);
            self.buf.extend_from_slice(&e.offset.to_le_bytes());
            self.buf.extend_from_slice(&e.len.to_le_bytes());
            self.buf.extend_from_slice(&e.checksum.to_le_bytes());
        }
        let index_checksum = XxHash3_64::oneshot(&self.buf[start..]);
        let mut t = Vec::with_capacity(TRAILER_BYTES as usize);
        t.extend_from_slice(&MAGIC);
        t.extend_from_slice(&VERSION.to_le_bytes());
        t.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        t.extend_from_slice(&self.ns.0);
        t.extend_from_slice(&index_offset.to_le_bytes());
        t.extend_from_slice(&created_ms.to_le_bytes());
        t.extend_from_slice(&index_checksum.to_le_bytes());
        let check = XxHash3_64::oneshot(&t);
        t.extend_from_slice(&check.to_le_bytes());
        self.buf.extend_from_slice(&t);
        (self.buf, self.entries)
    }
}

/// Decodes a whole segment object (tests, and tools reading a downloaded segment).
pub fn decode(object: &[u8]) -> Result<(Trailer, Vec<Entry>), SegmentError> {
    let tr = decode_trailer(object, object.len() as u64)?;
    let start = tr.index_offset as usize;
    let end = start + tr.index_len() as usize;
    let entries = decode_index(&tr, &object[start..end])?;
    Ok((tr, entries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn build(blocks: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let ns = NamespaceId([7; 16]);
        let mut b = Builder::new(ns, 0, 5);
        for (k, bytes) in blocks {
            b.push(BlockKey([*k; 32]), bytes, XxHash3_64::oneshot(bytes));
        }
        b.seal(1234).0
    }

    #[test]
    fn round_trip() {
        let obj = build(&[(1, vec![1; 100]), (2, vec![2; 7]), (3, vec![3; 4096])]);
        let (tr, entries) = decode(&obj).unwrap();
        assert_eq!(tr.count, 3);
        assert_eq!(tr.ns, NamespaceId([7; 16]));
        assert_eq!(tr.created_ms, 1234);
        assert_eq!(tr.object_len(), obj.len() as u64);
        for e in entries {
            let bytes = &obj[e.offset as usize..(e.offset + e.len) as usize];
            assert!(bytes.iter().all(|&b| b == e.key.0[0]));
            assert_eq!(XxHash3_64::oneshot(bytes), e.checksum);
        }
    }

    #[test]
    fn trailer_from_a_suffix_and_the_index_alone() {
        let obj = build(&[(1, vec![1; 1000]), (2, vec![2; 1000])]);
        let tail = &obj[obj.len() - 300..];
        let tr = decode_trailer(tail, obj.len() as u64).unwrap();
        let idx = &obj[tr.index_offset as usize..tr.index_offset as usize + 112];
        assert_eq!(decode_index(&tr, idx).unwrap().len(), 2);
    }

    #[test]
    fn a_checked_push_refuses_bytes_that_do_not_match() {
        let mut b = Builder::with_buffer(NamespaceId([1; 16]), vec![9; 10], 0);
        let good = vec![5u8; 200_000];
        assert!(b.push_checked(BlockKey([1; 32]), &good, XxHash3_64::oneshot(&good)));
        assert!(!b.push_checked(BlockKey([2; 32]), &good, 1));
        assert_eq!((b.len(), b.data_len()), (1, 200_000));
        let (obj, entries) = b.seal(3);
        assert_eq!(entries[0].offset, 0);
        assert_eq!(decode(&obj).unwrap().1, entries);
    }

    #[test]
    fn damage_is_refused() {
        let obj = build(&[(1, vec![1; 100])]);
        let n = obj.len();
        let mut m = obj.clone();
        m[n - 64] ^= 1;
        assert_eq!(decode(&m).unwrap_err(), SegmentError::Magic);
        let mut m = obj.clone();
        m[n - 20] ^= 1;
        assert_eq!(decode(&m).unwrap_err(), SegmentError::Checksum("trailer"));
        let mut m = obj.clone();
        m[100 + 3] ^= 1;
        assert_eq!(decode(&m).unwrap_err(), SegmentError::Checksum("index"));
        assert!(matches!(
            decode(&obj[..30]),
            Err(SegmentError::Truncated { .. })
        ));
        // A suffix of a longer object: the lengths do not add up.
        assert!(matches!(
            decode_trailer(&obj, n as u64 + 1),
            Err(SegmentError::Inconsistent(_))
        ));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400), len in 0u64..1000) {
            let _ = decode_trailer(&bytes, len);
            let _ = decode(&bytes);
        }

        #[test]
        fn any_blocks_round_trip(sizes in prop::collection::vec(1usize..3000, 0..20)) {
            let blocks: Vec<(u8, Vec<u8>)> =
                sizes.iter().enumerate().map(|(i, &n)| (i as u8, vec![i as u8; n])).collect();
            let obj = build(&blocks);
            let (tr, entries) = decode(&obj).unwrap();
            prop_assert_eq!(tr.count as usize, blocks.len());
            for (e, (k, b)) in entries.iter().zip(&blocks) {
                prop_assert_eq!(e.key, BlockKey([*k; 32]));
                prop_assert_eq!(&obj[e.offset as usize..(e.offset + e.len) as usize], &b[..]);
            }
        }
    }
}
