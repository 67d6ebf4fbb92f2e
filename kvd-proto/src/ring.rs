//! Byte layout of the per-connection shared-memory ring, and its descriptors.
//!
//! One ring mapping per client connection holds a header page and two single-producer
//! single-consumer queues of 64-byte entries: the submission queue (client → daemon) and the
//! completion queue (daemon → client). Head and tail counters are free-running `u32`s, each on
//! its own 128-byte line so producer and consumer never share a cache line (adjacent-line
//! prefetch included). Each side also has a `sleeping` word the consumer sets before it waits on
//! a futex at that address, so the producer only pays a wake syscall when someone sleeps.
//!
//! This module only computes offsets and encodes/validates entries; `kvd-shm` maps the memory
//! and runs the queues. A descriptor is read out of shared memory into a local copy before it is
//! validated, so a client rewriting it concurrently cannot change what was checked.

use crate::codec::DecodeError;
use crate::key::{BlockKey, KEY_LEN};

/// Magic at offset 0 of a ring mapping: `KVDRING1`.
pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"KVDRING1");
/// Layout version of the ring mapping.
pub const RING_LAYOUT_VERSION: u32 = 1;
/// Size of one submission or completion entry.
pub const ENTRY_BYTES: usize = 64;
/// Size of the header page.
pub const HEADER_BYTES: usize = 4096;
/// Fewest entries a ring may have.
pub const MIN_ENTRIES: u32 = 8;
/// Most entries a ring may have.
pub const MAX_ENTRIES: u32 = 1 << 16;

/// Offsets inside the header page (each counter on its own 128-byte line).
pub mod off {
    /// `u64` magic.
    pub const MAGIC: usize = 0;
    /// `u32` layout version.
    pub const VERSION: usize = 8;
    /// `u32` entries per queue.
    pub const ENTRIES: usize = 12;
    /// `u32` submission queue tail (written by the client).
    pub const SQ_TAIL: usize = 128;
    /// `u32` submission queue head (written by the daemon).
    pub const SQ_HEAD: usize = 256;
    /// `u32` daemon-sleeping flag, also the futex word the daemon waits on.
    pub const SQ_SLEEPING: usize = 384;
    /// `u32` completion queue tail (written by the daemon).
    pub const CQ_TAIL: usize = 512;
    /// `u32` completion queue head (written by the client).
    pub const CQ_HEAD: usize = 640;
    /// `u32` client-sleeping flag, also the futex word the client waits on.
    pub const CQ_SLEEPING: usize = 768;
    /// `u32` set to 1 by the daemon when it stops serving this ring.
    pub const CLOSED: usize = 896;
}

/// Where the two queues lie in a ring mapping of `entries` entries per queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Entries per queue (a power of two).
    pub entries: u32,
    /// Offset of the submission queue.
    pub sq_offset: usize,
    /// Offset of the completion queue.
    pub cq_offset: usize,
    /// Total mapping size.
    pub total_bytes: usize,
}

impl RingLayout {
    /// Layout for `entries` per queue; must be a power of two in
    /// [`MIN_ENTRIES`]..=[`MAX_ENTRIES`].
    pub fn new(entries: u32) -> Result<Self, DecodeError> {
        if !entries.is_power_of_two() || !(MIN_ENTRIES..=MAX_ENTRIES).contains(&entries) {
            return Err(DecodeError::Invalid {
                what: "ring entries",
                why: format!("{entries} is not a power of two in {MIN_ENTRIES}..={MAX_ENTRIES}"),
            });
        }
        let q = entries as usize * ENTRY_BYTES;
        Ok(Self {
            entries,
            sq_offset: HEADER_BYTES,
            cq_offset: HEADER_BYTES + q,
            total_bytes: HEADER_BYTES + 2 * q,
        })
    }

    /// Writes the static header fields into a zeroed header page.
    pub fn write_header(&self, header: &mut [u8]) {
        header[off::MAGIC..off::MAGIC + 8].copy_from_slice(&RING_MAGIC.to_le_bytes());
        header[off::VERSION..off::VERSION + 4].copy_from_slice(&RING_LAYOUT_VERSION.to_le_bytes());
        header[off::ENTRIES..off::ENTRIES + 4].copy_from_slice(&self.entries.to_le_bytes());
    }

    /// Checks a mapped header against what the handshake announced.
    pub fn check_header(header: &[u8], mapped_bytes: usize) -> Result<Self, DecodeError> {
        if header.len() < HEADER_BYTES {
            return Err(DecodeError::Truncated {
                what: "ring header",
                need: HEADER_BYTES,
                have: header.len(),
            });
        }
        let u32_at = |o: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&header[o..o + 4]);
            u32::from_le_bytes(b)
        };
        let mut m = [0u8; 8];
        m.copy_from_slice(&header[off::MAGIC..off::MAGIC + 8]);
        if u64::from_le_bytes(m) != RING_MAGIC {
            return Err(DecodeError::Invalid {
                what: "ring magic",
                why: "not a kvd ring".into(),
            });
        }
        let v = u32_at(off::VERSION);
        if v != RING_LAYOUT_VERSION {
            return Err(DecodeError::Invalid {
                what: "ring layout version",
                why: format!("{v}, this build speaks {RING_LAYOUT_VERSION}"),
            });
        }
        let layout = Self::new(u32_at(off::ENTRIES))?;
        if layout.total_bytes > mapped_bytes {
            return Err(DecodeError::Invalid {
                what: "ring size",
                why: format!(
                    "needs {} bytes, mapping has {mapped_bytes}",
                    layout.total_bytes
                ),
            });
        }
        Ok(layout)
    }
}

/// Submission opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Does nothing; completes with `Ok` (liveness and latency probes).
    Nop = 0,
    /// Asks for a slot of `arg0` bytes for `key`: completes with the slot's offset and a token,
    /// or `Exists` when the block is already stored (nothing to write).
    Reserve = 1,
    /// Publishes the reserved slot `arg0` (token) holding `arg1` bytes as the block.
    Commit = 2,
    /// Gives back an uncommitted reservation `arg0`.
    Abort = 3,
    /// Reads `key`: completes with offset, length, checksum and a lease token.
    Get = 4,
    /// Ends the read lease `arg0`.
    Release = 5,
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            0 => Op::Nop,
            1 => Op::Reserve,
            2 => Op::Commit,
            3 => Op::Abort,
            4 => Op::Get,
            5 => Op::Release,
            _ => return None,
        })
    }
}

/// Completion status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// Reserve: the block is already stored; nothing to write.
    Exists = 1,
    /// Get: no such block.
    NotFound = 2,
    /// Reserve: no space even after evicting everything evictable.
    CacheFull = 3,
    /// Reserve: larger than `dram.max_block_bytes`.
    TooLarge = 4,
    /// The namespace handle is not open on this connection.
    BadNamespace = 5,
    /// The token was valid once but its reservation or lease has ended (timed out, or already
    /// committed/released).
    Stale = 6,
    /// Commit: length is zero or larger than the reservation.
    BadLength = 7,
    /// The daemon is shutting down.
    ShuttingDown = 8,
    /// The connection holds too many reservations or leases; release some first.
    LimitExceeded = 9,
}

impl Status {
    /// Decodes a wire value.
    pub fn from_u16(v: u16) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::Exists,
            2 => Status::NotFound,
            3 => Status::CacheFull,
            4 => Status::TooLarge,
            5 => Status::BadNamespace,
            6 => Status::Stale,
            7 => Status::BadLength,
            8 => Status::ShuttingDown,
            9 => Status::LimitExceeded,
            _ => return None,
        })
    }
}

/// A submission entry (64 bytes on the wire).
///
/// `op u8 | flags u8 | reserved u16 | ns u32 | user_data u64 | key [32] | arg0 u64 | arg1 u64`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submission {
    /// Operation.
    pub op: Op,
    /// Namespace handle from `NamespaceOpened`.
    pub ns: u32,
    /// Echoed in the completion.
    pub user_data: u64,
    /// Block key (Reserve, Get).
    pub key: BlockKey,
    /// First argument (see [`Op`]).
    pub arg0: u64,
    /// Second argument (see [`Op`]).
    pub arg1: u64,
}

impl Submission {
    /// A submission with zero arguments.
    pub fn new(op: Op, ns: u32, user_data: u64) -> Self {
        Self {
            op,
            ns,
            user_data,
            key: BlockKey::ROOT,
            arg0: 0,
            arg1: 0,
        }
    }

    /// Encodes into the 64-byte wire form.
    pub fn encode(&self) -> [u8; ENTRY_BYTES] {
        let mut b = [0u8; ENTRY_BYTES];
        b[0] = self.op as u8;
        b[4..8].copy_from_slice(&self.ns.to_le_bytes());
        b[8..16].copy_from_slice(&self.user_data.to_le_bytes());
        b[16..16 + KEY_LEN].copy_from_slice(&self.key.0);
        b[48..56].copy_from_slice(&self.arg0.to_le_bytes());
        b[56..64].copy_from_slice(&self.arg1.to_le_bytes());
        b
    }

    /// Decodes and validates a 64-byte entry copied out of shared memory. An error means the
    /// client wrote something no correct client writes: the daemon drops that connection.
    pub fn decode(b: &[u8; ENTRY_BYTES]) -> Result<Self, DecodeError> {
        let op = Op::from_u8(b[0]).ok_or(DecodeError::UnknownTag {
            what: "ring opcode",
            tag: u32::from(b[0]),
        })?;
        if b[1] != 0 || b[2] != 0 || b[3] != 0 {
            return Err(DecodeError::Invalid {
                what: "ring descriptor",
                why: "reserved flag bytes are not zero".into(),
            });
        }
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let mut ns = [0u8; 4];
        ns.copy_from_slice(&b[4..8]);
        let mut key = [0u8; KEY_LEN];
        key.copy_from_slice(&b[16..16 + KEY_LEN]);
        Ok(Self {
            op,
            ns: u32::from_le_bytes(ns),
            user_data: u64_at(8),
            key: BlockKey(key),
            arg0: u64_at(48),
            arg1: u64_at(56),
        })
    }
}

/// Completion flag: the checksum field is valid. Blocks are checksummed by the daemon shortly
/// after commit, off the request path; a GET that races that sees the flag clear.
pub const COMPLETION_CHECKSUM_VALID: u8 = 1;

/// A completion entry (64 bytes on the wire).
///
/// `user_data u64 | status u16 | op u8 | flags u8 | reserved [4] | offset u64 | len u64 |
/// token u64 | checksum u64 | reserved [16]`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// From the submission.
    pub user_data: u64,
    /// Outcome (raw, so a newer daemon's status is reported rather than refused).
    pub status: u16,
    /// Opcode of the submission.
    pub op: u8,
    /// [`COMPLETION_CHECKSUM_VALID`] when `checksum` holds the block's checksum (Get).
    pub flags: u8,
    /// Arena offset of the slot (Reserve, Get).
    pub offset: u64,
    /// Slot capacity (Reserve) or block length (Get).
    pub len: u64,
    /// Reservation token (Reserve) or lease token (Get).
    pub token: u64,
    /// xxh3-64 of the block (Get).
    pub checksum: u64,
}

impl Completion {
    /// A completion for `sub` with `status` and no payload.
    pub fn reply(sub: &Submission, status: Status) -> Self {
        Self {
            user_data: sub.user_data,
            status: status as u16,
            op: sub.op as u8,
            flags: 0,
            offset: 0,
            len: 0,
            token: 0,
            checksum: 0,
        }
    }

    /// Encodes into the 64-byte wire form.
    pub fn encode(&self) -> [u8; ENTRY_BYTES] {
        let mut b = [0u8; ENTRY_BYTES];
        b[0..8].copy_from_slice(&self.user_data.to_le_bytes());
        b[8..10].copy_from_slice(&self.status.to_le_bytes());
        b[10] = self.op;
        b[11] = self.flags;
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b[32..40].copy_from_slice(&self.token.to_le_bytes());
        b[40..48].copy_from_slice(&self.checksum.to_le_bytes());
        b
    }

    /// Decodes a 64-byte completion (any bytes are a completion; status is checked by the
    /// caller with [`Status::from_u16`]).
    pub fn decode(b: &[u8; ENTRY_BYTES]) -> Self {
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        Self {
            user_data: u64_at(0),
            status: u16::from_le_bytes([b[8], b[9]]),
            op: b[10],
            flags: b[11],
            offset: u64_at(16),
            len: u64_at(24),
            token: u64_at(32),
            checksum: u64_at(40),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_bounds() {
        assert!(RingLayout::new(7).is_err());
        assert!(RingLayout::new(4).is_err());
        assert!(RingLayout::new(MAX_ENTRIES * 2).is_err());
        let l = RingLayout::new(256).unwrap();
        assert_eq!(l.sq_offset, 4096);
        assert_eq!(l.cq_offset, 4096 + 256 * 64);
        assert_eq!(l.total_bytes, 4096 + 2 * 256 * 64);
        // Counters each own a 128-byte line.
        let offs = [
            off::SQ_TAIL,
            off::SQ_HEAD,
            off::SQ_SLEEPING,
            off::CQ_TAIL,
            off::CQ_HEAD,
            off::CQ_SLEEPING,
            off::CLOSED,
        ];
        for w in offs.windows(2) {
            assert!(w[1] - w[0] >= 128);
        }
        const { assert!(off::CLOSED + 4 <= HEADER_BYTES) };
    }

    #[test]
    fn header_check() {
        let l = RingLayout::new(64).unwrap();
        let mut h = vec![0u8; HEADER_BYTES];
        l.write_header(&mut h);
        assert_eq!(RingLayout::check_header(&h, l.total_bytes).unwrap(), l);
        assert!(RingLayout::check_header(&h, l.total_bytes - 1).is_err());
        assert!(RingLayout::check_header(&h[..100], l.total_bytes).is_err());
        h[0] ^= 1;
        assert!(RingLayout::check_header(&h, l.total_bytes).is_err());
    }

    #[test]
    fn bad_descriptors_are_rejected() {
        let mut b = Submission::new(Op::Get, 1, 2).encode();
        b[0] = 99;
        assert!(Submission::decode(&b).is_err());
        let mut b = Submission::new(Op::Get, 1, 2).encode();
        b[2] = 1;
        assert!(Submission::decode(&b).is_err());
    }

    proptest! {
        #[test]
        fn submission_round_trip(op in 0u8..6, ns in any::<u32>(), ud in any::<u64>(),
                                 key in any::<[u8; 32]>(), a in any::<u64>(), b in any::<u64>()) {
            let s = Submission { op: Op::from_u8(op).unwrap(), ns, user_data: ud,
                                 key: BlockKey(key), arg0: a, arg1: b };
            prop_assert_eq!(Submission::decode(&s.encode()).unwrap(), s);
        }

        #[test]
        fn completion_round_trip(ud in any::<u64>(), st in any::<u16>(), op in any::<u8>(),
                                 v in any::<[u64; 4]>()) {
            let c = Completion { user_data: ud, status: st, op, flags: op ^ 1, offset: v[0],
                                 len: v[1], token: v[2], checksum: v[3] };
            prop_assert_eq!(Completion::decode(&c.encode()), c);
        }

        #[test]
        fn random_descriptors_never_panic(b in any::<[u8; 64]>()) {
            let _ = Submission::decode(&b);
            let _ = Completion::decode(&b);
        }
    }
}
