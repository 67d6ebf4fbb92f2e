//! Daemon-driven GPU transfers for Python: share an engine's paged KV buffers with kvd once,
//! then have kvd copy pages into blocks and blocks into pages itself.
//!
//! Why a module: the shares arrive as Python tuples (`("fd", fd, len)` for a sealed memfd,
//! `("cuda_ipc", handle)` for a CUDA IPC handle from torch's `_share_cuda_`) and must be
//! checked before they become wire types and borrowed descriptors; results are mapped to the
//! same codes `save_blocks`/`load_blocks` return, so the connector treats both paths alike.

use std::os::fd::BorrowedFd;

use kvd_client::gpu::{BlockCode, GpuLayer, GpuShare, CUDA_IPC_HANDLE_BYTES};
use kvd_proto::BlockKey;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::{to_py, BAD_SIZE, CORRUPT, LOADED, MISSING};

/// Engine KV buffers attached to kvd on one client's connection (unmapped by
/// `Client.gpu_detach` or when the client closes).
#[pyclass(frozen, module = "kvd._kvd")]
pub struct GpuAttachment {
    pub(crate) inner: kvd_client::GpuAttachment,
    pub(crate) client_id: u64,
}

#[pymethods]
impl GpuAttachment {
    /// The daemon's handle.
    #[getter]
    fn id(&self) -> u32 {
        self.inner.id
    }

    /// Bytes of one block (one page of every layer).
    #[getter]
    fn block_bytes(&self) -> u64 {
        self.inner.block_bytes
    }

    fn __repr__(&self) -> String {
        format!(
            "GpuAttachment(id={}, block_bytes={})",
            self.inner.id, self.inner.block_bytes
        )
    }
}

/// A share as Python passes it: its wire form and, for memfds, the descriptor number.
pub(crate) fn share_of(t: &Bound<'_, PyAny>) -> PyResult<(GpuShare, Option<i32>)> {
    let kind: String = t.get_item(0)?.extract()?;
    match kind.as_str() {
        "fd" => {
            let (_, fd, len): (String, i32, u64) = t.extract()?;
            if fd < 0 {
                return Err(PyValueError::new_err(format!("bad descriptor {fd}")));
            }
            Ok((GpuShare::Fd { len }, Some(fd)))
        }
        "cuda_ipc" => {
            let (_, handle): (String, Vec<u8>) = t.extract()?;
            let h: [u8; CUDA_IPC_HANDLE_BYTES] = handle.as_slice().try_into().map_err(|_| {
                PyValueError::new_err(format!(
                    "a CUDA IPC handle is {CUDA_IPC_HANDLE_BYTES} bytes, not {}",
                    handle.len()
                ))
            })?;
            Ok((GpuShare::CudaIpc(h), None))
        }
        other => Err(PyValueError::new_err(format!(
            "share kind must be \"fd\" or \"cuda_ipc\", not {other:?}"
        ))),
    }
}

/// Attaches: `shares` as from [`share_of`], `layers` as (share, offset, stride, page, pages).
pub(crate) fn attach(
    py: Python<'_>,
    client: &kvd_client::Client,
    ns: &kvd_client::Namespace,
    shares: &[Bound<'_, PyAny>],
    layers: Vec<(u32, u64, u64, u64, u64)>,
) -> PyResult<GpuAttachment> {
    let mut wire = Vec::with_capacity(shares.len());
    let mut raw = Vec::new();
    for s in shares {
        let (share, fd) = share_of(s)?;
        wire.push(share);
        raw.extend(fd);
    }
    let layers: Vec<GpuLayer> = layers
        .into_iter()
        .map(|(share, offset, stride, page, pages)| GpuLayer {
            share,
            offset,
            stride,
            page,
            pages,
        })
        .collect();
    // SAFETY: the caller's descriptors stay open for this call (Python holds them; the GIL is
    // released only while they are sent, and kvd keeps its own copies).
    let fds: Vec<BorrowedFd<'_>> = raw
        .iter()
        .map(|&fd| unsafe { BorrowedFd::borrow_raw(fd) })
        .collect();
    let inner = py
        .detach(|| client.gpu_attach(&ns.id, &wire, &fds, &layers))
        .map_err(to_py)?;
    Ok(GpuAttachment {
        inner,
        client_id: client.info().client_id,
    })
}

/// Refuses an attachment made on another client's connection.
pub(crate) fn check_attachment(client: &kvd_client::Client, att: &GpuAttachment) -> PyResult<()> {
    if att.client_id != client.info().client_id {
        return Err(PyValueError::new_err(
            "this attachment belongs to another Client; attach on this one",
        ));
    }
    Ok(())
}

/// `gpu_save`: one bool per key, stored now.
pub(crate) fn save(
    py: Python<'_>,
    client: &kvd_client::Client,
    att: &GpuAttachment,
    keys: &[BlockKey],
    pages: &[u32],
) -> PyResult<Vec<bool>> {
    check_attachment(client, att)?;
    let codes = py
        .detach(|| client.gpu_save(&att.inner, keys, pages))
        .map_err(to_py)?;
    Ok(codes.iter().map(|c| *c == BlockCode::Done).collect())
}

/// `gpu_load`: the codes of `load_blocks` (LOADED, MISSING, CORRUPT, BAD_SIZE).
pub(crate) fn load(
    py: Python<'_>,
    client: &kvd_client::Client,
    att: &GpuAttachment,
    keys: &[BlockKey],
    pages: &[u32],
    layers: Option<std::ops::Range<u32>>,
    verify: bool,
) -> PyResult<Vec<u32>> {
    check_attachment(client, att)?;
    let codes = py
        .detach(|| client.gpu_load(&att.inner, keys, pages, layers, verify))
        .map_err(to_py)?;
    Ok(codes
        .iter()
        .map(|c| match c {
            BlockCode::Done => LOADED,
            BlockCode::Corrupt => CORRUPT,
            BlockCode::BadSize => BAD_SIZE,
            _ => MISSING,
        })
        .collect())
}
