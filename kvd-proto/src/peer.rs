//! Peer fetch wire format: how one kvd asks another for a block over TCP (the data port).
//!
//! A connection opens with [`PEER_MAGIC`] from the fetching side. Then requests and replies
//! alternate, one block at a time per connection (a fetcher opens several connections for
//! parallelism):
//! - request: `[u32 BE body length][u8 tag][body]`; the only tag is [`FETCH`] with a body of
//!   namespace id (16 bytes) and key (32 bytes). A body longer than [`MAX_REQUEST`] bytes, an
//!   unknown tag or a bad length is a protocol error: the server logs it and disconnects.
//! - reply: `[u8 status][u64 BE length][u64 BE xxh3 checksum]`, followed by `length` bytes of
//!   block when the status is [`Status::Found`]. The fetcher verifies the checksum before the
//!   block enters its cache.
//!
//! A block is served only from the namespace asked for: the same key stored under another
//! namespace is [`Status::Missing`].

use crate::key::KEY_LEN;
use crate::{BlockKey, NamespaceId};

/// First bytes a fetcher sends on a new connection.
pub const PEER_MAGIC: [u8; 8] = *b"KVDPEER1";
/// Request tag: send one block.
pub const FETCH: u8 = 1;
/// Longest request body accepted.
pub const MAX_REQUEST: usize = 256;
/// Bytes of a reply header.
pub const REPLY_HEADER: usize = 17;
/// Bytes of a fetch request, length prefix included.
pub const FETCH_FRAME: usize = 4 + 1 + 16 + KEY_LEN;

/// Outcome of a fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// The block follows.
    Found = 0,
    /// Not held in that namespace.
    Missing = 1,
    /// Held, but could not be read now (busy, IO error); try elsewhere.
    Unavailable = 2,
}

/// Why a request frame is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerFrameError {
    /// The connection did not start with [`PEER_MAGIC`].
    #[error("not a kvd peer (bad greeting)")]
    BadMagic,
    /// Body longer than [`MAX_REQUEST`].
    #[error("request of {0} bytes is longer than {MAX_REQUEST}")]
    Oversized(usize),
    /// Unknown tag.
    #[error("unknown request tag {0}")]
    UnknownTag(u8),
    /// Body of the wrong size for its tag.
    #[error("request body of {0} bytes does not fit its tag")]
    BadLength(usize),
}

/// Encodes a fetch request.
pub fn encode_fetch(ns: &NamespaceId, key: &BlockKey) -> [u8; FETCH_FRAME] {
    let mut b = [0u8; FETCH_FRAME];
    b[..4].copy_from_slice(&((1 + 16 + KEY_LEN) as u32).to_be_bytes());
    b[4] = FETCH;
    b[5..21].copy_from_slice(&ns.0);
    b[21..].copy_from_slice(&key.0);
    b
}

/// Checks a request's length prefix before its body is read.
pub fn check_len(prefix: [u8; 4]) -> Result<usize, PeerFrameError> {
    let n = u32::from_be_bytes(prefix) as usize;
    if n > MAX_REQUEST {
        return Err(PeerFrameError::Oversized(n));
    }
    Ok(n)
}

/// Decodes a request body (tag first) into the block it asks for.
pub fn decode_fetch(body: &[u8]) -> Result<(NamespaceId, BlockKey), PeerFrameError> {
    let Some((&tag, rest)) = body.split_first() else {
        return Err(PeerFrameError::BadLength(0));
    };
    if tag != FETCH {
        return Err(PeerFrameError::UnknownTag(tag));
    }
    if rest.len() != 16 + KEY_LEN {
        return Err(PeerFrameError::BadLength(body.len()));
    }
    let mut ns = [0u8; 16];
    ns.copy_from_slice(&rest[..16]);
    let mut key = [0u8; KEY_LEN];
    key.copy_from_slice(&rest[16..]);
    Ok((NamespaceId(ns), BlockKey(key)))
}

/// Encodes a reply header.
pub fn encode_reply(status: Status, len: u64, checksum: u64) -> [u8; REPLY_HEADER] {
    let mut b = [0u8; REPLY_HEADER];
    b[0] = status as u8;
    b[1..9].copy_from_slice(&len.to_be_bytes());
    b[9..].copy_from_slice(&checksum.to_be_bytes());
    b
}

/// Decodes a reply header: status (`None` for an unknown one), length, checksum.
pub fn decode_reply(b: &[u8; REPLY_HEADER]) -> (Option<Status>, u64, u64) {
    let status = match b[0] {
        0 => Some(Status::Found),
        1 => Some(Status::Missing),
        2 => Some(Status::Unavailable),
        _ => None,
    };
    let mut l = [0u8; 8];
    l.copy_from_slice(&b[1..9]);
    let mut c = [0u8; 8];
    c.copy_from_slice(&b[9..]);
    (status, u64::from_be_bytes(l), u64::from_be_bytes(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_round_trips_and_bad_frames_are_named() {
        let (ns, key) = (NamespaceId([3; 16]), BlockKey([9; 32]));
        let f = encode_fetch(&ns, &key);
        let mut p = [0u8; 4];
        p.copy_from_slice(&f[..4]);
        let n = check_len(p).unwrap();
        assert_eq!(decode_fetch(&f[4..4 + n]).unwrap(), (ns, key));
        assert_eq!(
            check_len(1_000_000u32.to_be_bytes()),
            Err(PeerFrameError::Oversized(1_000_000))
        );
        assert_eq!(decode_fetch(&[7, 1, 2]), Err(PeerFrameError::UnknownTag(7)));
        assert_eq!(
            decode_fetch(&[FETCH, 1, 2]),
            Err(PeerFrameError::BadLength(3))
        );
        assert_eq!(decode_fetch(&[]), Err(PeerFrameError::BadLength(0)));
    }

    #[test]
    fn replies_round_trip() {
        let h = encode_reply(Status::Found, 1 << 40, u64::MAX - 1);
        assert_eq!(
            decode_reply(&h),
            (Some(Status::Found), 1 << 40, u64::MAX - 1)
        );
        let mut bad = encode_reply(Status::Missing, 0, 0);
        bad[0] = 9;
        assert_eq!(decode_reply(&bad).0, None);
    }
}
