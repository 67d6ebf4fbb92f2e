//! Namespaces: the scope inside which a block key means something.
//!
//! The same token prefix yields different KV bytes under a different model, dtype, layout, block
//! size, tensor-parallel rank, LoRA adapter or tenant salt, so kvd never returns bytes stored
//! under one namespace to a request in another. A namespace is identified by [`NamespaceId`], the
//! first 16 bytes of a BLAKE3 hash of the descriptor's canonical encoding, so every process that
//! describes the same engine configuration arrives at the same id.

use std::fmt;

use crate::codec::{DecodeError, Reader, Writer};

/// Longest string field of a descriptor, in bytes.
pub const MAX_FIELD_BYTES: usize = 256;

/// Version of kvd's block format stored under a namespace; part of the id.
pub const FORMAT_VERSION: u16 = 1;

/// Context string of the namespace id (BLAKE3 key derivation mode).
pub const NAMESPACE_CONTEXT: &str = "kvd namespace v1";

/// Everything that changes the bytes of a block for the same tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct NamespaceDesc {
    /// Model identifier (e.g. a Hugging Face repo id or a path's basename).
    pub model: String,
    /// KV dtype, e.g. `bfloat16`.
    pub dtype: String,
    /// KV layout name, e.g. `LBHNC`.
    pub layout: String,
    /// Tokens per engine block.
    pub block_tokens: u32,
    /// Tensor-parallel rank of the worker storing the block.
    pub tp_rank: u32,
    /// Tensor-parallel world size.
    pub tp_size: u32,
    /// LoRA adapter name; empty for the base model.
    pub lora: String,
    /// Tenant or `cache_salt`; empty when not isolated.
    pub tenant: String,
    /// kvd block format version ([`FORMAT_VERSION`] for this build).
    pub format_version: u16,
}

/// 16-byte namespace identifier.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NamespaceId(pub [u8; 16]);

/// Why a descriptor is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamespaceError {
    /// A required field is empty.
    #[error("namespace field `{0}` must not be empty")]
    Empty(&'static str),
    /// A field is longer than [`MAX_FIELD_BYTES`].
    #[error("namespace field `{0}` is longer than {MAX_FIELD_BYTES} bytes")]
    TooLong(&'static str),
    /// Rank and size disagree.
    #[error("tp_rank {rank} must be smaller than tp_size {size} (and tp_size at least 1)")]
    BadRank {
        /// Rank given.
        rank: u32,
        /// Size given.
        size: u32,
    },
    /// Block size of zero.
    #[error("block_tokens must be at least 1")]
    ZeroBlock,
}

impl NamespaceDesc {
    /// A descriptor for `model` with the other fields at neutral values (TP 0 of 1, format
    /// version of this build); callers fill in what they know.
    pub fn new(model: &str, dtype: &str, layout: &str, block_tokens: u32) -> Self {
        Self {
            model: model.to_owned(),
            dtype: dtype.to_owned(),
            layout: layout.to_owned(),
            block_tokens,
            tp_rank: 0,
            tp_size: 1,
            lora: String::new(),
            tenant: String::new(),
            format_version: FORMAT_VERSION,
        }
    }

    /// Checks field limits and consistency.
    pub fn validate(&self) -> Result<(), NamespaceError> {
        for (name, v, required) in [
            ("model", &self.model, true),
            ("dtype", &self.dtype, true),
            ("layout", &self.layout, true),
            ("lora", &self.lora, false),
            ("tenant", &self.tenant, false),
        ] {
            if required && v.is_empty() {
                return Err(NamespaceError::Empty(name));
            }
            if v.len() > MAX_FIELD_BYTES {
                return Err(NamespaceError::TooLong(name));
            }
        }
        if self.tp_size == 0 || self.tp_rank >= self.tp_size {
            return Err(NamespaceError::BadRank {
                rank: self.tp_rank,
                size: self.tp_size,
            });
        }
        if self.block_tokens == 0 {
            return Err(NamespaceError::ZeroBlock);
        }
        Ok(())
    }

    /// Canonical encoding: fixed field order, length-prefixed strings, little-endian integers.
    pub fn encode(&self, w: &mut Writer) {
        w.u16(self.format_version);
        w.str(&self.model);
        w.str(&self.dtype);
        w.str(&self.layout);
        w.u32(self.block_tokens);
        w.u32(self.tp_rank);
        w.u32(self.tp_size);
        w.str(&self.lora);
        w.str(&self.tenant);
    }

    /// Decodes a descriptor written by [`encode`](Self::encode); does not validate.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            format_version: r.u16("namespace format_version")?,
            model: r.str("namespace model", MAX_FIELD_BYTES)?,
            dtype: r.str("namespace dtype", MAX_FIELD_BYTES)?,
            layout: r.str("namespace layout", MAX_FIELD_BYTES)?,
            block_tokens: r.u32("namespace block_tokens")?,
            tp_rank: r.u32("namespace tp_rank")?,
            tp_size: r.u32("namespace tp_size")?,
            lora: r.str("namespace lora", MAX_FIELD_BYTES)?,
            tenant: r.str("namespace tenant", MAX_FIELD_BYTES)?,
        })
    }

    /// The namespace id: first 16 bytes of BLAKE3-derive_key([`NAMESPACE_CONTEXT`], encoding).
    pub fn id(&self) -> NamespaceId {
        let mut w = Writer::new();
        self.encode(&mut w);
        let digest = blake3::derive_key(NAMESPACE_CONTEXT, &w.into_vec());
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        NamespaceId(id)
    }
}

impl NamespaceId {
    /// Lower-case hex, 32 digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// First 8 hex digits, for tables.
    pub fn short(&self) -> String {
        let mut h = self.to_hex();
        h.truncate(8);
        h
    }

    /// Parses 32 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let s = s.trim();
        if s.len() != 32 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
        }
        Some(NamespaceId(out))
    }
}

impl fmt::Debug for NamespaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NamespaceId({})", self.to_hex())
    }
}

impl fmt::Display for NamespaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc() -> NamespaceDesc {
        NamespaceDesc::new("tiny-llama", "bfloat16", "LBHNC", 32)
    }

    #[test]
    fn every_field_changes_the_id() {
        let base = desc();
        let id = base.id();
        type Edit = Box<dyn Fn(&mut NamespaceDesc)>;
        let variants: Vec<Edit> = vec![
            Box::new(|d| d.model.push('x')),
            Box::new(|d| d.dtype = "float16".into()),
            Box::new(|d| d.layout = "NHD".into()),
            Box::new(|d| d.block_tokens = 16),
            Box::new(|d| {
                d.tp_size = 2;
                d.tp_rank = 1
            }),
            Box::new(|d| d.lora = "adapter".into()),
            Box::new(|d| d.tenant = "salt".into()),
            Box::new(|d| d.format_version = 2),
        ];
        for f in variants {
            let mut d = base.clone();
            f(&mut d);
            assert_ne!(d.id(), id, "{d:?}");
        }
    }

    #[test]
    fn id_vector_is_stable() {
        assert_eq!(desc().id().to_hex(), NS_VECTOR);
    }

    const NS_VECTOR: &str = "d4b38c19e63b7d9b7cbbc8414df9109d";

    #[test]
    fn field_boundaries_are_framed() {
        let mut a = desc();
        a.model = "ab".into();
        a.dtype = "c".into();
        let mut b = desc();
        b.model = "a".into();
        b.dtype = "bc".into();
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn validation_names_the_field() {
        let mut d = desc();
        d.model.clear();
        assert_eq!(d.validate(), Err(NamespaceError::Empty("model")));
        let mut d = desc();
        d.tp_rank = 1;
        assert!(matches!(d.validate(), Err(NamespaceError::BadRank { .. })));
        let mut d = desc();
        d.tenant = "x".repeat(MAX_FIELD_BYTES + 1);
        assert_eq!(d.validate(), Err(NamespaceError::TooLong("tenant")));
        desc().validate().unwrap();
    }

    #[test]
    fn encode_decode_and_hex() {
        let d = desc();
        let mut w = Writer::new();
        d.encode(&mut w);
        let b = w.into_vec();
        let mut r = Reader::new(&b);
        assert_eq!(NamespaceDesc::decode(&mut r).unwrap(), d);
        r.finish().unwrap();
        let id = d.id();
        assert_eq!(NamespaceId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(NamespaceId::from_hex("xyz"), None);
        assert_eq!(NamespaceId::from_hex(&"é".repeat(16)), None);
    }
}
