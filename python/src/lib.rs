//! `kvd._kvd`: the Python face of `kvd-client`.
//!
//! Python gets the blocking client (connect, namespaces, lookup, pin, stats) plus the two copy
//! paths an inference engine needs, both running with the GIL released:
//! - `put`/`get_into` move one block between a Python buffer (bytes, bytearray, numpy, a
//!   memoryview) and the shared arena with exactly one copy;
//! - `save_blocks`/`load_blocks` gather an engine block's pages from per-layer KV buffers into
//!   one arena slot (and scatter them back), so a block of L layers costs L page copies and no
//!   staging buffer. Loads verify the daemon's checksum before a single byte reaches the engine.
//!
//! Buffers are taken through the buffer protocol and checked (shape, strides, writability,
//! bounds) before any pointer is used, so a wrong argument raises instead of corrupting memory.

mod gpu;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kvd_client::{ClientError, Options, PutOutcome};
use kvd_proto::{BlockKey, NamespaceDesc, Tier};
use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

create_exception!(_kvd, KvdError, PyException, "A kvd operation failed.");
create_exception!(
    _kvd,
    KvdUnavailable,
    KvdError,
    "kvd is not running, or the connection to it was lost; a new Client may succeed later."
);
create_exception!(
    _kvd,
    KvdUnsupported,
    KvdError,
    "this kvd cannot do that (e.g. GPU transfers from a daemon without a GPU backend)."
);

/// `load_blocks` result: the block was copied into the engine's pages.
const LOADED: u32 = 0;
/// `load_blocks` result: kvd does not hold the block (evicted since the lookup).
const MISSING: u32 = 1;
/// `load_blocks` result: the bytes failed their checksum; nothing was copied.
const CORRUPT: u32 = 2;
/// `load_blocks` result: the stored block has another length than the pages; nothing copied.
const BAD_SIZE: u32 = 3;

/// Blocks per ring batch in `save_blocks`/`load_blocks`: bounds the slots and leases held at
/// once while still amortising the ring round trip.
const BATCH: usize = 32;

/// Connection-level failures (daemon gone, socket or ring broken) become `KvdUnavailable`, so
/// callers can tell "reconnect later" from "this request is wrong".
fn to_py(e: ClientError) -> PyErr {
    match e {
        ClientError::NotRunning { .. } | ClientError::Io(_) | ClientError::Ring(_) => {
            KvdUnavailable::new_err(e.to_string())
        }
        ClientError::Server {
            code: kvd_proto::ErrorCode::Unsupported,
            ..
        } => KvdUnsupported::new_err(e.to_string()),
        _ => KvdError::new_err(e.to_string()),
    }
}

fn key_of(b: &[u8]) -> PyResult<BlockKey> {
    let arr: [u8; 32] = b
        .try_into()
        .map_err(|_| PyValueError::new_err(format!("a block key is 32 bytes, got {}", b.len())))?;
    Ok(BlockKey(arr))
}

fn keys_of(keys: &[Vec<u8>]) -> PyResult<Vec<BlockKey>> {
    keys.iter().map(|k| key_of(k)).collect()
}

/// One per-layer KV buffer seen as `[num_blocks, page bytes…]`: where block `i`'s page starts
/// and how long it is.
#[derive(Debug, Clone, Copy)]
struct Pages {
    base: usize,
    blocks: usize,
    stride: usize,
    page: usize,
}

impl Pages {
    /// Checks that `buf` is a `[num_blocks, …]` byte array whose pages are contiguous and do
    /// not overlap, and (for loads) writable.
    fn of(buf: &PyBuffer<u8>, writable: bool, which: usize) -> PyResult<Pages> {
        let bad = |why: String| PyValueError::new_err(format!("layer buffer {which}: {why}"));
        if writable && buf.readonly() {
            return Err(bad("is read-only, but loads write into it".into()));
        }
        if buf.item_size() != 1 {
            return Err(bad("must be a byte (uint8) buffer".into()));
        }
        let shape = buf.shape();
        let strides = buf.strides();
        if shape.len() < 2 {
            return Err(bad(format!(
                "must have at least 2 dimensions [num_blocks, page…], has {}",
                shape.len()
            )));
        }
        if buf.suboffsets().is_some() {
            return Err(bad("indirect (suboffset) buffers are not supported".into()));
        }
        let mut expect: isize = 1;
        for d in (1..shape.len()).rev() {
            if shape[d] > 1 && strides[d] != expect {
                return Err(bad(format!(
                    "each block's page must be contiguous (dimension {d} has stride {}, \
                     expected {expect})",
                    strides[d]
                )));
            }
            expect = expect
                .checked_mul(isize::try_from(shape[d]).map_err(|_| bad("too large".into()))?)
                .ok_or_else(|| bad("too large".into()))?;
        }
        let page = usize::try_from(expect).map_err(|_| bad("too large".into()))?;
        let blocks = shape[0];
        let stride = if blocks > 1 {
            usize::try_from(strides[0])
                .ok()
                .filter(|s| *s >= page)
                .ok_or_else(|| {
                    bad(format!(
                        "block stride {} must be positive and at least the page size {page}",
                        strides[0]
                    ))
                })?
        } else {
            page
        };
        if page == 0 {
            return Err(bad("pages are empty".into()));
        }
        Ok(Pages {
            base: buf.buf_ptr() as usize,
            blocks,
            stride,
            page,
        })
    }

    fn at(&self, block: usize) -> usize {
        self.base + block * self.stride
    }
}

fn layer_pages(
    layers: &[Bound<'_, PyAny>],
    writable: bool,
) -> PyResult<(Vec<PyBuffer<u8>>, Vec<Pages>)> {
    if layers.is_empty() {
        return Err(PyValueError::new_err("at least one layer buffer is needed"));
    }
    let mut bufs = Vec::with_capacity(layers.len());
    let mut pages = Vec::with_capacity(layers.len());
    for (i, l) in layers.iter().enumerate() {
        let b = PyBuffer::<u8>::get(l).map_err(|e| {
            PyValueError::new_err(format!(
                "layer buffer {i}: must be a byte buffer ({e}); for a tensor pass \
                 tensor.view(torch.uint8).numpy()"
            ))
        })?;
        pages.push(Pages::of(&b, writable, i)?);
        bufs.push(b);
    }
    Ok((bufs, pages))
}

fn check_ids(ids: &[usize], keys: usize, pages: &[Pages]) -> PyResult<()> {
    if ids.len() != keys {
        return Err(PyValueError::new_err(format!(
            "{keys} keys but {} block ids",
            ids.len()
        )));
    }
    let limit = pages.iter().map(|p| p.blocks).min().unwrap_or(0);
    if let Some(bad) = ids.iter().find(|id| **id >= limit) {
        return Err(PyValueError::new_err(format!(
            "block id {bad} is out of range: the layer buffers hold {limit} blocks"
        )));
    }
    Ok(())
}

/// A connection to kvd: one control socket plus one shared-memory ring.
///
/// Thread-safe; calls from several threads are serialised per client, so give busy threads
/// their own client. Every data call releases the GIL while it waits or copies.
#[pyclass(frozen, module = "kvd._kvd")]
struct Client {
    inner: Arc<kvd_client::Client>,
}

/// An open namespace of a client: the scope of its keys, and its mapped arena.
#[pyclass(frozen, module = "kvd._kvd")]
struct Namespace {
    inner: kvd_client::Namespace,
    client_id: u64,
    desc: NamespaceDesc,
}

#[pymethods]
impl Namespace {
    /// The 16-byte namespace id.
    #[getter]
    fn id<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.id.0)
    }

    /// The namespace id as 32 hex digits (as `kvd-ctl status` shows it).
    #[getter]
    fn id_hex(&self) -> String {
        self.inner.id.to_hex()
    }

    /// Size of the shared arena this namespace's blocks live in.
    #[getter]
    fn arena_bytes(&self) -> u64 {
        self.inner.arena_bytes()
    }

    /// Whether the daemon publishes KV events (then send `Client.lineage` before storing).
    #[getter]
    fn events(&self) -> bool {
        self.inner.events
    }

    fn __repr__(&self) -> String {
        format!(
            "Namespace(id={}, model={:?}, dtype={:?}, layout={:?}, block_tokens={}, tp={}/{}, \
             lora={:?}, tenant={:?})",
            self.inner.id.short(),
            self.desc.model,
            self.desc.dtype,
            self.desc.layout,
            self.desc.block_tokens,
            self.desc.tp_rank,
            self.desc.tp_size,
            self.desc.lora,
            self.desc.tenant
        )
    }
}

impl Client {
    fn ns<'a>(&self, ns: &'a Namespace) -> PyResult<&'a kvd_client::Namespace> {
        if ns.client_id != self.inner.info().client_id {
            return Err(PyValueError::new_err(
                "this namespace was opened by another Client; open it on this one",
            ));
        }
        Ok(&ns.inner)
    }
}

#[pymethods]
impl Client {
    /// Connects to kvd at `socket` (default: `$KVD_SOCKET`, else /run/kvd/kvd.sock).
    #[new]
    #[pyo3(signature = (socket=None, *, name=None, admin=false, timeout_s=30.0))]
    fn new(
        py: Python<'_>,
        socket: Option<PathBuf>,
        name: Option<String>,
        admin: bool,
        timeout_s: f64,
    ) -> PyResult<Self> {
        let path = socket
            .or_else(|| std::env::var_os("KVD_SOCKET").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(kvd_client::DEFAULT_SOCKET));
        if !(timeout_s.is_finite() && timeout_s > 0.0) {
            return Err(PyValueError::new_err("timeout_s must be a positive number"));
        }
        let mut opts = Options {
            admin,
            timeout: Duration::from_secs_f64(timeout_s),
            ..Options::default()
        };
        if let Some(n) = name {
            opts.name = n;
        }
        let c = py
            .detach(|| kvd_client::Client::connect_with(&path, opts))
            .map_err(to_py)?;
        Ok(Client { inner: Arc::new(c) })
    }

    /// Socket path this client is connected to.
    #[getter]
    fn socket(&self) -> PathBuf {
        self.inner.socket_path().to_owned()
    }

    /// The daemon's version string.
    #[getter]
    fn daemon_version(&self) -> String {
        self.inner.info().daemon_version.clone()
    }

    /// Largest block the daemon accepts, in bytes.
    #[getter]
    fn max_block_bytes(&self) -> u64 {
        self.inner.info().max_block_bytes
    }

    /// Opens (creating if new) the namespace described by these fields and maps its arena.
    #[pyo3(signature = (model, dtype, layout, block_tokens, *, tp_rank=0, tp_size=1, lora=String::new(), tenant=String::new()))]
    #[allow(clippy::too_many_arguments)]
    fn open_namespace(
        &self,
        py: Python<'_>,
        model: String,
        dtype: String,
        layout: String,
        block_tokens: u32,
        tp_rank: u32,
        tp_size: u32,
        lora: String,
        tenant: String,
    ) -> PyResult<Namespace> {
        let desc = make_desc(
            &model,
            &dtype,
            &layout,
            block_tokens,
            tp_rank,
            tp_size,
            lora,
            tenant,
        )?;
        let inner = py
            .detach(|| self.inner.open_namespace(&desc))
            .map_err(to_py)?;
        Ok(Namespace {
            inner,
            client_id: self.inner.info().client_id,
            desc,
        })
    }

    /// Longest stored prefix of a key chain: `(prefix_len, {tier: count})`.
    fn lookup<'py>(
        &self,
        py: Python<'py>,
        ns: &Namespace,
        keys: Vec<Vec<u8>>,
    ) -> PyResult<(u32, Bound<'py, PyDict>)> {
        let keys = keys_of(&keys)?;
        let id = self.ns(ns)?.id;
        let r = py.detach(|| self.inner.lookup(&id, &keys)).map_err(to_py)?;
        let tiers = PyDict::new(py);
        for t in Tier::ALL {
            tiers.set_item(t.name(), r.tiers.get(t))?;
        }
        Ok((r.prefix_len, tiers))
    }

    /// Pins blocks against eviction; returns how many were found.
    fn pin(&self, py: Python<'_>, ns: &Namespace, keys: Vec<Vec<u8>>) -> PyResult<u32> {
        let keys = keys_of(&keys)?;
        let id = self.ns(ns)?.id;
        py.detach(|| self.inner.pin(&id, &keys)).map_err(to_py)
    }

    /// Drops one pin per block; returns how many were pinned.
    fn unpin(&self, py: Python<'_>, ns: &Namespace, keys: Vec<Vec<u8>>) -> PyResult<u32> {
        let keys = keys_of(&keys)?;
        let id = self.ns(ns)?.id;
        py.detach(|| self.inner.unpin(&id, &keys)).map_err(to_py)
    }

    /// Tells the daemon the token ids and parent of a chain of blocks about to be stored, for
    /// their KV events: `keys[0]`'s parent is `parent` (None for a first block), every other
    /// key's the one before it; `tokens` holds `block_tokens` ids per key. Returns how many
    /// blocks were recorded (0 when the daemon publishes no events).
    #[pyo3(signature = (ns, parent, keys, tokens))]
    fn lineage(
        &self,
        py: Python<'_>,
        ns: &Namespace,
        parent: Option<Vec<u8>>,
        keys: Vec<Vec<u8>>,
        tokens: Vec<u32>,
    ) -> PyResult<u32> {
        let keys = keys_of(&keys)?;
        let parent = parent.as_deref().map(key_of).transpose()?;
        let id = self.ns(ns)?.id;
        py.detach(|| self.inner.lineage(&id, parent, &keys, &tokens))
            .map_err(to_py)
    }

    /// Deletes blocks; returns how many were found.
    fn delete(&self, py: Python<'_>, ns: &Namespace, keys: Vec<Vec<u8>>) -> PyResult<u32> {
        let keys = keys_of(&keys)?;
        let id = self.ns(ns)?.id;
        py.detach(|| self.inner.delete(&id, &keys)).map_err(to_py)
    }

    /// The daemon's statistics, as the same dict `kvd-ctl status --json` prints.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let s = py.detach(|| self.inner.stats()).map_err(to_py)?;
        json_to_py(py, &kvd_client::json::status_json(&s))
    }

    /// A ring round trip; also waits until earlier releases were applied.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.flush()).map_err(to_py)
    }

    /// Stores one block from any byte buffer (one copy, into the arena). Returns True when
    /// stored now, False when kvd already held it.
    fn put(
        &self,
        py: Python<'_>,
        ns: &Namespace,
        key: &[u8],
        data: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let key = key_of(key)?;
        let ns = self.ns(ns)?;
        let buf = PyBuffer::<u8>::get(data)?;
        if !buf.is_c_contiguous() {
            return Err(PyValueError::new_err("data must be a contiguous buffer"));
        }
        let (ptr, len) = (buf.buf_ptr() as usize, buf.len_bytes());
        let r = py.detach(|| {
            // SAFETY: `buf` holds the exporter's buffer (contiguous, `len` bytes at `ptr`) alive
            // until it is dropped after this closure.
            let src = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
            self.inner.put(ns, &key, src)
        });
        drop(buf);
        Ok(r.map_err(to_py)? == PutOutcome::Stored)
    }

    /// Copies one block into a writable buffer; returns its length, or None when not stored.
    /// With `verify`, a block whose bytes fail the daemon's checksum raises KvdError.
    #[pyo3(signature = (ns, key, out, *, verify=true))]
    fn get_into(
        &self,
        py: Python<'_>,
        ns: &Namespace,
        key: &[u8],
        out: &Bound<'_, PyAny>,
        verify: bool,
    ) -> PyResult<Option<usize>> {
        let key = key_of(key)?;
        let ns = self.ns(ns)?;
        let buf = PyBuffer::<u8>::get(out)?;
        if buf.readonly() || !buf.is_c_contiguous() {
            return Err(PyValueError::new_err(
                "out must be a writable, contiguous buffer",
            ));
        }
        let (ptr, cap) = (buf.buf_ptr() as usize, buf.len_bytes());
        let r = py.detach(|| -> Result<Option<usize>, PyErr> {
            let Some(lease) = self.inner.get(ns, &key).map_err(to_py)? else {
                return Ok(None);
            };
            if verify && lease.verify() == Some(false) {
                return Err(KvdError::new_err(format!(
                    "block {} failed its checksum; it was not copied",
                    key.short()
                )));
            }
            if lease.len() > cap {
                return Err(PyValueError::new_err(format!(
                    "out holds {cap} bytes but the block has {}",
                    lease.len()
                )));
            }
            // SAFETY: `buf` keeps the writable exporter buffer of `cap` ≥ lease.len() bytes
            // alive until after this closure; the lease's bytes live in the arena, not in it.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, lease.len()) };
            kvd_shm::copy_bytes(dst, &lease);
            Ok(Some(lease.len()))
        });
        drop(buf);
        r
    }

    /// Reads one block into new `bytes`; None when not stored.
    #[pyo3(signature = (ns, key, *, verify=true))]
    fn get<'py>(
        &self,
        py: Python<'py>,
        ns: &Namespace,
        key: &[u8],
        verify: bool,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let key = key_of(key)?;
        let ns = self.ns(ns)?;
        let Some(lease) = self.inner.get(ns, &key).map_err(to_py)? else {
            return Ok(None);
        };
        if verify && lease.verify() == Some(false) {
            return Err(KvdError::new_err(format!(
                "block {} failed its checksum",
                key.short()
            )));
        }
        Ok(Some(PyBytes::new(py, &lease)))
    }

    /// Stores engine blocks: block `keys[i]` is the concatenation, over `layers`, of page
    /// `block_ids[i]` of each layer buffer (`[num_blocks, page…]`, bytes). Blocks kvd already
    /// holds are skipped without copying. Returns one bool per key: stored now.
    fn save_blocks(
        &self,
        py: Python<'_>,
        ns: &Namespace,
        keys: Vec<Vec<u8>>,
        block_ids: Vec<usize>,
        layers: Vec<Bound<'_, PyAny>>,
    ) -> PyResult<Vec<bool>> {
        let keys = keys_of(&keys)?;
        let ns = self.ns(ns)?;
        let (bufs, pages) = layer_pages(&layers, false)?;
        check_ids(&block_ids, keys.len(), &pages)?;
        let total: usize = pages.iter().map(|p| p.page).sum();
        let r = py.detach(|| -> Result<Vec<bool>, ClientError> {
            let mut out = Vec::with_capacity(keys.len());
            for (ks, ids) in keys.chunks(BATCH).zip(block_ids.chunks(BATCH)) {
                let want: Vec<(BlockKey, usize)> = ks.iter().map(|k| (*k, total)).collect();
                let slots = self.inner.reserve_many(ns, &want)?;
                let mut stored = vec![false; ks.len()];
                let mut fill = Vec::new();
                let mut idx = Vec::new();
                for (i, slot) in slots.into_iter().enumerate() {
                    let Some(mut slot) = slot else { continue };
                    let dst = slot.as_mut_slice();
                    let mut off = 0;
                    for p in &pages {
                        // SAFETY: `p` was validated against its buffer (contiguous page of
                        // `p.page` bytes at `p.at(id)`, id < blocks by check_ids), which
                        // `bufs` keeps alive; it is not the arena, so it cannot overlap `dst`.
                        let src = unsafe {
                            std::slice::from_raw_parts(p.at(ids[i]) as *const u8, p.page)
                        };
                        kvd_shm::copy_bytes(&mut dst[off..off + p.page], src);
                        off += p.page;
                    }
                    fill.push(slot);
                    idx.push(i);
                }
                for (i, o) in idx.into_iter().zip(self.inner.commit_many(fill)?) {
                    stored[i] = o == PutOutcome::Stored;
                }
                out.extend(stored);
            }
            Ok(out)
        });
        drop(bufs);
        r.map_err(to_py)
    }

    /// Loads engine blocks back into the layer buffers (the inverse of `save_blocks`).
    /// Returns one code per key: LOADED, MISSING, CORRUPT (checksum mismatch) or BAD_SIZE;
    /// only LOADED blocks had their pages written.
    #[pyo3(signature = (ns, keys, block_ids, layers, *, verify=true))]
    fn load_blocks(
        &self,
        py: Python<'_>,
        ns: &Namespace,
        keys: Vec<Vec<u8>>,
        block_ids: Vec<usize>,
        layers: Vec<Bound<'_, PyAny>>,
        verify: bool,
    ) -> PyResult<Vec<u32>> {
        let keys = keys_of(&keys)?;
        let ns = self.ns(ns)?;
        let (bufs, pages) = layer_pages(&layers, true)?;
        check_ids(&block_ids, keys.len(), &pages)?;
        let total: usize = pages.iter().map(|p| p.page).sum();
        let r = py.detach(|| -> Result<Vec<u32>, ClientError> {
            let mut out = Vec::with_capacity(keys.len());
            for (ks, ids) in keys.chunks(BATCH).zip(block_ids.chunks(BATCH)) {
                for (lease, id) in self.inner.get_many(ns, ks)?.into_iter().zip(ids) {
                    let code = match lease {
                        None => MISSING,
                        Some(l) if l.len() != total => BAD_SIZE,
                        Some(l) if verify && l.verify() == Some(false) => CORRUPT,
                        Some(l) => {
                            let mut off = 0;
                            for p in &pages {
                                // SAFETY: the destination page was validated (writable,
                                // contiguous, id in range, pages of distinct blocks do not
                                // overlap) and is kept alive by `bufs`; nothing else touches it
                                // during this call, and it is not the arena the source is in.
                                let dst = unsafe {
                                    std::slice::from_raw_parts_mut(p.at(*id) as *mut u8, p.page)
                                };
                                kvd_shm::copy_bytes(dst, &l[off..off + p.page]);
                                off += p.page;
                            }
                            LOADED
                        }
                    };
                    out.push(code);
                }
            }
            Ok(out)
        });
        drop(bufs);
        r.map_err(to_py)
    }

    /// Shares an engine's paged KV buffers with kvd for daemon-driven copies (the daemon needs
    /// a GPU backend; otherwise `KvdUnsupported`). `shares`: `("fd", fd, length)` for a memfd
    /// sealed against shrinking (the `host` stand-in backend), `("cuda_ipc", handle)` for a
    /// 64-byte CUDA IPC handle. `layers`: `(share, offset, stride, page, pages)` per layer
    /// buffer in block order: page `i` at `offset + i * stride` of that share, `page` bytes.
    fn gpu_attach(
        &self,
        py: Python<'_>,
        ns: &Namespace,
        shares: Vec<Bound<'_, PyAny>>,
        layers: Vec<(u32, u64, u64, u64, u64)>,
    ) -> PyResult<gpu::GpuAttachment> {
        let ns = self.ns(ns)?;
        gpu::attach(py, &self.inner, ns, &shares, layers)
    }

    /// kvd copies page `block_ids[i]` of every attached layer into block `keys[i]`. Returns one
    /// bool per key: stored now (false: already held, or no room).
    fn gpu_save(
        &self,
        py: Python<'_>,
        att: &gpu::GpuAttachment,
        keys: Vec<Vec<u8>>,
        block_ids: Vec<u32>,
    ) -> PyResult<Vec<bool>> {
        let keys = keys_of(&keys)?;
        gpu::save(py, &self.inner, att, &keys, &block_ids)
    }

    /// kvd copies block `keys[i]` into page `block_ids[i]` of the attached layers
    /// `first_layer .. first_layer + layers` (all when `layers` is 0). Returns the codes of
    /// `load_blocks` (LOADED, MISSING, CORRUPT, BAD_SIZE); only LOADED pages were written.
    #[pyo3(signature = (att, keys, block_ids, *, first_layer=0, layers=0, verify=true))]
    #[allow(clippy::too_many_arguments)]
    fn gpu_load(
        &self,
        py: Python<'_>,
        att: &gpu::GpuAttachment,
        keys: Vec<Vec<u8>>,
        block_ids: Vec<u32>,
        first_layer: u32,
        layers: u32,
        verify: bool,
    ) -> PyResult<Vec<u32>> {
        let keys = keys_of(&keys)?;
        if layers == 0 && first_layer != 0 {
            return Err(PyValueError::new_err(
                "give `layers` with `first_layer` (0 loads every layer)",
            ));
        }
        let range = (layers > 0).then(|| first_layer..first_layer.saturating_add(layers));
        gpu::load(py, &self.inner, att, &keys, &block_ids, range, verify)
    }

    /// Unmaps an attachment in kvd; false when it was not held.
    fn gpu_detach(&self, py: Python<'_>, att: &gpu::GpuAttachment) -> PyResult<bool> {
        gpu::check_attachment(&self.inner, att)?;
        py.detach(|| self.inner.gpu_detach(&att.inner))
            .map_err(to_py)
    }

    /// Test hook: flips the byte at `offset` of a stored block in place (with no `offset`,
    /// changes nothing). Returns None when the block is not stored, else whether the daemon had
    /// checksummed it before (only then can readers detect the damage). For tests only.
    #[pyo3(signature = (ns, key, offset=None))]
    fn _testing_corrupt(
        &self,
        ns: &Namespace,
        key: &[u8],
        offset: Option<usize>,
    ) -> PyResult<Option<bool>> {
        let key = key_of(key)?;
        let ns = self.ns(ns)?;
        let Some(lease) = self.inner.get(ns, &key).map_err(to_py)? else {
            return Ok(None);
        };
        let sealed = lease.checksum().is_some();
        if let Some(off) = offset {
            if !lease.testing_flip_byte(off) {
                return Err(PyValueError::new_err("offset is past the end of the block"));
            }
        }
        Ok(Some(sealed))
    }
}

fn json_to_py<'py>(py: Python<'py>, v: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    use serde_json::Value;
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u.into_pyobject(py)?.into_any(),
            (_, Some(i)) => i.into_pyobject(py)?.into_any(),
            _ => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any(),
        },
        Value::String(s) => s.into_pyobject(py)?.into_any(),
        Value::Array(a) => {
            let l = PyList::empty(py);
            for x in a {
                l.append(json_to_py(py, x)?)?;
            }
            l.into_any()
        }
        Value::Object(o) => {
            let d = PyDict::new(py);
            for (k, x) in o {
                d.set_item(k, json_to_py(py, x)?)?;
            }
            d.into_any()
        }
    })
}

/// kvd's canonical key of one block: BLAKE3 over parent ‖ tokens ‖ extra (see kvd-proto).
#[pyfunction]
#[pyo3(signature = (parent, tokens, extra=None))]
fn chain_key<'py>(
    py: Python<'py>,
    parent: Option<&[u8]>,
    tokens: Vec<u32>,
    extra: Option<&[u8]>,
) -> PyResult<Bound<'py, PyBytes>> {
    let parent = parent.map(key_of).transpose()?;
    let k = kvd_proto::key::chain_key(parent.as_ref(), &tokens, extra.unwrap_or_default());
    Ok(PyBytes::new(py, &k.0))
}

/// Keys of every full block of `tokens` (a trailing partial block gets none), continuing the
/// chain from `parent`; `first_extra` is mixed into the first block only (e.g. a cache salt).
#[pyfunction]
#[pyo3(signature = (tokens, block_tokens, parent=None, first_extra=None))]
fn chain_keys<'py>(
    py: Python<'py>,
    tokens: Vec<u32>,
    block_tokens: usize,
    parent: Option<&[u8]>,
    first_extra: Option<&[u8]>,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    if block_tokens == 0 {
        return Err(PyValueError::new_err("block_tokens must be at least 1"));
    }
    let mut prev = parent.map(key_of).transpose()?;
    let mut extra = first_extra.unwrap_or_default();
    let mut out = Vec::with_capacity(tokens.len() / block_tokens);
    for chunk in tokens.chunks_exact(block_tokens) {
        let k = kvd_proto::key::chain_key(prev.as_ref(), chunk, extra);
        out.push(PyBytes::new(py, &k.0));
        prev = Some(k);
        extra = &[];
    }
    Ok(out)
}

/// The 16-byte id kvd gives the namespace with these fields.
#[pyfunction]
#[pyo3(signature = (model, dtype, layout, block_tokens, *, tp_rank=0, tp_size=1, lora=String::new(), tenant=String::new()))]
#[allow(clippy::too_many_arguments)]
fn namespace_id<'py>(
    py: Python<'py>,
    model: String,
    dtype: String,
    layout: String,
    block_tokens: u32,
    tp_rank: u32,
    tp_size: u32,
    lora: String,
    tenant: String,
) -> PyResult<Bound<'py, PyBytes>> {
    let desc = make_desc(
        &model,
        &dtype,
        &layout,
        block_tokens,
        tp_rank,
        tp_size,
        lora,
        tenant,
    )?;
    Ok(PyBytes::new(py, &desc.id().0))
}

/// A validated namespace descriptor from the keyword arguments Python passes.
#[allow(clippy::too_many_arguments)]
fn make_desc(
    model: &str,
    dtype: &str,
    layout: &str,
    block_tokens: u32,
    tp_rank: u32,
    tp_size: u32,
    lora: String,
    tenant: String,
) -> PyResult<NamespaceDesc> {
    let desc = NamespaceDesc {
        tp_rank,
        tp_size,
        lora,
        tenant,
        ..NamespaceDesc::new(model, dtype, layout, block_tokens)
    };
    desc.validate()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(desc)
}

/// The checksum kvd seals blocks with (xxh3-64).
#[pyfunction]
fn checksum(data: &Bound<'_, PyAny>) -> PyResult<u64> {
    let buf = PyBuffer::<u8>::get(data)?;
    if !buf.is_c_contiguous() {
        return Err(PyValueError::new_err("data must be a contiguous buffer"));
    }
    // SAFETY: `buf` keeps the contiguous exporter buffer alive for this borrow; the GIL is held.
    let s = unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const u8, buf.len_bytes()) };
    Ok(kvd_client::kvd_checksum(s))
}

#[pymodule]
fn _kvd(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Client>()?;
    m.add_class::<Namespace>()?;
    m.add("KvdError", py.get_type::<KvdError>())?;
    m.add("KvdUnavailable", py.get_type::<KvdUnavailable>())?;
    m.add("KvdUnsupported", py.get_type::<KvdUnsupported>())?;
    m.add_class::<gpu::GpuAttachment>()?;
    m.add("LOADED", LOADED)?;
    m.add("MISSING", MISSING)?;
    m.add("CORRUPT", CORRUPT)?;
    m.add("BAD_SIZE", BAD_SIZE)?;
    m.add("DEFAULT_SOCKET", kvd_client::DEFAULT_SOCKET)?;
    m.add_function(wrap_pyfunction!(chain_key, m)?)?;
    m.add_function(wrap_pyfunction!(chain_keys, m)?)?;
    m.add_function(wrap_pyfunction!(namespace_id, m)?)?;
    m.add_function(wrap_pyfunction!(checksum, m)?)?;
    Ok(())
}
