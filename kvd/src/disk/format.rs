//! On-disk formats of the disk tier: region headers and catalog records.
//!
//! Kept apart from the IO so that every decoder of bytes read back from a disk is a pure
//! function with typed errors, property-tested for round trips and for never panicking on
//! garbage. All integers are little-endian except the catalog's region-index keys, which are
//! big-endian so RocksDB orders them by (region, offset).
//!
//! Blocks fill a region file from offset 0, each at a 4 KiB-aligned offset so reads and
//! writes can bypass the page cache (O_DIRECT); its last 4 KiB page is the header
//! ([`RegionHeader`], at [`header_offset`]). Header last rather than first keeps blocks of one
//! size aligned to their size (a 4 MiB block at a 4 MiB boundary): an IO that straddles the
//! device's or volume's stripe or chunk boundaries costs 5–10% of write bandwidth measured on
//! virtual disks. Format 1 had the header first; such a directory is refused at start as
//! another version. The catalog holds three kinds of records:
//! - `b ‖ namespace(16) ‖ key(32)` → [`BlockRecord`]: where a block lives and its checksum;
//! - `r ‖ region(u32 BE) ‖ offset(u64 BE)` → `namespace ‖ key`: the blocks of a region, so a
//!   reclaim finds and deletes them in the same write batch;
//! - `m:format` → [`CatalogMeta`]: format version and geometry, checked at start.

use kvd_proto::{BlockKey, NamespaceId};
use twox_hash::XxHash3_64;

/// Alignment of every block and of the header page (direct IO needs ≥ the device's logical
/// block size; 4 KiB covers every device in use).
pub const ALIGN: u64 = 4096;
/// Bytes reserved for the header at the end of each region file.
pub const HEADER_BYTES: u64 = ALIGN;
/// Version of the region and catalog formats written by this build (2: header at the end).
pub const FORMAT_VERSION: u32 = 2;

/// Where the header of a region of `region_bytes` lives: its last page. Blocks end before it.
pub fn header_offset(region_bytes: u64) -> u64 {
    region_bytes.saturating_sub(HEADER_BYTES)
}

const REGION_MAGIC: [u8; 8] = *b"KVDREGN\0";
const HEADER_LEN: usize = 48;
const RECORD_LEN: usize = 53;
const META_LEN: usize = 28;
/// Catalog key of the metadata record.
pub const META_KEY: &[u8] = b"m:format";

/// Rounds `n` up to [`ALIGN`].
pub fn align_up(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// Why bytes read back from disk are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Too short.
    #[error("{what}: {have} bytes, need {need}")]
    Truncated {
        /// Which record.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// Not one of ours.
    #[error("{what}: bad magic (not a kvd file)")]
    BadMagic {
        /// Which record.
        what: &'static str,
    },
    /// Written by another format version.
    #[error("{what}: format version {found}, this kvd reads {FORMAT_VERSION}")]
    Version {
        /// Which record.
        what: &'static str,
        /// Version found.
        found: u32,
    },
    /// Internal checksum mismatch (torn or overwritten).
    #[error("{what}: checksum mismatch (torn or corrupted)")]
    Checksum {
        /// Which record.
        what: &'static str,
    },
}

fn need(what: &'static str, b: &[u8], n: usize) -> Result<(), FormatError> {
    if b.len() < n {
        Err(FormatError::Truncated {
            what,
            need: n,
            have: b.len(),
        })
    } else {
        Ok(())
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The header page of a region file: which region it is and which generation of it.
///
/// `seq` grows every time a region is (re)started, across all regions, so catalog records that
/// name an older `seq` than the header are left over from a reclaimed generation and dropped.
/// `instance` ties the file to the catalog that created it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionHeader {
    /// Region number (its file name).
    pub region: u32,
    /// Generation.
    pub seq: u64,
    /// Size of the region file.
    pub region_bytes: u64,
    /// Catalog instance that owns the file.
    pub instance: u64,
    /// When this generation started (Unix ms).
    pub created_unix_ms: u64,
}

impl RegionHeader {
    /// Encodes into a full header page.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_BYTES as usize];
        b[0..8].copy_from_slice(&REGION_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.region.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.region_bytes.to_le_bytes());
        b[32..40].copy_from_slice(&self.instance.to_le_bytes());
        b[40..48].copy_from_slice(&self.created_unix_ms.to_le_bytes());
        let sum = XxHash3_64::oneshot(&b[..HEADER_LEN]);
        b[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Decodes a header page read back from disk.
    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        const W: &str = "region header";
        need(W, b, HEADER_LEN + 8)?;
        if b[0..8] != REGION_MAGIC {
            return Err(FormatError::BadMagic { what: W });
        }
        if u64_at(b, HEADER_LEN) != XxHash3_64::oneshot(&b[..HEADER_LEN]) {
            return Err(FormatError::Checksum { what: W });
        }
        let v = u32_at(b, 8);
        if v != FORMAT_VERSION {
            return Err(FormatError::Version { what: W, found: v });
        }
        Ok(Self {
            region: u32_at(b, 12),
            seq: u64_at(b, 16),
            region_bytes: u64_at(b, 24),
            instance: u64_at(b, 32),
            created_unix_ms: u64_at(b, 40),
        })
    }
}

/// Where a block lives, its checksum and access statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRecord {
    /// Region number.
    pub region: u32,
    /// Region generation the block was written in.
    pub seq: u64,
    /// Offset in the region file (aligned).
    pub offset: u64,
    /// Block length in bytes.
    pub len: u64,
    /// xxh3-64 of the block.
    pub checksum: u64,
    /// When written (Unix ms).
    pub stored_unix_ms: u64,
    /// Reads served from disk.
    pub hits: u32,
    /// Last read or write (Unix ms).
    pub last_unix_ms: u64,
}

impl BlockRecord {
    /// Encodes the catalog value.
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[0] = FORMAT_VERSION as u8;
        b[1..5].copy_from_slice(&self.region.to_le_bytes());
        b[5..13].copy_from_slice(&self.seq.to_le_bytes());
        b[13..21].copy_from_slice(&self.offset.to_le_bytes());
        b[21..29].copy_from_slice(&self.len.to_le_bytes());
        b[29..37].copy_from_slice(&self.checksum.to_le_bytes());
        b[37..45].copy_from_slice(&self.stored_unix_ms.to_le_bytes());
        b[45..49].copy_from_slice(&self.hits.to_le_bytes());
        // Last access is kept at second precision in 4 bytes (Unix seconds, good to 2106).
        let secs = u32::try_from(self.last_unix_ms / 1000).unwrap_or(u32::MAX);
        b[49..53].copy_from_slice(&secs.to_le_bytes());
        b
    }

    /// Decodes a catalog value.
    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        const W: &str = "catalog block record";
        need(W, b, RECORD_LEN)?;
        if u32::from(b[0]) != FORMAT_VERSION {
            return Err(FormatError::Version {
                what: W,
                found: u32::from(b[0]),
            });
        }
        Ok(Self {
            region: u32_at(b, 1),
            seq: u64_at(b, 5),
            offset: u64_at(b, 13),
            len: u64_at(b, 21),
            checksum: u64_at(b, 29),
            stored_unix_ms: u64_at(b, 37),
            hits: u32_at(b, 45),
            last_unix_ms: u64::from(u32_at(b, 49)) * 1000,
        })
    }

    /// Whether the record fits inside a region of `region_bytes` (before the header).
    pub fn fits(&self, region_bytes: u64) -> bool {
        self.len > 0
            && self.offset % ALIGN == 0
            && self
                .offset
                .checked_add(align_up(self.len))
                .is_some_and(|end| end <= header_offset(region_bytes))
    }
}

/// Catalog key of a block.
pub fn block_key(ns: &NamespaceId, key: &BlockKey) -> [u8; 49] {
    let mut k = [0u8; 49];
    k[0] = b'b';
    k[1..17].copy_from_slice(&ns.0);
    k[17..49].copy_from_slice(&key.0);
    k
}

/// Splits a catalog block key.
pub fn parse_block_key(k: &[u8]) -> Option<(NamespaceId, BlockKey)> {
    if k.len() != 49 || k[0] != b'b' {
        return None;
    }
    let mut ns = [0u8; 16];
    ns.copy_from_slice(&k[1..17]);
    let mut key = [0u8; 32];
    key.copy_from_slice(&k[17..49]);
    Some((NamespaceId(ns), BlockKey(key)))
}

/// Catalog key of a region-index entry.
pub fn region_key(region: u32, offset: u64) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = b'r';
    k[1..5].copy_from_slice(&region.to_be_bytes());
    k[5..13].copy_from_slice(&offset.to_be_bytes());
    k
}

/// Prefix of every region-index entry of `region`.
pub fn region_prefix(region: u32) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[0] = b'r';
    k[1..5].copy_from_slice(&region.to_be_bytes());
    k
}

/// Value of a region-index entry.
pub fn region_value(ns: &NamespaceId, key: &BlockKey) -> [u8; 48] {
    let mut v = [0u8; 48];
    v[..16].copy_from_slice(&ns.0);
    v[16..].copy_from_slice(&key.0);
    v
}

/// Splits a region-index value.
pub fn parse_region_value(v: &[u8]) -> Option<(NamespaceId, BlockKey)> {
    if v.len() != 48 {
        return None;
    }
    let mut k = [0u8; 49];
    k[0] = b'b';
    k[1..].copy_from_slice(v);
    parse_block_key(&k)
}

/// What the catalog records about the layout it describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogMeta {
    /// Format version.
    pub version: u32,
    /// Region size the catalog was created with.
    pub region_bytes: u64,
    /// Random id written into every region header.
    pub instance: u64,
    /// Regions configured when created (informative; the count may change).
    pub regions: u32,
    /// Reserved.
    pub flags: u32,
}

impl CatalogMeta {
    /// Encodes the metadata record.
    pub fn encode(&self) -> [u8; META_LEN] {
        let mut b = [0u8; META_LEN];
        b[0..4].copy_from_slice(&self.version.to_le_bytes());
        b[4..12].copy_from_slice(&self.region_bytes.to_le_bytes());
        b[12..20].copy_from_slice(&self.instance.to_le_bytes());
        b[20..24].copy_from_slice(&self.regions.to_le_bytes());
        b[24..28].copy_from_slice(&self.flags.to_le_bytes());
        b
    }

    /// Decodes the metadata record; the version is checked first so a newer layout with a
    /// different size still reports its version.
    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        const W: &str = "catalog metadata";
        need(W, b, 4)?;
        let version = u32_at(b, 0);
        if version != FORMAT_VERSION {
            return Err(FormatError::Version {
                what: W,
                found: version,
            });
        }
        need(W, b, META_LEN)?;
        Ok(Self {
            version,
            region_bytes: u64_at(b, 4),
            instance: u64_at(b, 12),
            regions: u32_at(b, 20),
            flags: u32_at(b, 24),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_round_trip_and_damage() {
        let h = RegionHeader {
            region: 7,
            seq: 42,
            region_bytes: 1 << 28,
            instance: 0xfeed,
            created_unix_ms: 1_700_000_000_000,
        };
        let b = h.encode();
        assert_eq!(b.len(), HEADER_BYTES as usize);
        assert_eq!(RegionHeader::decode(&b), Ok(h));
        let mut bad = b.clone();
        bad[17] ^= 1;
        assert!(matches!(
            RegionHeader::decode(&bad),
            Err(FormatError::Checksum { .. })
        ));
        assert!(matches!(
            RegionHeader::decode(&[0u8; 4096]),
            Err(FormatError::BadMagic { .. })
        ));
        assert!(matches!(
            RegionHeader::decode(&b[..10]),
            Err(FormatError::Truncated { .. })
        ));
    }

    #[test]
    fn record_fits_only_inside_the_region() {
        let r = BlockRecord {
            region: 0,
            seq: 1,
            offset: 8192,
            len: 5000,
            checksum: 1,
            stored_unix_ms: 0,
            hits: 0,
            last_unix_ms: 0,
        };
        assert!(r.fits(8192 + 8192 + HEADER_BYTES));
        assert!(!r.fits(8192 + 8192), "it would overlap the header");
        assert!(BlockRecord { offset: 0, ..r }.fits(8192 + HEADER_BYTES));
        assert!(!BlockRecord { offset: 4097, ..r }.fits(1 << 20));
        assert!(!BlockRecord { len: 0, ..r }.fits(1 << 20));
        assert!(!BlockRecord {
            offset: u64::MAX - 4095,
            ..r
        }
        .fits(u64::MAX));
    }

    #[test]
    fn meta_reports_a_foreign_version() {
        let m = CatalogMeta {
            version: FORMAT_VERSION,
            region_bytes: 1 << 20,
            instance: 3,
            regions: 4,
            flags: 0,
        };
        assert_eq!(CatalogMeta::decode(&m.encode()), Ok(m));
        let mut b = m.encode();
        b[0] = 9;
        assert_eq!(
            CatalogMeta::decode(&b[..6]),
            Err(FormatError::Version {
                what: "catalog metadata",
                found: 9
            })
        );
    }

    #[test]
    fn keys_round_trip_and_order_by_region_then_offset() {
        let ns = NamespaceId([3; 16]);
        let key = BlockKey([9; 32]);
        assert_eq!(parse_block_key(&block_key(&ns, &key)), Some((ns, key)));
        assert_eq!(
            parse_region_value(&region_value(&ns, &key)),
            Some((ns, key))
        );
        assert_eq!(parse_region_value(&[0u8; 47]), None);
        assert_eq!(parse_region_value(&[0u8; 49]), None);
        assert!(region_key(1, u64::MAX) < region_key(2, 0));
        assert!(region_key(2, 4096) < region_key(2, 8192));
        assert!(region_key(2, 4096).starts_with(&region_prefix(2)));
    }

    proptest! {
        #[test]
        fn record_round_trips(region: u32, seq: u64, offset: u64, len: u64, checksum: u64,
                              stored: u64, hits: u32, last_s in 0u64..u64::from(u32::MAX)) {
            let r = BlockRecord { region, seq, offset, len, checksum, stored_unix_ms: stored,
                                  hits, last_unix_ms: last_s * 1000 };
            prop_assert_eq!(BlockRecord::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn decoders_never_panic(b in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = RegionHeader::decode(&b);
            let _ = BlockRecord::decode(&b);
            let _ = CatalogMeta::decode(&b);
            let _ = parse_block_key(&b);
            let _ = parse_region_value(&b);
        }
    }
}
