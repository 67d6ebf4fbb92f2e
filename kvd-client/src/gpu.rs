//! Daemon-driven GPU transfers from the client's side: share the engine's paged KV buffers
//! with kvd once ([`Client::gpu_attach`]), then ask kvd to copy pages into blocks
//! ([`Client::gpu_save`]) and blocks into pages ([`Client::gpu_load`]) — one small frame per
//! batch, the bytes moved by the daemon on its own stream.
//!
//! Why a module of its own: these calls carry descriptors (`SCM_RIGHTS`) and per-block result
//! codes, unlike the rest of the control API, and need a daemon started with a GPU backend
//! (otherwise they fail with [`ErrorCode::Unsupported`](kvd_proto::ErrorCode::Unsupported)).

use std::ops::Range;
use std::os::fd::BorrowedFd;

use kvd_proto::frame::{Request, Response, MAX_KEYS};
pub use kvd_proto::gpu::{BlockCode, GpuLayer, GpuReport, GpuShare, CUDA_IPC_HANDLE_BYTES};
use kvd_proto::gpu::{MAX_GPU_FDS, MAX_GPU_LAYERS, MAX_GPU_SHARES};
use kvd_proto::{BlockKey, NamespaceId};

use crate::{unexpected, Client, ClientError, Result};

/// Engine KV buffers attached to the daemon on this client's connection (unmapped by the
/// daemon on [`Client::gpu_detach`] or when the connection closes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuAttachment {
    /// The daemon's handle.
    pub id: u32,
    /// Bytes of one block (one page of every layer).
    pub block_bytes: u64,
}

fn same_len(keys: &[BlockKey], pages: &[u32]) -> Result<()> {
    if keys.len() != pages.len() {
        return Err(ClientError::Invalid(format!(
            "{} keys but {} pages",
            keys.len(),
            pages.len()
        )));
    }
    Ok(())
}

fn codes(r: Response) -> Result<Vec<BlockCode>> {
    match r {
        Response::BlockCodes(c) => Ok(c),
        r => Err(unexpected("BlockCodes", &r)),
    }
}

impl Client {
    /// Shares the engine's layer buffers with the daemon for namespace `ns` (open on this
    /// client). `fds` are the descriptors of the [`GpuShare::Fd`] shares, in order.
    pub fn gpu_attach(
        &self,
        ns: &NamespaceId,
        shares: &[GpuShare],
        fds: &[BorrowedFd<'_>],
        layers: &[GpuLayer],
    ) -> Result<GpuAttachment> {
        let want = shares
            .iter()
            .filter(|s| matches!(s, GpuShare::Fd { .. }))
            .count();
        if want != fds.len() || fds.len() > MAX_GPU_FDS {
            return Err(ClientError::Invalid(format!(
                "{want} descriptor shares need as many descriptors (at most {MAX_GPU_FDS}), got {}",
                fds.len()
            )));
        }
        if shares.len() > MAX_GPU_SHARES || layers.is_empty() || layers.len() > MAX_GPU_LAYERS {
            return Err(ClientError::Invalid(format!(
                "an attachment holds at most {MAX_GPU_SHARES} shares and 1..={MAX_GPU_LAYERS} \
                 layers, not {} and {}",
                shares.len(),
                layers.len()
            )));
        }
        let req = Request::GpuAttach {
            ns: *ns,
            shares: shares.to_vec(),
            layers: layers.to_vec(),
        };
        match self.ctl.lock().call_with_fds(&req, fds)?.0 {
            Response::GpuAttached {
                attachment,
                block_bytes,
            } => Ok(GpuAttachment {
                id: attachment,
                block_bytes,
            }),
            r => Err(unexpected("GpuAttached", &r)),
        }
    }

    /// Has the daemon copy page `pages[i]` of every attached layer into block `keys[i]`.
    /// Returns per key `Done`, `Exists` (already held; nothing copied) or `NoRoom`.
    pub fn gpu_save(
        &self,
        att: &GpuAttachment,
        keys: &[BlockKey],
        pages: &[u32],
    ) -> Result<Vec<BlockCode>> {
        same_len(keys, pages)?;
        let mut out = Vec::with_capacity(keys.len());
        for (ks, ps) in keys.chunks(MAX_KEYS).zip(pages.chunks(MAX_KEYS)) {
            let req = Request::GpuSave {
                attachment: att.id,
                keys: ks.to_vec(),
                pages: ps.to_vec(),
            };
            out.extend(codes(self.call(&req)?.0)?);
        }
        Ok(out)
    }

    /// Has the daemon copy block `keys[i]` into page `pages[i]` of the attached layers in
    /// `layers` (all when `None`). Returns per key `Done`, `Missing`, `Corrupt` (checksum
    /// mismatch, only checked with `verify`) or `BadSize`; only `Done` pages were written.
    pub fn gpu_load(
        &self,
        att: &GpuAttachment,
        keys: &[BlockKey],
        pages: &[u32],
        layers: Option<Range<u32>>,
        verify: bool,
    ) -> Result<Vec<BlockCode>> {
        same_len(keys, pages)?;
        let (first_layer, layers) = match layers {
            None => (0, 0),
            Some(r) if r.end > r.start => (r.start, r.end - r.start),
            Some(r) => {
                return Err(ClientError::Invalid(format!("empty layer range {r:?}")));
            }
        };
        let mut out = Vec::with_capacity(keys.len());
        for (ks, ps) in keys.chunks(MAX_KEYS).zip(pages.chunks(MAX_KEYS)) {
            let req = Request::GpuLoad {
                attachment: att.id,
                keys: ks.to_vec(),
                pages: ps.to_vec(),
                first_layer,
                layers,
                verify,
            };
            out.extend(codes(self.call(&req)?.0)?);
        }
        Ok(out)
    }

    /// Unmaps an attachment in the daemon; false when it was not held.
    pub fn gpu_detach(&self, att: &GpuAttachment) -> Result<bool> {
        match self.call(&Request::GpuDetach { attachment: att.id })?.0 {
            Response::Count(n) => Ok(n > 0),
            r => Err(unexpected("Count", &r)),
        }
    }
}
