//! Bounded little-endian reader and writer for the control frames.
//!
//! Hand-written rather than serde-based so that every length read from the wire is checked
//! against an explicit maximum before anything is allocated, and so that a truncated, oversized
//! or trailing-garbage frame is a typed [`DecodeError`], never a panic or an unbounded `Vec`.

use crate::key::{BlockKey, KEY_LEN};

/// Why a sequence of bytes is not a valid frame, descriptor or layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended before a field was complete.
    #[error("truncated input: needed {need} more bytes for {what}, {have} left")]
    Truncated {
        /// Field being read.
        what: &'static str,
        /// Bytes the field needs.
        need: usize,
        /// Bytes that were left.
        have: usize,
    },
    /// A length or count is larger than the protocol allows.
    #[error("{what} is too long: {len} > maximum {max}")]
    TooLong {
        /// Field being read.
        what: &'static str,
        /// Length found on the wire.
        len: usize,
        /// Largest allowed.
        max: usize,
    },
    /// A string field is not UTF-8.
    #[error("{what} is not valid UTF-8")]
    BadUtf8 {
        /// Field being read.
        what: &'static str,
    },
    /// An enum tag has no meaning in this protocol version.
    #[error("unknown {what} tag {tag}")]
    UnknownTag {
        /// Enum being read.
        what: &'static str,
        /// Tag found on the wire.
        tag: u32,
    },
    /// Bytes were left over after a complete message.
    #[error("{0} trailing bytes after a complete message")]
    Trailing(usize),
    /// A field holds a value outside its valid range.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// Field being read.
        what: &'static str,
        /// What is wrong with it.
        why: String,
    },
}

/// Appends little-endian fields to a buffer.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wraps an existing buffer (appending to it).
    pub fn from_vec(buf: Vec<u8>) -> Self {
        Self { buf }
    }

    /// Returns the bytes written.
    pub fn into_vec(self) -> Vec<u8> {
        self.buf
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Mutable access for patching a length prefix.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// Writes one byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// Writes a `u16`.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Writes a `u32`.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Writes a `u64`.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Writes raw bytes with no length prefix.
    pub fn raw(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    /// Writes a string with a `u16` length prefix, cut at the last char boundary within
    /// `u16::MAX` bytes (encoders never produce a frame the decoder would refuse).
    pub fn str(&mut self, s: &str) {
        let mut end = s.len().min(usize::from(u16::MAX));
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let n = u16::try_from(end).unwrap_or(u16::MAX);
        self.u16(n);
        self.raw(&s.as_bytes()[..end]);
    }
    /// Writes a block key.
    pub fn key(&mut self, k: &BlockKey) {
        self.raw(&k.0);
    }
    /// Writes a count as `u32` (saturating; callers bound their collections first).
    pub fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
}

/// Reads little-endian fields from untrusted bytes, checking every bound.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads from `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Fails unless every byte was consumed.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing(self.buf.len()))
        }
    }

    /// Takes `n` raw bytes.
    pub fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                what,
                need: n,
                have: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(what, N)?);
        Ok(out)
    }

    /// Reads one byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }
    /// Reads a `u16`.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    /// Reads a `u32`.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    /// Reads a `u64`.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    /// Reads a boolean encoded as 0 or 1.
    pub fn bool(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(DecodeError::UnknownTag {
                what,
                tag: u32::from(tag),
            }),
        }
    }
    /// Reads a `u16`-prefixed UTF-8 string of at most `max` bytes.
    pub fn str(&mut self, what: &'static str, max: usize) -> Result<String, DecodeError> {
        let n = usize::from(self.u16(what)?);
        if n > max {
            return Err(DecodeError::TooLong { what, len: n, max });
        }
        let bytes = self.take(what, n)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::BadUtf8 { what })
    }
    /// Reads a block key.
    pub fn key(&mut self, what: &'static str) -> Result<BlockKey, DecodeError> {
        Ok(BlockKey(self.array::<KEY_LEN>(what)?))
    }
    /// Reads a `u32` element count, refusing more than `max` and more than the remaining
    /// bytes could hold at `min_elem_bytes` each (so a forged count never drives an allocation).
    pub fn count(
        &mut self,
        what: &'static str,
        max: usize,
        min_elem_bytes: usize,
    ) -> Result<usize, DecodeError> {
        let n = usize::try_from(self.u32(what)?).unwrap_or(usize::MAX);
        if n > max {
            return Err(DecodeError::TooLong { what, len: n, max });
        }
        let need = n.saturating_mul(min_elem_bytes);
        if need > self.buf.len() {
            return Err(DecodeError::Truncated {
                what,
                need,
                have: self.buf.len(),
            });
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_scalars_and_strings() {
        let mut w = Writer::new();
        w.u8(7);
        w.u16(0xBEEF);
        w.u32(0xDEAD_BEEF);
        w.u64(u64::MAX - 1);
        w.str("héllo");
        let bytes = w.into_vec();
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u8("a").unwrap(), 7);
        assert_eq!(r.u16("b").unwrap(), 0xBEEF);
        assert_eq!(r.u32("c").unwrap(), 0xDEAD_BEEF);
        assert_eq!(r.u64("d").unwrap(), u64::MAX - 1);
        assert_eq!(r.str("e", 64).unwrap(), "héllo");
        r.finish().unwrap();
    }

    #[test]
    fn truncated_and_oversized_are_errors() {
        let mut r = Reader::new(&[1, 2]);
        assert!(matches!(r.u32("x"), Err(DecodeError::Truncated { .. })));
        let mut w = Writer::new();
        w.str("abcdef");
        let b = w.into_vec();
        assert!(matches!(
            Reader::new(&b).str("s", 3),
            Err(DecodeError::TooLong { .. })
        ));
        // A count promising more elements than bytes remain is refused before allocation.
        let mut w = Writer::new();
        w.u32(1000);
        let b = w.into_vec();
        assert!(matches!(
            Reader::new(&b).count("keys", 10_000, 32),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn long_strings_are_cut_on_a_char_boundary() {
        let s = "é".repeat(40_000);
        let mut w = Writer::new();
        w.str(&s);
        let b = w.into_vec();
        let back = Reader::new(&b).str("s", usize::MAX).unwrap();
        assert!(back.len() <= usize::from(u16::MAX));
        assert!(s.starts_with(&back));
    }
}
