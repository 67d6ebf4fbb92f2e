//! kvd wire types: what crosses a process boundary, and nothing that does IO.
//!
//! Everything a client and the daemon must agree on lives here so both sides compile against one
//! definition: 32-byte block keys and the canonical key chain ([`key`]), namespace descriptors
//! and their ids ([`namespace`]), the length-prefixed control frames spoken on the Unix socket
//! ([`frame`]), the byte layout of the shared-memory ring and arena ([`ring`], [`arena`]), and
//! the TCP data port one daemon fetches blocks from another with ([`peer`]), how an engine
//! shares its KV tensors for daemon-driven GPU transfers ([`gpu`]), and the segment objects
//! every node reads from the shared S3 bucket ([`segment`]).
//! Every decoder here takes untrusted bytes and returns a typed [`DecodeError`] instead of
//! panicking; the property tests and the fuzz targets hold it to that.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod arena;
pub mod codec;
pub mod frame;
pub mod gpu;
pub mod key;
pub mod namespace;
pub mod peer;
pub mod ring;
pub mod segment;

pub use codec::DecodeError;
pub use frame::{ErrorCode, Request, Response};
pub use key::BlockKey;
pub use namespace::{NamespaceDesc, NamespaceId};

/// Version of the control protocol and shared-memory layout spoken by this build.
///
/// The handshake refuses a peer with a different major version; bump it on any incompatible
/// change of a frame, a descriptor or a layout.
pub const PROTOCOL_VERSION: u16 = 6;

/// Storage tiers, in order from fastest to slowest. The discriminant is the wire value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Tier {
    /// GPU memory (T0).
    Gpu = 0,
    /// Shared DRAM arena (T1).
    Dram = 1,
    /// Local NVMe log (T2).
    Disk = 2,
    /// Object store (T3).
    S3 = 3,
}

impl Tier {
    /// All tiers, fastest first.
    pub const ALL: [Tier; 4] = [Tier::Gpu, Tier::Dram, Tier::Disk, Tier::S3];

    /// Decodes a wire value.
    pub fn from_u8(v: u8) -> Option<Tier> {
        Tier::ALL.get(usize::from(v)).copied()
    }

    /// Lower-case name used in logs, tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Gpu => "gpu",
            Tier::Dram => "dram",
            Tier::Disk => "disk",
            Tier::S3 => "s3",
        }
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
