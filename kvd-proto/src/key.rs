//! Block keys and kvd's canonical key chain.
//!
//! A key names the KV of one engine block by content: the chained hash of the token prefix that
//! ends at that block. Engines that already compute reproducible chained hashes (vLLM's
//! `sha256_cbor`) may pass theirs; kvd also defines its own chain, [`chain_key`], so that two
//! processes that agree on tokens always agree on keys, whatever their language or hash seed.
//!
//! Canonical chain, version 1 (stable; changing it is a new namespace format version):
//! `key_i = BLAKE3-derive_key("kvd block chain v1", parent_i ‖ u32le(n_tokens) ‖ u32le(t)… ‖
//! u32le(len(extra)) ‖ extra)` where `parent_0` is 32 zero bytes and `parent_i = key_{i-1}`.

use std::fmt;

/// Length of a block key in bytes.
pub const KEY_LEN: usize = 32;

/// Context string of the canonical chain (BLAKE3 key derivation mode).
pub const CHAIN_CONTEXT: &str = "kvd block chain v1";

/// A 32-byte content-addressed block key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BlockKey(pub [u8; KEY_LEN]);

/// Why a string is not a block key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a block key: expected 64 hex digits, got {0:?}")]
pub struct ParseKeyError(pub String);

impl BlockKey {
    /// The parent of the first block of every chain.
    pub const ROOT: BlockKey = BlockKey([0; KEY_LEN]);

    /// Lower-case hex, 64 digits.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(KEY_LEN * 2);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xF)]));
        }
        s
    }

    /// First 12 hex digits, for tables and logs.
    pub fn short(&self) -> String {
        let mut h = self.to_hex();
        h.truncate(12);
        h
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(s: &str) -> Result<Self, ParseKeyError> {
        let s = s.trim();
        let bytes = s.as_bytes();
        if bytes.len() != KEY_LEN * 2 {
            return Err(ParseKeyError(s.to_owned()));
        }
        let mut out = [0u8; KEY_LEN];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or_else(|| ParseKeyError(s.to_owned()))?;
            let lo = hex_val(pair[1]).ok_or_else(|| ParseKeyError(s.to_owned()))?;
            out[i] = (hi << 4) | lo;
        }
        Ok(BlockKey(out))
    }

    /// vLLM's 64-bit form of a hash (its last 8 bytes, big-endian), used in KV events.
    pub fn as_u64_be(&self) -> u64 {
        let mut tail = [0u8; 8];
        tail.copy_from_slice(&self.0[KEY_LEN - 8..]);
        u64::from_be_bytes(tail)
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Debug for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockKey({})", self.short())
    }
}

impl fmt::Display for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::str::FromStr for BlockKey {
    type Err = ParseKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_hex(s)
    }
}

/// The canonical key of a block whose tokens are `tokens`, following `parent`
/// (`None` for the first block of a sequence). `extra` carries whatever else changes the KV
/// of the block beyond its tokens (multimodal hashes, for example); empty when nothing does.
pub fn chain_key(parent: Option<&BlockKey>, tokens: &[u32], extra: &[u8]) -> BlockKey {
    let mut h = blake3::Hasher::new_derive_key(CHAIN_CONTEXT);
    h.update(&parent.unwrap_or(&BlockKey::ROOT).0);
    h.update(&len_u32(tokens.len()).to_le_bytes());
    for t in tokens {
        h.update(&t.to_le_bytes());
    }
    h.update(&len_u32(extra.len()).to_le_bytes());
    h.update(extra);
    BlockKey(*h.finalize().as_bytes())
}

/// Keys of every full block of `tokens`, in order (a trailing partial block gets no key).
pub fn chain_keys(tokens: &[u32], block_tokens: usize) -> Vec<BlockKey> {
    if block_tokens == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(tokens.len() / block_tokens);
    let mut parent: Option<BlockKey> = None;
    for chunk in tokens.chunks_exact(block_tokens) {
        let k = chain_key(parent.as_ref(), chunk, &[]);
        out.push(k);
        parent = Some(k);
    }
    out
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors() {
        let k = BlockKey([0xAB; 32]);
        assert_eq!(BlockKey::from_hex(&k.to_hex()).unwrap(), k);
        assert_eq!(BlockKey::from_hex(&k.to_hex().to_uppercase()).unwrap(), k);
        assert!(BlockKey::from_hex("abc").is_err());
        assert!(BlockKey::from_hex(&"zz".repeat(32)).is_err());
        assert_eq!(k.short().len(), 12);
    }

    /// Pinned vectors: if these change, every stored key changes. Bump the chain version.
    #[test]
    fn canonical_chain_vectors() {
        assert_eq!(chain_key(None, &[], &[]).to_hex(), VECTOR_EMPTY);
        let tokens: Vec<u32> = (0..64).collect();
        let keys = chain_keys(&tokens, 32);
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0], chain_key(None, &tokens[..32], &[]));
        assert_eq!(keys[1], chain_key(Some(&keys[0]), &tokens[32..], &[]));
        assert_eq!(keys[0].to_hex(), VECTOR_0_31);
        assert_eq!(keys[1].to_hex(), VECTOR_32_63);
    }

    const VECTOR_EMPTY: &str = "eb17f8dd6d0ac5e59dcb6aba2b8ab867524cd9406dd2d4879e77e249d630b687";
    const VECTOR_0_31: &str = "4eb758d1374dcbc450bc111b4133f83c28cd3cb1e47cfa865914a603ae318955";
    const VECTOR_32_63: &str = "0c9de6d791e9c86a1741b00af691a2c77df9fa71314a24fc11f14a7cfa092eac";

    #[test]
    fn chain_depends_on_parent_tokens_and_extra() {
        let a = chain_key(None, &[1, 2, 3], &[]);
        assert_ne!(a, chain_key(None, &[1, 2, 4], &[]));
        assert_ne!(a, chain_key(Some(&a), &[1, 2, 3], &[]));
        assert_ne!(a, chain_key(None, &[1, 2, 3], b"img"));
        // Lengths are framed: moving a token into `extra` changes the key.
        assert_ne!(
            chain_key(None, &[1], &2u32.to_le_bytes()),
            chain_key(None, &[1, 2], &[])
        );
        assert!(chain_keys(&[1, 2, 3], 0).is_empty());
        assert_eq!(chain_keys(&[1, 2, 3], 2).len(), 1);
    }

    #[test]
    fn u64_form_is_last_eight_bytes_big_endian() {
        let mut b = [0u8; 32];
        b[24..].copy_from_slice(&[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(BlockKey(b).as_u64_be(), 0x0102);
    }
}
