//! Wire types of daemon-driven GPU transfers: how an engine shares its paged KV tensors with
//! kvd ([`GpuShare`], [`GpuLayer`]) and what each block of a transfer came to ([`BlockCode`]).
//!
//! Why: with the engine's KV memory mapped into the daemon (a CUDA IPC handle per tensor, or a
//! sealed memfd for the host stand-in used in CI), kvd copies pages between the engine's KV
//! cache and its arena itself, on its own streams, in batches — the engine process only sends
//! one small control frame per step. The requests carrying these types are
//! [`crate::Request::GpuAttach`], [`crate::Request::GpuSave`], [`crate::Request::GpuLoad`] and
//! [`crate::Request::GpuDetach`].

use crate::codec::{Reader, Writer};
use crate::DecodeError;

/// Most shared allocations in one attach.
pub const MAX_GPU_SHARES: usize = 1024;
/// Most layer buffers in one attach (K and V of a 512-layer model).
pub const MAX_GPU_LAYERS: usize = 1024;
/// Bytes of a CUDA IPC memory handle.
pub const CUDA_IPC_HANDLE_BYTES: usize = 64;
/// Most descriptors one attach frame may carry with `SCM_RIGHTS`.
pub const MAX_GPU_FDS: usize = 64;

/// How one allocation of engine memory is shared with the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuShare {
    /// A file descriptor of `len` bytes sent with the attach frame (`SCM_RIGHTS`; the n-th
    /// `Fd` share is the n-th descriptor). The host backend takes memfds sealed against
    /// shrinking.
    Fd {
        /// Bytes of the shared memory.
        len: u64,
    },
    /// A CUDA IPC memory handle of a device allocation (`cuIpcGetMemHandle`).
    CudaIpc([u8; CUDA_IPC_HANDLE_BYTES]),
}

/// One paged layer buffer inside a shared allocation: page `i` lies at
/// `offset + i * stride` from the allocation's start and holds `page` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuLayer {
    /// Index of the allocation in the attach's shares.
    pub share: u32,
    /// Offset of page 0 from the allocation's start.
    pub offset: u64,
    /// Bytes from one page to the next.
    pub stride: u64,
    /// Bytes of one page.
    pub page: u64,
    /// Pages in the buffer (the engine's number of KV blocks).
    pub pages: u64,
}

/// What a daemon-driven transfer did with one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockCode {
    /// Saved into kvd, or loaded into the engine's pages.
    Done = 0,
    /// Save: kvd already holds the block; nothing copied.
    Exists = 1,
    /// Save: no room even after eviction (or the block is too large).
    NoRoom = 2,
    /// Load: kvd does not hold the block.
    Missing = 3,
    /// Load: the stored bytes failed their checksum; nothing copied.
    Corrupt = 4,
    /// Load: the stored block's size differs from the attachment's block size.
    BadSize = 5,
}

impl BlockCode {
    /// Decodes a wire value.
    pub fn from_u8(v: u8) -> Option<Self> {
        use BlockCode::*;
        [Done, Exists, NoRoom, Missing, Corrupt, BadSize]
            .get(usize::from(v))
            .copied()
    }
}

/// The GPU tier's state and counters, in the daemon's statistics.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GpuReport {
    /// The backend ("cuda:0 NVIDIA H100 80GB HBM3", "host").
    pub backend: String,
    /// Bytes of DRAM arenas pinned for DMA.
    pub pinned_bytes: u64,
    /// Milliseconds pinning the arenas took at start.
    pub pin_ms: u64,
    /// Engine KV buffers mapped now (attachments).
    pub attachments: u64,
    /// Blocks saved by daemon-driven copies (device → DRAM).
    pub saved_blocks: u64,
    /// Blocks loaded by daemon-driven copies (DRAM → device).
    pub loaded_blocks: u64,
    /// Bytes copied device → DRAM.
    pub d2h_bytes: u64,
    /// Bytes copied DRAM → device.
    pub h2d_bytes: u64,
    /// Transfers that failed in the driver.
    pub copy_errors: u64,
    /// Last driver or attach error; empty when none.
    pub last_error: String,
}

pub(crate) fn put_report(w: &mut Writer, x: &GpuReport) {
    w.str(&x.backend);
    for v in [
        x.pinned_bytes,
        x.pin_ms,
        x.attachments,
        x.saved_blocks,
        x.loaded_blocks,
        x.d2h_bytes,
        x.h2d_bytes,
        x.copy_errors,
    ] {
        w.u64(v);
    }
    w.str(&x.last_error);
}

pub(crate) fn get_report(r: &mut Reader<'_>, max_text: usize) -> Result<GpuReport, DecodeError> {
    Ok(GpuReport {
        backend: r.str("gpu backend", max_text)?,
        pinned_bytes: r.u64("gpu pinned bytes")?,
        pin_ms: r.u64("gpu pin ms")?,
        attachments: r.u64("gpu attachments")?,
        saved_blocks: r.u64("gpu saved blocks")?,
        loaded_blocks: r.u64("gpu loaded blocks")?,
        d2h_bytes: r.u64("gpu d2h bytes")?,
        h2d_bytes: r.u64("gpu h2d bytes")?,
        copy_errors: r.u64("gpu copy errors")?,
        last_error: r.str("gpu last error", max_text)?,
    })
}

const SHARE_FD: u8 = 0;
const SHARE_CUDA_IPC: u8 = 1;

pub(crate) fn put_shares(w: &mut Writer, shares: &[GpuShare]) {
    let shares = &shares[..shares.len().min(MAX_GPU_SHARES)];
    w.count(shares.len());
    for s in shares {
        match s {
            GpuShare::Fd { len } => {
                w.u8(SHARE_FD);
                w.u64(*len);
            }
            GpuShare::CudaIpc(h) => {
                w.u8(SHARE_CUDA_IPC);
                w.raw(h);
            }
        }
    }
}

pub(crate) fn get_shares(r: &mut Reader<'_>) -> Result<Vec<GpuShare>, DecodeError> {
    let n = r.count("gpu shares", MAX_GPU_SHARES, 9)?;
    (0..n)
        .map(|_| match r.u8("gpu share kind")? {
            SHARE_FD => Ok(GpuShare::Fd {
                len: r.u64("gpu share length")?,
            }),
            SHARE_CUDA_IPC => {
                let b = r.take("cuda ipc handle", CUDA_IPC_HANDLE_BYTES)?;
                let mut h = [0u8; CUDA_IPC_HANDLE_BYTES];
                h.copy_from_slice(b);
                Ok(GpuShare::CudaIpc(h))
            }
            other => Err(DecodeError::UnknownTag {
                what: "gpu share kind",
                tag: u32::from(other),
            }),
        })
        .collect()
}

pub(crate) fn put_layers(w: &mut Writer, layers: &[GpuLayer]) {
    let layers = &layers[..layers.len().min(MAX_GPU_LAYERS)];
    w.count(layers.len());
    for l in layers {
        w.u32(l.share);
        w.u64(l.offset);
        w.u64(l.stride);
        w.u64(l.page);
        w.u64(l.pages);
    }
}

pub(crate) fn get_layers(r: &mut Reader<'_>) -> Result<Vec<GpuLayer>, DecodeError> {
    let n = r.count("gpu layers", MAX_GPU_LAYERS, 36)?;
    (0..n)
        .map(|_| {
            Ok(GpuLayer {
                share: r.u32("layer share")?,
                offset: r.u64("layer offset")?,
                stride: r.u64("layer stride")?,
                page: r.u64("layer page")?,
                pages: r.u64("layer pages")?,
            })
        })
        .collect()
}

pub(crate) fn put_pages(w: &mut Writer, pages: &[u32], max: usize) {
    let pages = &pages[..pages.len().min(max)];
    w.count(pages.len());
    for p in pages {
        w.u32(*p);
    }
}

pub(crate) fn get_pages(r: &mut Reader<'_>, max: usize) -> Result<Vec<u32>, DecodeError> {
    let n = r.count("page ids", max, 4)?;
    (0..n).map(|_| r.u32("page id")).collect()
}

pub(crate) fn put_codes(w: &mut Writer, codes: &[BlockCode], max: usize) {
    let codes = &codes[..codes.len().min(max)];
    w.count(codes.len());
    for c in codes {
        w.u8(*c as u8);
    }
}

pub(crate) fn get_codes(r: &mut Reader<'_>, max: usize) -> Result<Vec<BlockCode>, DecodeError> {
    let n = r.count("block codes", max, 1)?;
    (0..n)
        .map(|_| {
            let v = r.u8("block code")?;
            BlockCode::from_u8(v).ok_or(DecodeError::UnknownTag {
                what: "block code",
                tag: u32::from(v),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_decode_only_known_values() {
        for v in 0..=5u8 {
            assert_eq!(BlockCode::from_u8(v).map(|c| c as u8), Some(v));
        }
        assert_eq!(BlockCode::from_u8(6), None);
    }

    #[test]
    fn an_unknown_share_kind_is_refused() {
        let mut w = Writer::new();
        w.count(1);
        w.u8(9);
        w.u64(0);
        let e = get_shares(&mut Reader::new(&w.into_vec())).unwrap_err();
        assert!(e.to_string().contains("gpu share kind"), "{e}");
    }
}
