//! C ABI over `kvd-client`, for engines written in C or C++: connect to a running kvd, open
//! a namespace, put, get, look up and delete blocks, and compute kvd's canonical block keys.
//!
//! Conventions: every function returns a [`KvdStatus`]; on anything but `KVD_STATUS_OK` (and
//! the expected `NOT_FOUND`/`EXISTS` answers) [`kvd_last_error`] holds a message for the
//! calling thread. Handles are opaque pointers created by `kvd_connect` /
//! `kvd_open_namespace` and released by their `_free` function. No panic crosses the
//! boundary: one is caught and reported as `KVD_STATUS_PANIC`. A client handle may be used
//! from several threads (calls are serialised inside); give busy threads their own client.
//! Keys are 32 bytes, namespace ids 16.

#![deny(clippy::undocumented_unsafe_blocks)]

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use kvd_client::{BlockKey, Client, ClientError, NamespaceDesc, Options, PutOutcome};
use kvd_proto::ring::Status as RingStatus;

/// Outcome of a call.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvdStatus {
    /// Done.
    Ok = 0,
    /// The block is not stored (get).
    NotFound = 1,
    /// The block was already stored; nothing was written (put).
    Exists = 2,
    /// A null pointer, a bad string or an unusable value was passed.
    InvalidArgument = 3,
    /// kvd is not running, or went away; trying later may work.
    Unavailable = 4,
    /// kvd's DRAM is full of pinned or leased blocks; trying later may work.
    CacheFull = 5,
    /// The output buffer is smaller than the block (its length is in `*len`).
    TooSmall = 6,
    /// Any other failure; see `kvd_last_error`.
    Error = 7,
    /// A bug inside the library was caught at the boundary.
    Panic = 8,
}

/// A connection to kvd.
pub struct KvdClient {
    inner: Client,
}

/// A namespace opened by one client (the scope of its keys, and its mapped arena).
pub struct KvdNamespace {
    inner: kvd_client::Namespace,
    client_id: u64,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn fail(status: KvdStatus, msg: impl AsRef<str>) -> KvdStatus {
    set_error(msg.as_ref());
    status
}

fn from_client(e: &ClientError) -> KvdStatus {
    let s = if e.status() == Some(RingStatus::CacheFull) {
        KvdStatus::CacheFull
    } else {
        match e {
            ClientError::Invalid(_) => KvdStatus::InvalidArgument,
            ClientError::NotRunning { .. } | ClientError::Io(_) => KvdStatus::Unavailable,
            _ if e.is_retryable() => KvdStatus::Unavailable,
            _ => KvdStatus::Error,
        }
    };
    fail(s, e.to_string())
}

/// Runs `f`, turning a panic into `KVD_STATUS_PANIC`.
fn guard(f: impl FnOnce() -> KvdStatus) -> KvdStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(s) => s,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            fail(
                KvdStatus::Panic,
                format!("internal error (please report): {what}"),
            )
        }
    }
}

/// # Safety
/// `p` is null or a NUL-terminated string valid for the call.
unsafe fn opt_str<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, KvdStatus> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null and NUL-terminated (the caller's contract).
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(Some)
        .map_err(|_| fail(KvdStatus::InvalidArgument, format!("{what} is not UTF-8")))
}

/// # Safety
/// `p` is null or a NUL-terminated string valid for the call.
unsafe fn req_str<'a>(p: *const c_char, what: &str) -> Result<&'a str, KvdStatus> {
    // SAFETY: forwarded contract.
    unsafe { opt_str(p, what) }?
        .ok_or_else(|| fail(KvdStatus::InvalidArgument, format!("{what} is NULL")))
}

/// # Safety
/// `p` is null or points at 32 readable bytes.
unsafe fn key_at(p: *const u8) -> Result<BlockKey, KvdStatus> {
    if p.is_null() {
        return Err(fail(KvdStatus::InvalidArgument, "key is NULL"));
    }
    let mut k = [0u8; 32];
    // SAFETY: 32 readable bytes (the caller's contract); `k` is 32 bytes.
    unsafe { std::ptr::copy_nonoverlapping(p, k.as_mut_ptr(), 32) };
    Ok(BlockKey(k))
}

/// # Safety
/// `p` is null or points at `n` × 32 readable bytes.
unsafe fn keys_at(p: *const u8, n: usize) -> Result<Vec<BlockKey>, KvdStatus> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if p.is_null() {
        return Err(fail(KvdStatus::InvalidArgument, "keys is NULL"));
    }
    let Some(bytes) = n.checked_mul(32) else {
        return Err(fail(KvdStatus::InvalidArgument, "too many keys"));
    };
    // SAFETY: `n` × 32 readable bytes (the caller's contract).
    let raw = unsafe { std::slice::from_raw_parts(p, bytes) };
    Ok(raw
        .chunks_exact(32)
        .map(|c| {
            let mut k = [0u8; 32];
            k.copy_from_slice(c);
            BlockKey(k)
        })
        .collect())
}

/// # Safety
/// `c` and `ns` are null or live handles from this library.
unsafe fn pair<'a>(
    c: *const KvdClient,
    ns: *const KvdNamespace,
) -> Result<(&'a KvdClient, &'a KvdNamespace), KvdStatus> {
    if c.is_null() || ns.is_null() {
        return Err(fail(
            KvdStatus::InvalidArgument,
            "client or namespace is NULL",
        ));
    }
    // SAFETY: live handles (the caller's contract), only read through shared references.
    let (c, ns) = unsafe { (&*c, &*ns) };
    if ns.client_id != c.inner.info().client_id {
        return Err(fail(
            KvdStatus::InvalidArgument,
            "the namespace was opened by another client",
        ));
    }
    Ok((c, ns))
}

/// Runs the body of an entry point: its error status (message already set) is returned as
/// is, and a panic becomes `KVD_STATUS_PANIC`.
fn call(f: impl FnOnce() -> Result<KvdStatus, KvdStatus>) -> KvdStatus {
    guard(|| f().unwrap_or_else(|s| s))
}

/// The message of the last failed call on this thread ("" if none). The pointer stays
/// valid until the next call into this library on the same thread.
#[no_mangle]
pub extern "C" fn kvd_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Connects to the daemon at `socket` (NULL: `$KVD_SOCKET`, else `/run/kvd/kvd.sock`), naming
/// this client `name` in `kvd-ctl status` (NULL: `pid-<pid>`). On success `*out` holds a
/// client to release with `kvd_client_free`.
///
/// # Safety
/// `socket` and `name` are NULL or NUL-terminated strings; `out` points at writable storage
/// for one pointer.
#[no_mangle]
pub unsafe extern "C" fn kvd_connect(
    socket: *const c_char,
    name: *const c_char,
    out: *mut *mut KvdClient,
) -> KvdStatus {
    call(|| {
        if out.is_null() {
            return Err(fail(KvdStatus::InvalidArgument, "out is NULL"));
        }
        // SAFETY: the caller's contract on `socket` and `name`.
        let (socket, name) = unsafe { (opt_str(socket, "socket")?, opt_str(name, "name")?) };
        let path = socket
            .map(str::to_owned)
            .or_else(|| std::env::var("KVD_SOCKET").ok())
            .unwrap_or_else(|| kvd_client::DEFAULT_SOCKET.to_owned());
        let mut opts = Options::default();
        if let Some(n) = name {
            opts.name = n.to_owned();
        }
        let inner = Client::connect_with(&path, opts).map_err(|e| from_client(&e))?;
        let b = Box::into_raw(Box::new(KvdClient { inner }));
        // SAFETY: `out` is non-null and writable (the caller's contract).
        unsafe { out.write(b) };
        Ok(KvdStatus::Ok)
    })
}

/// Closes a client (NULL is ignored). Its namespaces must be freed first or not used again.
///
/// # Safety
/// `c` is NULL or a handle from `kvd_connect` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn kvd_client_free(c: *mut KvdClient) {
    if !c.is_null() {
        // SAFETY: a live handle from Box::into_raw, freed once (the caller's contract).
        let b = unsafe { Box::from_raw(c) };
        let _ = catch_unwind(AssertUnwindSafe(move || drop(b)));
    }
}

/// Opens (creating if new) the namespace described by model, dtype, KV layout, tokens per
/// block, tensor-parallel rank and size, LoRA adapter and tenant (those two may be NULL for
/// none). On success `*out` holds a namespace to release with `kvd_namespace_free`.
///
/// # Safety
/// `c` is a live client; the strings are NULL (where allowed) or NUL-terminated; `out`
/// points at writable storage for one pointer.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvd_open_namespace(
    c: *const KvdClient,
    model: *const c_char,
    dtype: *const c_char,
    layout: *const c_char,
    block_tokens: u32,
    tp_rank: u32,
    tp_size: u32,
    lora: *const c_char,
    tenant: *const c_char,
    out: *mut *mut KvdNamespace,
) -> KvdStatus {
    call(|| {
        if c.is_null() || out.is_null() {
            return Err(fail(KvdStatus::InvalidArgument, "client or out is NULL"));
        }
        // SAFETY: live client and valid strings (the caller's contract).
        let (c, model, dtype, layout, lora, tenant) = unsafe {
            (
                &*c,
                req_str(model, "model")?,
                req_str(dtype, "dtype")?,
                req_str(layout, "layout")?,
                opt_str(lora, "lora")?,
                opt_str(tenant, "tenant")?,
            )
        };
        let mut desc = NamespaceDesc::new(model, dtype, layout, block_tokens);
        desc.tp_rank = tp_rank;
        desc.tp_size = tp_size;
        desc.lora = lora.unwrap_or_default().to_owned();
        desc.tenant = tenant.unwrap_or_default().to_owned();
        let inner = c.inner.open_namespace(&desc).map_err(|e| from_client(&e))?;
        let b = Box::into_raw(Box::new(KvdNamespace {
            inner,
            client_id: c.inner.info().client_id,
        }));
        // SAFETY: `out` is non-null and writable (the caller's contract).
        unsafe { out.write(b) };
        Ok(KvdStatus::Ok)
    })
}

/// Releases a namespace handle (NULL is ignored); its blocks stay in kvd.
///
/// # Safety
/// `ns` is NULL or a handle from `kvd_open_namespace` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn kvd_namespace_free(ns: *mut KvdNamespace) {
    if !ns.is_null() {
        // SAFETY: a live handle from Box::into_raw, freed once (the caller's contract).
        let b = unsafe { Box::from_raw(ns) };
        let _ = catch_unwind(AssertUnwindSafe(move || drop(b)));
    }
}

/// Writes the namespace's 16-byte id (as `kvd-ctl status` shows it, in hex) to `out`.
///
/// # Safety
/// `ns` is a live namespace; `out` points at 16 writable bytes.
#[no_mangle]
pub unsafe extern "C" fn kvd_namespace_id(ns: *const KvdNamespace, out: *mut u8) -> KvdStatus {
    guard(|| {
        if ns.is_null() || out.is_null() {
            return fail(KvdStatus::InvalidArgument, "namespace or out is NULL");
        }
        // SAFETY: live handle; 16 writable bytes (the caller's contract).
        unsafe { std::ptr::copy_nonoverlapping((*ns).inner.id.0.as_ptr(), out, 16) };
        KvdStatus::Ok
    })
}

/// Stores one block of `len` bytes under `key` (32 bytes): `KVD_STATUS_OK` when stored now,
/// `KVD_STATUS_EXISTS` when kvd already held it (nothing written).
///
/// # Safety
/// `c` and `ns` are live handles of the same client; `key` points at 32 bytes; `data` at
/// `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn kvd_put(
    c: *const KvdClient,
    ns: *const KvdNamespace,
    key: *const u8,
    data: *const u8,
    len: usize,
) -> KvdStatus {
    call(|| {
        // SAFETY: the caller's contract on the handles and the key.
        let ((c, ns), key) = unsafe { (pair(c, ns)?, key_at(key)?) };
        if data.is_null() || len == 0 {
            return Err(fail(KvdStatus::InvalidArgument, "data is NULL or empty"));
        }
        // SAFETY: `len` readable bytes at `data` (the caller's contract).
        let src = unsafe { std::slice::from_raw_parts(data, len) };
        match c.inner.put(&ns.inner, &key, src) {
            Ok(PutOutcome::Stored) => Ok(KvdStatus::Ok),
            Ok(PutOutcome::Exists) => Ok(KvdStatus::Exists),
            Err(e) => Err(from_client(&e)),
        }
    })
}

/// Copies the block stored under `key` into `out` (`cap` bytes) and its length into `*len`.
/// `KVD_STATUS_NOT_FOUND` when not stored; `KVD_STATUS_TOO_SMALL` (with `*len` set to the
/// block's length, nothing copied) when `cap` is too small. The daemon's checksum is verified
/// on the copied bytes when it is known; a mismatch is `KVD_STATUS_ERROR`.
///
/// # Safety
/// `c` and `ns` are live handles of the same client; `key` points at 32 bytes; `out` at
/// `cap` writable bytes; `len` at a writable size_t.
#[no_mangle]
pub unsafe extern "C" fn kvd_get(
    c: *const KvdClient,
    ns: *const KvdNamespace,
    key: *const u8,
    out: *mut u8,
    cap: usize,
    len: *mut usize,
) -> KvdStatus {
    call(|| {
        // SAFETY: the caller's contract on the handles and the key.
        let ((c, ns), key) = unsafe { (pair(c, ns)?, key_at(key)?) };
        if len.is_null() || (out.is_null() && cap > 0) {
            return Err(fail(KvdStatus::InvalidArgument, "out or len is NULL"));
        }
        let Some(lease) = c.inner.get(&ns.inner, &key).map_err(|e| from_client(&e))? else {
            return Ok(KvdStatus::NotFound);
        };
        let n = lease.len();
        // SAFETY: `len` is writable (the caller's contract).
        unsafe { len.write(n) };
        if n > cap {
            return Ok(fail(
                KvdStatus::TooSmall,
                format!("the block holds {n} bytes, the buffer {cap}"),
            ));
        }
        // SAFETY: `out` has `cap` ≥ `n` writable bytes (the caller's contract).
        let dst = unsafe { std::slice::from_raw_parts_mut(out, n) };
        dst.copy_from_slice(&lease);
        if lease.verify() == Some(false) {
            return Err(fail(
                KvdStatus::Error,
                "the block failed its checksum; do not use the copied bytes",
            ));
        }
        Ok(KvdStatus::Ok)
    })
}

/// Longest stored prefix of a chain of `n` keys (`n` × 32 bytes, first block first), in
/// `*prefix`.
///
/// # Safety
/// `c` and `ns` are live handles of the same client; `keys` points at `n` × 32 bytes;
/// `prefix` at a writable uint32_t.
#[no_mangle]
pub unsafe extern "C" fn kvd_lookup(
    c: *const KvdClient,
    ns: *const KvdNamespace,
    keys: *const u8,
    n: usize,
    prefix: *mut u32,
) -> KvdStatus {
    call(|| {
        // SAFETY: the caller's contract on the handles and the keys.
        let ((c, ns), keys) = unsafe { (pair(c, ns)?, keys_at(keys, n)?) };
        if prefix.is_null() {
            return Err(fail(KvdStatus::InvalidArgument, "prefix is NULL"));
        }
        let l = c
            .inner
            .lookup(&ns.inner.id, &keys)
            .map_err(|e| from_client(&e))?;
        // SAFETY: writable (the caller's contract).
        unsafe { prefix.write(l.prefix_len) };
        Ok(KvdStatus::Ok)
    })
}

/// Deletes `n` keys; `*deleted` (may be NULL) gets how many were stored.
///
/// # Safety
/// `c` and `ns` are live handles of the same client; `keys` points at `n` × 32 bytes;
/// `deleted` is NULL or a writable uint32_t.
#[no_mangle]
pub unsafe extern "C" fn kvd_delete(
    c: *const KvdClient,
    ns: *const KvdNamespace,
    keys: *const u8,
    n: usize,
    deleted: *mut u32,
) -> KvdStatus {
    call(|| {
        // SAFETY: the caller's contract on the handles and the keys.
        let ((c, ns), keys) = unsafe { (pair(c, ns)?, keys_at(keys, n)?) };
        let k = c
            .inner
            .delete(&ns.inner.id, &keys)
            .map_err(|e| from_client(&e))?;
        if !deleted.is_null() {
            // SAFETY: writable when non-null (the caller's contract).
            unsafe { deleted.write(k) };
        }
        Ok(KvdStatus::Ok)
    })
}

/// kvd's canonical key of a block: BLAKE3 over the parent key (NULL: the chain's root), the
/// `n` token ids and no extra bytes — the same as `kvd.chain_key` in Python and
/// `kvd_proto::key::chain_key` in Rust. Writes 32 bytes to `out`.
///
/// # Safety
/// `parent` is NULL or points at 32 bytes; `tokens` points at `n` uint32_t; `out` at 32
/// writable bytes.
#[no_mangle]
pub unsafe extern "C" fn kvd_chain_key(
    parent: *const u8,
    tokens: *const u32,
    n: usize,
    out: *mut u8,
) -> KvdStatus {
    call(|| {
        if out.is_null() || (tokens.is_null() && n > 0) {
            return Err(fail(KvdStatus::InvalidArgument, "tokens or out is NULL"));
        }
        let parent = if parent.is_null() {
            None
        } else {
            // SAFETY: 32 readable bytes (the caller's contract).
            Some(unsafe { key_at(parent)? })
        };
        let toks = if n == 0 {
            &[][..]
        } else {
            // SAFETY: `n` readable u32 (the caller's contract).
            unsafe { std::slice::from_raw_parts(tokens, n) }
        };
        let k = kvd_proto::key::chain_key(parent.as_ref(), toks, &[]);
        // SAFETY: 32 writable bytes (the caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(k.0.as_ptr(), out, 32) };
        Ok(KvdStatus::Ok)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last() -> String {
        // SAFETY: the pointer is valid until the next call on this thread.
        unsafe { CStr::from_ptr(kvd_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn null_arguments_are_refused_with_a_message() {
        let mut out: *mut KvdClient = std::ptr::null_mut();
        // SAFETY: valid pointers or NULL, as documented.
        let s = unsafe { kvd_connect(std::ptr::null(), std::ptr::null(), std::ptr::null_mut()) };
        assert_eq!(s, KvdStatus::InvalidArgument);
        assert!(last().contains("out is NULL"));
        let sock = CString::new("/nonexistent/kvd.sock").unwrap();
        // SAFETY: as above.
        let s = unsafe { kvd_connect(sock.as_ptr(), std::ptr::null(), &mut out) };
        assert_eq!(s, KvdStatus::Unavailable);
        assert!(last().contains("not running"), "{}", last());
        assert!(out.is_null());
        // SAFETY: NULL handles are refused, not dereferenced.
        let s = unsafe {
            kvd_put(
                std::ptr::null(),
                std::ptr::null(),
                std::ptr::null(),
                std::ptr::null(),
                0,
            )
        };
        assert_eq!(s, KvdStatus::InvalidArgument);
        // SAFETY: NULL is ignored.
        unsafe { kvd_client_free(std::ptr::null_mut()) };
    }

    #[test]
    fn chain_key_matches_the_rust_chain() {
        let tokens: Vec<u32> = (0..64).collect();
        let want = kvd_proto::key::chain_keys(&tokens, 32);
        let mut k0 = [0u8; 32];
        let mut k1 = [0u8; 32];
        // SAFETY: valid buffers of the documented sizes.
        unsafe {
            assert_eq!(
                kvd_chain_key(std::ptr::null(), tokens.as_ptr(), 32, k0.as_mut_ptr()),
                KvdStatus::Ok
            );
            assert_eq!(
                kvd_chain_key(k0.as_ptr(), tokens[32..].as_ptr(), 32, k1.as_mut_ptr()),
                KvdStatus::Ok
            );
        }
        assert_eq!([BlockKey(k0), BlockKey(k1)], want[..]);
    }

    #[test]
    fn panics_stop_at_the_boundary() {
        let s = guard(|| panic!("boom"));
        assert_eq!(s, KvdStatus::Panic);
        assert!(last().contains("boom"));
    }
}
