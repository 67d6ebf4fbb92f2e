//! The CUDA backend: the driver API through cudarc, loaded at run time.
//!
//! Why the driver API and dynamic loading: kvd must build and run on machines without CUDA
//! (CI, CPU-only nodes), and the daemon needs no more than pinning, copies and IPC handles.
//! `libcuda.so` is looked for before anything else is called (cudarc panics otherwise), so a
//! node without the driver gets [`GpuError::Unavailable`] with the reason. kvd's own kernels
//! (batched copies of small pages, block checksums) are in `kernels`.

use std::sync::{Mutex, MutexGuard};

use cudarc::driver::result;
use cudarc::driver::sys;

mod kernels;

use kernels::{hashable, Kernels};

use crate::method::{choose, Abilities, CopyMethod, Registry, Span};
use crate::plan::Layer;
use crate::{Backend, DevicePtr, DeviceRun, GpuError, Mapped, Run, Shared};

/// Driver version (`cuDriverGetVersion`) that brought `cuMemcpyBatchAsync`: 12.8.
const BATCH_DRIVER: i32 = 12080;

/// One CUDA device: its primary context, a non-blocking stream for kvd's copies and one for
/// checksums (they run side by side), and the means to issue batches of copies
/// ([`CopyMethod`]).
pub struct CudaBackend {
    ordinal: i32,
    name: String,
    device: sys::CUdevice,
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    hash_stream: sys::CUstream,
    method: CopyMethod,
    /// The driver has `cuMemcpyBatchAsync`.
    batch: bool,
    /// kvd's kernels, when they loaded and host pointers work on the device.
    kernel: Option<Kernels>,
    /// Multiprocessors of the device (sizes the kernel's grid).
    sms: u32,
    /// Host ranges this backend pinned and mapped (the kernel touches no other host memory).
    registry: Mutex<Registry>,
}

fn poisoned<T>(_: T) -> GpuError {
    GpuError::Invalid("CUDA backend lock poisoned".into())
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>, GpuError> {
    m.lock().map_err(poisoned)
}

// SAFETY: the driver API is thread-safe; every call first makes this backend's context
// current on the calling thread (`enter`), and the stream and context handles are only ever
// passed to driver calls.
unsafe impl Send for CudaBackend {}
// SAFETY: as above; copies on the shared stream are serialized by the driver.
unsafe impl Sync for CudaBackend {}

fn driver(call: &'static str, e: result::DriverError) -> GpuError {
    let name = e.error_name().map(|c| c.to_string_lossy().into_owned());
    let text = e.error_string().map(|c| c.to_string_lossy().into_owned());
    GpuError::Driver {
        call,
        message: format!(
            "{}: {}",
            name.unwrap_or_else(|_| format!("{:?}", e.0)),
            text.unwrap_or_default()
        ),
    }
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .field("method", &self.method)
            .field("batch", &self.batch)
            .field("kernel", &self.kernel.is_some())
            .finish()
    }
}

/// Waits for everything queued on `stream`, which must be one of a live backend's streams.
fn sync(stream: sys::CUstream) -> Result<(), GpuError> {
    // SAFETY: the stream lives as long as the backend that passes it.
    unsafe { result::stream::synchronize(stream) }.map_err(|e| driver("cuStreamSynchronize", e))
}

/// Device-to-host runs as spans (source: the device).
fn d2h_spans(runs: &[Run]) -> Vec<Span> {
    runs.iter()
        .map(|r| Span {
            src: r.dev,
            dst: r.host as u64,
            len: r.len as u64,
        })
        .collect()
}

/// Which direction a batch moves, for one-copy-per-run issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    D2H,
    H2D,
    D2D,
}

impl CudaBackend {
    /// Whether the CUDA driver library can be loaded on this machine.
    pub fn driver_present() -> bool {
        // SAFETY: only tries to load libcuda; calls nothing in it.
        unsafe { sys::is_culib_present() }
    }

    /// Opens device `ordinal` (its primary context, shared with the engine's runtime API
    /// context on that device), creates kvd's copy stream and readies `method`: an explicit
    /// `batch` or `kernel` this driver or device cannot run is an error naming why; `auto`
    /// uses what is there.
    pub fn open(ordinal: i32, method: CopyMethod) -> Result<Self, GpuError> {
        if !Self::driver_present() {
            return Err(GpuError::Unavailable(
                "libcuda.so (the NVIDIA driver) was not found on this machine".into(),
            ));
        }
        result::init().map_err(|e| driver("cuInit", e))?;
        let count = result::device::get_count().map_err(|e| driver("cuDeviceGetCount", e))?;
        if ordinal < 0 || ordinal >= count {
            return Err(GpuError::Unavailable(format!(
                "CUDA device {ordinal} requested, {count} present"
            )));
        }
        let device = result::device::get(ordinal).map_err(|e| driver("cuDeviceGet", e))?;
        let name = result::device::get_name(device).unwrap_or_else(|_| "unknown".into());
        // SAFETY: `device` is a valid device handle from cuDeviceGet.
        let ctx = unsafe { result::primary_ctx::retain(device) }
            .map_err(|e| driver("cuDevicePrimaryCtxRetain", e))?;
        // SAFETY: `ctx` was just retained.
        unsafe { result::ctx::set_current(ctx) }.map_err(|e| driver("cuCtxSetCurrent", e))?;
        let create = || {
            result::stream::create(result::stream::StreamKind::NonBlocking)
                .map_err(|e| driver("cuStreamCreate", e))
        };
        let stream = create()?;
        let hash_stream = match create() {
            Ok(s) => s,
            Err(e) => {
                // SAFETY: created above, unused.
                let _ = unsafe { result::stream::destroy(stream) };
                return Err(e);
            }
        };
        let mut backend = Self {
            ordinal,
            name,
            device,
            ctx,
            stream,
            hash_stream,
            method,
            batch: false,
            kernel: None,
            sms: 1,
            registry: Mutex::new(Registry::default()),
        };
        backend.ready(method)?;
        Ok(backend)
    }

    /// Finds out what the driver and device offer beyond one copy per run, and loads the copy
    /// kernel unless `method` rules it out.
    fn ready(&mut self, method: CopyMethod) -> Result<(), GpuError> {
        let mut version = 0;
        // SAFETY: `version` is a valid out-pointer.
        unsafe { sys::cuDriverGetVersion(&mut version).result() }
            .map_err(|e| driver("cuDriverGetVersion", e))?;
        self.batch = version >= BATCH_DRIVER;
        if method == CopyMethod::Batch && !self.batch {
            return Err(GpuError::Unavailable(format!(
                "gpu.copy_method = \"batch\" needs a driver for CUDA 12.8 or newer (this one is \
                 for CUDA {}.{}); use \"auto\"",
                version / 1000,
                version % 1000 / 10
            )));
        }
        let attr = |a| {
            // SAFETY: `device` is a valid device handle.
            unsafe { result::device::get_attribute(self.device, a) }
                .map_err(|e| driver("cuDeviceGetAttribute", e))
        };
        self.sms = u32::try_from(attr(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )?)
        .unwrap_or(1)
        .max(1);
        if !matches!(method, CopyMethod::Auto | CopyMethod::Kernel) {
            return Ok(());
        }
        let host_pointers = attr(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM,
        )?;
        let loaded = if host_pointers == 1 {
            self.enter().and_then(|()| Kernels::load())
        } else {
            Err(GpuError::Unavailable(
                "this device cannot use host pointers of pinned memory in kernels".into(),
            ))
        };
        match loaded {
            Ok(k) => self.kernel = Some(k),
            Err(e) if method == CopyMethod::Kernel => {
                return Err(GpuError::Unavailable(format!(
                    "gpu.copy_method = \"kernel\": {e}; use \"auto\""
                )))
            }
            Err(e) => tracing::info!(error = %e, "kvd's copy kernel is not used on this device"),
        }
        Ok(())
    }

    /// The copy method asked for, and what this backend can do: "auto (kernel, batch)".
    pub fn method(&self) -> String {
        let mut can = vec!["memcpy"];
        if self.batch {
            can.push("batch");
        }
        if self.kernel.is_some() {
            can.push("kernel");
        }
        format!("{} ({})", self.method, can.join(", "))
    }

    /// A CUDA IPC handle of the allocation at `ptr` (from [`Backend::alloc`]), for another
    /// process to map with [`Backend::import`] (what an engine hands kvd).
    pub fn ipc_handle(
        &self,
        ptr: DevicePtr,
    ) -> Result<[u8; crate::CUDA_IPC_HANDLE_BYTES], GpuError> {
        self.enter()?;
        let mut h = sys::CUipcMemHandle_st { reserved: [0; 64] };
        // SAFETY: `h` is a valid out-pointer; the driver checks `ptr`.
        unsafe { sys::cuIpcGetMemHandle(&mut h, ptr).result() }
            .map_err(|e| driver("cuIpcGetMemHandle", e))?;
        Ok(h.reserved.map(|c| c as u8))
    }

    /// Makes this backend's context current on the calling thread.
    fn enter(&self) -> Result<(), GpuError> {
        // SAFETY: `ctx` stays retained until `drop`.
        unsafe { result::ctx::set_current(self.ctx) }.map_err(|e| driver("cuCtxSetCurrent", e))
    }

    fn sync(&self) -> Result<(), GpuError> {
        sync(self.stream)
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if self.enter().is_ok() {
            if let Some(k) = self.kernel.take() {
                // SAFETY: the context is current; no launch is in flight (each one is waited
                // for before its call returns).
                unsafe { k.unload() };
            }
            for s in [self.stream, self.hash_stream] {
                // SAFETY: created by `open`; nothing is in flight on it (every copy and
                // checksum waits for its stream before returning).
                let _ = unsafe { result::stream::destroy(s) };
            }
        }
        // SAFETY: balances the retain in `open`.
        let _ = unsafe { result::primary_ctx::release(self.device) };
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        let sums = if self.kernel.is_some() { "GPU" } else { "CPU" };
        format!(
            "cuda:{} {}, copies {}, checksums on the {sums}",
            self.ordinal,
            self.name,
            self.method()
        )
    }

    unsafe fn register_host(&self, ptr: *mut u8, len: usize) -> Result<(), GpuError> {
        self.enter()?;
        let flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
        // SAFETY: the caller guarantees the range is mapped for as long as it is registered.
        unsafe { sys::cuMemHostRegister_v2(ptr.cast(), len, flags).result() }
            .map_err(|e| driver("cuMemHostRegister", e))?;
        lock(&self.registry)?.insert(ptr as usize, len);
        Ok(())
    }

    unsafe fn unregister_host(&self, ptr: *mut u8) -> Result<(), GpuError> {
        self.enter()?;
        lock(&self.registry)?.remove(ptr as usize);
        // SAFETY: the caller guarantees `ptr` starts a registered range no copy uses.
        unsafe { sys::cuMemHostUnregister(ptr.cast()).result() }
            .map_err(|e| driver("cuMemHostUnregister", e))
    }

    fn alloc(&self, len: usize) -> Result<DevicePtr, GpuError> {
        self.enter()?;
        // SAFETY: plain allocation; the memory is uninitialized bytes, which is fine for u8.
        unsafe { result::malloc_sync(len) }.map_err(|e| driver("cuMemAlloc", e))
    }

    unsafe fn free(&self, ptr: DevicePtr) -> Result<(), GpuError> {
        self.enter()?;
        // SAFETY: the caller guarantees `ptr` came from `alloc` and is unused.
        unsafe { result::free_sync(ptr) }.map_err(|e| driver("cuMemFree", e))
    }

    fn import(&self, shared: Shared<'_>) -> Result<Mapped, GpuError> {
        let Shared::CudaIpc(handle) = shared else {
            return Err(GpuError::Invalid(
                "the CUDA backend maps CUDA IPC handles; a shared file descriptor needs the \
                 host backend"
                    .into(),
            ));
        };
        self.enter()?;
        let handle = sys::CUipcMemHandle_st {
            reserved: handle.map(|b| b as std::ffi::c_char),
        };
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` is a valid out-pointer; the driver validates the handle's bytes.
        unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut ptr,
                handle,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as std::ffi::c_uint,
            )
            .result()
        }
        .map_err(|e| driver("cuIpcOpenMemHandle", e))?;
        let (mut base, mut size): (sys::CUdeviceptr, usize) = (0, 0);
        // SAFETY: `ptr` was just mapped; both out-pointers are valid.
        let range = unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr).result() };
        match range {
            Ok(()) => Ok(Mapped {
                base: ptr,
                len: (base + size as u64).saturating_sub(ptr),
            }),
            Err(e) => {
                // SAFETY: `ptr` was mapped above and nothing uses it yet.
                let _ = unsafe { sys::cuIpcCloseMemHandle(ptr) };
                Err(driver("cuMemGetAddressRange", e))
            }
        }
    }

    unsafe fn close_import(&self, base: DevicePtr) -> Result<(), GpuError> {
        self.enter()?;
        // SAFETY: the caller guarantees `base` is a live import no copy uses.
        unsafe { sys::cuIpcCloseMemHandle(base).result() }
            .map_err(|e| driver("cuIpcCloseMemHandle", e))
    }

    unsafe fn copy_d2h(&self, runs: &[Run]) -> Result<(), GpuError> {
        // SAFETY: the caller's guarantees for `runs` hold for these spans.
        unsafe { self.copy(Dir::D2H, &d2h_spans(runs)) }
    }

    unsafe fn copy_d2d(&self, runs: &[DeviceRun]) -> Result<(), GpuError> {
        let spans: Vec<Span> = runs
            .iter()
            .map(|r| Span {
                src: r.src,
                dst: r.dst,
                len: r.len as u64,
            })
            .collect();
        // SAFETY: the caller's guarantees for `runs` hold for these spans.
        unsafe { self.copy(Dir::D2D, &spans) }
    }

    fn d2h_uses_sms(&self, runs: &[Run]) -> bool {
        self.method_for(Dir::D2H, &d2h_spans(runs))
            .is_ok_and(|m| m == CopyMethod::Kernel)
    }

    fn checksums(&self, layers: &[Layer], ids: &[u64]) -> Result<Option<Vec<u64>>, GpuError> {
        let Some(k) = &self.kernel else {
            return Ok(None);
        };
        if ids.is_empty() || !hashable(layers) {
            return Ok(None);
        }
        self.enter()?;
        k.checksums(layers, ids, self.hash_stream).map(Some)
    }

    unsafe fn copy_h2d(&self, runs: &[Run]) -> Result<(), GpuError> {
        let spans: Vec<Span> = runs
            .iter()
            .map(|r| Span {
                src: r.host as u64,
                dst: r.dev,
                len: r.len as u64,
            })
            .collect();
        // SAFETY: the caller's guarantees for `runs` hold for these spans.
        unsafe { self.copy(Dir::H2D, &spans) }
    }
}

impl CudaBackend {
    /// Runs a batch of copies in direction `dir` by the method [`choose`] picks, and waits
    /// for all of them.
    ///
    /// # Safety
    /// As [`Backend::copy_d2h`] and its siblings: every span's ranges valid for the copy and
    /// untouched by others until this returns.
    unsafe fn copy(&self, dir: Dir, spans: &[Span]) -> Result<(), GpuError> {
        if spans.is_empty() {
            return Ok(());
        }
        self.enter()?;
        let method = self.method_for(dir, spans)?;
        // SAFETY: the caller's guarantees hold for every span; the kernel runs only where
        // every host range is mapped (`can.kernel`), the batch call only where the driver
        // has it (`can.batch`); the stream is waited for below.
        unsafe {
            match method {
                CopyMethod::Kernel => self.kernel_copy(spans)?,
                CopyMethod::Batch => self.batch_copy(spans)?,
                CopyMethod::Memcpy | CopyMethod::Auto => self.memcpy_each(dir, spans)?,
            }
        }
        self.sync()
    }

    /// The method [`choose`] picks for this batch, with what this backend can do for it.
    fn method_for(&self, dir: Dir, spans: &[Span]) -> Result<CopyMethod, GpuError> {
        let bytes = spans.iter().map(|s| s.len).sum();
        let can = Abilities {
            batch: self.batch,
            kernel: self.kernel.is_some() && self.host_mapped(dir, spans)?,
        };
        Ok(choose(self.method, spans.len(), bytes, can))
    }

    /// Whether every host side of the batch lies in memory this backend pinned and mapped.
    fn host_mapped(&self, dir: Dir, spans: &[Span]) -> Result<bool, GpuError> {
        let host = |s: &Span| match dir {
            Dir::D2H => Some(s.dst),
            Dir::H2D => Some(s.src),
            Dir::D2D => None,
        };
        let registry = lock(&self.registry)?;
        Ok(spans.iter().all(|s| {
            host(s).is_none_or(|h| {
                usize::try_from(h).is_ok_and(|h| registry.covers(h, s.len as usize))
            })
        }))
    }

    /// One `cuMemcpy*Async` per span.
    ///
    /// # Safety
    /// As [`Self::copy`].
    unsafe fn memcpy_each(&self, dir: Dir, spans: &[Span]) -> Result<(), GpuError> {
        for s in spans {
            let len = s.len as usize;
            // SAFETY: the caller guarantees both ranges; waited for by `copy`.
            let (call, r) = unsafe {
                match dir {
                    Dir::D2H => (
                        "cuMemcpyDtoHAsync",
                        sys::cuMemcpyDtoHAsync_v2(s.dst as *mut _, s.src, len, self.stream),
                    ),
                    Dir::H2D => (
                        "cuMemcpyHtoDAsync",
                        sys::cuMemcpyHtoDAsync_v2(s.dst, s.src as *const _, len, self.stream),
                    ),
                    Dir::D2D => (
                        "cuMemcpyDtoDAsync",
                        sys::cuMemcpyDtoDAsync_v2(s.dst, s.src, len, self.stream),
                    ),
                }
            };
            r.result().map_err(|e| driver(call, e))?;
        }
        Ok(())
    }

    /// The whole batch in one `cuMemcpyBatchAsync`, ordered after earlier work on the stream.
    ///
    /// # Safety
    /// As [`Self::copy`]; `self.batch` must be true (the driver has the call).
    unsafe fn batch_copy(&self, spans: &[Span]) -> Result<(), GpuError> {
        let mut dsts: Vec<sys::CUdeviceptr> = spans.iter().map(|s| s.dst).collect();
        let mut srcs: Vec<sys::CUdeviceptr> = spans.iter().map(|s| s.src).collect();
        let mut sizes: Vec<usize> = spans.iter().map(|s| s.len as usize).collect();
        let here = sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: self.ordinal,
        };
        let mut attrs = [sys::CUmemcpyAttributes {
            srcAccessOrder: sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
            srcLocHint: here,
            dstLocHint: here,
            flags: 0,
        }];
        let mut attr_at = [0usize];
        let mut failed = usize::MAX;
        // SAFETY: the three arrays hold `spans.len()` entries and live until the stream is
        // waited for (by `copy`); one attribute applies from index 0; the caller guarantees
        // the ranges; the driver has the call (`self.batch`).
        unsafe {
            sys::cuMemcpyBatchAsync(
                dsts.as_mut_ptr(),
                srcs.as_mut_ptr(),
                sizes.as_mut_ptr(),
                spans.len(),
                attrs.as_mut_ptr(),
                attr_at.as_mut_ptr(),
                1,
                &mut failed,
                self.stream,
            )
            .result()
        }
        .map_err(|e| {
            let at = spans
                .get(failed)
                .map(|s| format!(" (copy {failed}: {s:?})"));
            let mut g = driver("cuMemcpyBatchAsync", e);
            if let (GpuError::Driver { message, .. }, Some(at)) = (&mut g, at) {
                message.push_str(&at);
            }
            g
        })
    }

    /// The whole batch in one launch of kvd's copy kernel.
    ///
    /// # Safety
    /// As [`Self::copy`]; every host range must be pinned and mapped by this backend.
    unsafe fn kernel_copy(&self, spans: &[Span]) -> Result<(), GpuError> {
        let k = self
            .kernel
            .as_ref()
            .ok_or_else(|| GpuError::Invalid("the copy kernel is not loaded".into()))?;
        // SAFETY: the context is current (`copy` entered it); the spans are as the caller
        // guarantees.
        unsafe { k.copy(spans, self.stream, self.sms) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens device 0 with `method`; `None` (saying why) where this machine or driver cannot.
    fn open(method: CopyMethod) -> Option<CudaBackend> {
        match CudaBackend::open(0, method) {
            Ok(b) => Some(b),
            Err(GpuError::Unavailable(why)) => {
                eprintln!("SKIPPED: copy method {method}: {why}");
                None
            }
            Err(e) => panic!("opening CUDA device 0 for {method}: {e}"),
        }
    }

    const PAGE: usize = 2048;
    const PAGES: usize = 1024;

    /// Scatters `PAGES` pages of a host buffer into device pages in reverse order, one run
    /// each, copies them device to device, gathers them back into another host buffer the
    /// same way, plus one unaligned run; every byte must come back where it belongs.
    fn scatter_gather(b: &CudaBackend, pin: bool) {
        let len = PAGE * PAGES;
        let src: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4093) as u8).collect();
        let mut back = vec![0u8; len];
        if pin {
            // SAFETY: both buffers live until they are unregistered at the end.
            unsafe {
                b.register_host(src.as_ptr() as *mut u8, len).unwrap();
                b.register_host(back.as_mut_ptr(), len).unwrap();
            }
        }
        let dev = b.alloc(2 * len).unwrap();
        let page = |i: usize| dev + ((PAGES - 1 - i) * PAGE) as u64;
        let up: Vec<Run> = (0..PAGES)
            .map(|i| Run {
                dev: page(i),
                host: src.as_ptr() as usize + i * PAGE,
                len: PAGE,
            })
            .collect();
        let across: Vec<DeviceRun> = (0..PAGES)
            .map(|i| DeviceRun {
                src: page(i),
                dst: page(i) + len as u64,
                len: PAGE,
            })
            .collect();
        let mut down: Vec<Run> = (0..PAGES)
            .map(|i| Run {
                dev: page(i) + len as u64,
                host: back.as_mut_ptr() as usize + i * PAGE,
                len: PAGE,
            })
            .collect();
        // Not 16-byte aligned or sized: the kernel's byte loop.
        down[7] = Run {
            dev: page(7) + len as u64 + 3,
            host: back.as_mut_ptr() as usize + 7 * PAGE + 3,
            len: PAGE - 5,
        };
        // SAFETY: every range lies in `dev` (2 * len bytes), `src` or `back`, all alive.
        unsafe {
            b.copy_h2d(&up).unwrap();
            b.copy_d2d(&across).unwrap();
            b.copy_d2h(&down).unwrap();
        }
        let mut want = src.clone();
        want[7 * PAGE..7 * PAGE + 3].fill(0);
        want[8 * PAGE - 2..8 * PAGE].fill(0);
        assert!(
            back == want,
            "{}: bytes differ after the round trip",
            b.method()
        );
        // One long run each way (cut into pieces for the kernel).
        back.fill(0);
        let whole = |host: usize| {
            [Run {
                dev: dev + len as u64,
                host,
                len,
            }]
        };
        // SAFETY: as above.
        unsafe {
            b.copy_h2d(&whole(src.as_ptr() as usize)).unwrap();
            b.copy_d2h(&whole(back.as_mut_ptr() as usize)).unwrap();
        }
        assert!(
            back == src,
            "{}: a long run differs after the round trip",
            b.method()
        );
        // SAFETY: registered above (when `pin`), no copy in flight; `dev` is unused now.
        unsafe {
            if pin {
                b.unregister_host(src.as_ptr() as *mut u8).unwrap();
                b.unregister_host(back.as_mut_ptr()).unwrap();
            }
            b.free(dev).unwrap();
        }
    }

    #[test]
    fn every_copy_method_moves_pages_bit_for_bit() {
        let Some(first) = open(CopyMethod::Memcpy) else {
            return;
        };
        scatter_gather(&first, true);
        drop(first);
        for method in [CopyMethod::Batch, CopyMethod::Kernel, CopyMethod::Auto] {
            if let Some(b) = open(method) {
                scatter_gather(&b, true);
                // Unpinned host memory: the kernel must not touch it (one copy per run).
                scatter_gather(&b, false);
                eprintln!("ok: {}", b.name());
            }
        }
    }

    /// Checksums of blocks of `layers` layers of `page`-byte pages (`pages` of them, `stride`
    /// apart), computed on the device, against twox-hash over the same bytes on the host.
    fn device_checksums_match(b: &CudaBackend, layers: u64, page: u64, stride: u64, pages: u64) {
        use std::hash::Hasher;
        let per_layer = (pages - 1) * stride + page;
        let len = (layers * per_layer) as usize;
        let host: Vec<u8> = (0..len).map(|i| (i * 131 + i / 977) as u8).collect();
        let dev = b.alloc(len).unwrap();
        let up = [Run {
            dev,
            host: host.as_ptr() as usize,
            len,
        }];
        // SAFETY: `host` and `dev` hold `len` bytes.
        unsafe { b.copy_h2d(&up).unwrap() };
        let ls: Vec<Layer> = (0..layers)
            .map(|l| Layer {
                base: dev + l * per_layer,
                stride,
                page,
                pages,
            })
            .collect();
        let ids: Vec<u64> = (0..pages).rev().collect();
        let got = b.checksums(&ls, &ids).unwrap();
        let want: Vec<u64> = ids
            .iter()
            .map(|&id| {
                let mut h = twox_hash::XxHash3_64::new();
                for l in 0..layers {
                    let at = (l * per_layer + id * stride) as usize;
                    h.write(&host[at..at + page as usize]);
                }
                h.finish()
            })
            .collect();
        if kernels::hashable(&ls) {
            assert_eq!(got, Some(want), "{layers} layers of {page} B pages");
        } else {
            assert_eq!(
                got, None,
                "{layers} layers of {page} B pages cannot be hashed here"
            );
        }
        // SAFETY: nothing uses `dev` any more.
        unsafe { b.free(dev).unwrap() };
    }

    #[test]
    fn checksums_on_the_device_are_kvds_checksums() {
        let Some(b) = open(CopyMethod::Auto) else {
            return;
        };
        // (layers, page, stride, pages): 32-layer blocks of small pages, one large page,
        // blocks of whole 1 KiB rounds, an odd number of blocks (half a warp idle), pages
        // apart, and layouts the kernel leaves to the CPU (short blocks, odd pages).
        for (layers, page, stride, pages) in [
            (32, 2048, 2048, 300),
            (1, 1 << 20, 1 << 20, 9),
            (2, 512, 512, 33),
            (7, 1088, 4096, 17),
            (4, 64, 64, 5),
            (3, 64, 64, 5),
            (2, 100, 112, 4),
        ] {
            device_checksums_match(&b, layers, page, stride, pages);
        }
        eprintln!("ok: checksums on the device match twox-hash");
    }

    #[test]
    fn opens_a_device_or_says_why_not() {
        match CudaBackend::open(0, CopyMethod::Auto) {
            Ok(b) => {
                let dev = b.alloc(1 << 20).unwrap();
                let src: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7) as u8).collect();
                let mut back = vec![0u8; 1 << 20];
                let up = [Run {
                    dev,
                    host: src.as_ptr() as usize,
                    len: src.len(),
                }];
                let down = [Run {
                    dev,
                    host: back.as_mut_ptr() as usize,
                    len: back.len(),
                }];
                // SAFETY: both host buffers are ours and live across the calls; `dev` holds
                // 1 MiB.
                unsafe {
                    b.copy_h2d(&up).unwrap();
                    b.copy_d2h(&down).unwrap();
                    b.free(dev).unwrap();
                }
                assert!(src == back);
            }
            Err(GpuError::Unavailable(why)) => {
                eprintln!("SKIPPED: no CUDA device: {why}");
            }
            Err(e) => panic!("opening CUDA device 0: {e}"),
        }
    }
}
