//! Byte layout of a namespace's shared DRAM arena.
//!
//! The arena is one memfd mapping per namespace, shared read-write by the daemon and the clients
//! that opened the namespace. Its first page is a header (magic, version, sizes, namespace id);
//! block slots live in the data region after it, at offsets the daemon hands out on the ring.
//! A client checks every offset and length it receives against [`ArenaHeader::check_slot`]
//! before touching memory, so a confused daemon can't make it read outside the mapping.

use crate::codec::DecodeError;
use crate::namespace::NamespaceId;

/// Magic at offset 0 of an arena: `KVDARENA`.
pub const ARENA_MAGIC: u64 = u64::from_le_bytes(*b"KVDARENA");
/// Layout version of the arena.
pub const ARENA_LAYOUT_VERSION: u32 = 1;
/// Bytes reserved for the header (the data region starts at a multiple of this or more).
pub const ARENA_HEADER_BYTES: usize = 4096;
/// Alignment of every slot (direct-IO friendly).
pub const SLOT_ALIGN: u64 = 4096;

/// Parsed arena header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArenaHeader {
    /// Total mapping size.
    pub total_bytes: u64,
    /// Where slots start (≥ [`ARENA_HEADER_BYTES`], a multiple of [`SLOT_ALIGN`]).
    pub data_offset: u64,
    /// Namespace the arena belongs to.
    pub ns: NamespaceId,
}

impl ArenaHeader {
    /// Encodes into the first bytes of the header page.
    pub fn write(&self, page: &mut [u8]) {
        page[0..8].copy_from_slice(&ARENA_MAGIC.to_le_bytes());
        page[8..12].copy_from_slice(&ARENA_LAYOUT_VERSION.to_le_bytes());
        page[16..24].copy_from_slice(&self.total_bytes.to_le_bytes());
        page[24..32].copy_from_slice(&self.data_offset.to_le_bytes());
        page[32..48].copy_from_slice(&self.ns.0);
    }

    /// Parses and checks a header against the mapping size.
    pub fn read(page: &[u8], mapped_bytes: u64) -> Result<Self, DecodeError> {
        if page.len() < 48 {
            return Err(DecodeError::Truncated {
                what: "arena header",
                need: 48,
                have: page.len(),
            });
        }
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&page[o..o + 8]);
            u64::from_le_bytes(x)
        };
        if u64_at(0) != ARENA_MAGIC {
            return Err(DecodeError::Invalid {
                what: "arena magic",
                why: "not a kvd arena".into(),
            });
        }
        let v = u32::from_le_bytes([page[8], page[9], page[10], page[11]]);
        if v != ARENA_LAYOUT_VERSION {
            return Err(DecodeError::Invalid {
                what: "arena layout version",
                why: format!("{v}, this build speaks {ARENA_LAYOUT_VERSION}"),
            });
        }
        let mut ns = [0u8; 16];
        ns.copy_from_slice(&page[32..48]);
        let h = Self {
            total_bytes: u64_at(16),
            data_offset: u64_at(24),
            ns: NamespaceId(ns),
        };
        if h.total_bytes != mapped_bytes
            || h.data_offset < ARENA_HEADER_BYTES as u64
            || h.data_offset % SLOT_ALIGN != 0
            || h.data_offset >= h.total_bytes
        {
            return Err(DecodeError::Invalid {
                what: "arena header",
                why: format!(
                    "sizes disagree: total {} data_offset {} mapped {mapped_bytes}",
                    h.total_bytes, h.data_offset
                ),
            });
        }
        Ok(h)
    }

    /// Checks that `[offset, offset+len)` is a slot inside the data region.
    pub fn check_slot(&self, offset: u64, len: u64) -> Result<(), DecodeError> {
        let end = offset.checked_add(len);
        match end {
            Some(end)
                if offset >= self.data_offset
                    && end <= self.total_bytes
                    && offset % SLOT_ALIGN == 0 =>
            {
                Ok(())
            }
            _ => Err(DecodeError::Invalid {
                what: "arena slot",
                why: format!(
                    "offset {offset} len {len} outside data region {}..{}",
                    self.data_offset, self.total_bytes
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_slot_checks() {
        let h = ArenaHeader {
            total_bytes: 1 << 20,
            data_offset: 4096,
            ns: NamespaceId([7; 16]),
        };
        let mut page = vec![0u8; 4096];
        h.write(&mut page);
        assert_eq!(ArenaHeader::read(&page, 1 << 20).unwrap(), h);
        assert!(ArenaHeader::read(&page, 1 << 21).is_err());
        assert!(h.check_slot(4096, 8192).is_ok());
        assert!(h.check_slot(0, 10).is_err());
        assert!(h.check_slot(4097, 10).is_err());
        assert!(h.check_slot((1 << 20) - 4096, 4097).is_err());
        assert!(h.check_slot(u64::MAX - 10, 100).is_err());
        page[0] = 0;
        assert!(ArenaHeader::read(&page, 1 << 20).is_err());
    }
}
